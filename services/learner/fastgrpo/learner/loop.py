"""One GRPO step, orchestrated: sample prompts -> Generate -> score -> advantages -> update -> push.

The learner talks to the rollout replicas only through `fastgrpo.client.RolloutClient`. A rollout
service that restarts under it (and so serves its start-up weights again) costs no step: before
generating, and whenever a Generate or a push fails or comes back from other weights, the learner
waits for the service, pushes its own weights in full and does that part of the step again.
"""
from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass

import grpc
import torch
from transformers import AutoTokenizer

from fastgrpo.client import Completion, GroupedBatch, RolloutClient, RolloutError, Sampling
from fastgrpo.learner.algo import group_advantages, group_reward_stats, grpo_loss
from fastgrpo.learner.checkpoint import latest_checkpoint, load_checkpoint
from fastgrpo.learner.config import LearnerConfig
from fastgrpo.learner.distributed import (TrainBatch, broadcast_flag, broadcast_record, full_value, gather_full_state,
                                          init_world, scatter_full_state, shard_model, share_batch)
from fastgrpo.learner.policy import SequenceBatch, adapters_disabled, completion_logprobs, load_policy
from fastgrpo.learner.push import Pusher, PushResult
from fastgrpo.learner.tasks import Problem, RewardFn, correctness_reward, format_prompt, load_gsm8k_jsonl, synthetic_math


log = logging.getLogger("fastgrpo.learner")
RESTART_ATTEMPTS = 3  # a step survives this many failures of the rollout service less one
# UNAVAILABLE: down; FAILED_PRECONDITION: a restarted service has another version; DATA_LOSS:
# another checksum; CANCELLED / DEADLINE_EXCEEDED: a call cut by the restart
RECOVERABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS,
               grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(frozen=True)
class StepStats:
    step: int
    policy_version: int  # version the rollouts of this step came from
    new_version: int  # version served after this step's push
    reward_mean: float
    reward_std: float
    accuracy: float
    frac_zero_std: float
    loss: float
    kl: float
    clip_fraction: float
    grad_norm: float
    completion_tokens: int
    dropped_stale: int
    acceptance_length: float  # of this step's rollouts (0 when the service decoded without a draft)
    generate_s: float
    score_s: float
    train_s: float
    push_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(self.generate_s, 1e-9)


def fresh_groups(groups: list[list[Completion]], version: int, max_staleness: int) -> list[int]:
    """Indices of the groups whose every completion is at most `max_staleness` versions behind.

    A group is kept or dropped whole: advantages are relative to the group, so a partial group
    would bias them.
    """
    return [i for i, group in enumerate(groups) if all(version - c.policy_version <= max_staleness for c in group)]


def load_task(cfg: LearnerConfig) -> tuple[list[Problem], list[Problem]]:
    """The training and test problems; --train-size keeps the first N training problems."""
    if cfg.train_size < 0:
        raise ValueError(f"--train-size must be >= 0 (0 = all), got {cfg.train_size}")
    if cfg.task == "synthetic":
        data = synthetic_math(seed=cfg.task_seed)
        train, test = data.train, data.test
    else:
        train = load_gsm8k_jsonl(cfg.task)
        test = load_gsm8k_jsonl(cfg.test_task) if cfg.test_task else []
    return (train[: cfg.train_size] if cfg.train_size else train), test


class GRPOLearner:
    def __init__(self, cfg: LearnerConfig, client: RolloutClient | None = None):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.world = init_world(cfg.device)
        if self.world.distributed and cfg.lora:
            raise ValueError("--lora is not supported under torchrun (WORLD_SIZE > 1): train LoRA in one process")
        self.client = None
        if self.world.is_main:  # under torchrun, rank 0 alone talks to the rollout services
            self.client = client or RolloutClient(
                [a.strip() for a in cfg.rollout.split(",") if a.strip()], token=cfg.auth_token or None,
                timeout=cfg.timeout,
            )
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._build_policy()
        self.train_set, self.test_set = load_task(cfg)
        self.reward_fn = RewardFn(correctness_weight=1.0, format_weight=cfg.format_reward)
        self.rng = random.Random(cfg.seed)
        self.order: list[int] = []
        self.step_index = 0
        self.pusher = Pusher(self.client, self.push_model, cfg.lora, cfg.push_kind) if self.world.is_main else None
        checkpoint = latest_checkpoint(cfg.output_dir) if (cfg.resume and cfg.output_dir) else None
        if checkpoint is not None:
            load_checkpoint(self, checkpoint)
            self._weights_to_pusher()
            if self.world.is_main:
                self.pusher.sync()
            self._weights_from_pusher()
        elif self.world.is_main:
            self.pusher.check_in_sync()
        self._shards_version = self.pusher.version if self.world.is_main else 0  # served version the shards hold

    def _build_policy(self) -> None:
        """The trainable model (FSDP-sharded under torchrun), its reference, the optimizer, and the
        full-weight model the pusher reads."""
        cfg = self.cfg
        self.model = load_policy(cfg.model, self.world.device, cfg.lora, cfg.lora_r, cfg.lora_alpha,
                                 [t.strip() for t in cfg.lora_targets.split(",") if t.strip()])
        self.reference = None
        if cfg.beta > 0 and not cfg.lora:  # LoRA's reference is the base model: adapters disabled
            # whole on every rank: it only runs forwards, on the rank's own sequences
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        # the pusher diffs full weights and writes the served values back into them: in one process
        # the model itself, under FSDP rank 0's full copy, gathered after each update
        self.push_model = self.model
        if self.world.distributed:
            self.push_model = copy.deepcopy(self.model).cpu() if self.world.is_main else None
            shard_model(self.model, self.world)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _weights_to_pusher(self) -> None:
        """Under FSDP: the shards' weights, gathered whole into rank 0's push_model. Collective."""
        if self.world.distributed:
            state = gather_full_state(self.model)
            if self.world.is_main:
                self.push_model.load_state_dict(state)

    def _weights_from_pusher(self) -> None:
        """Under FSDP: rank 0's push_model (the served values it adopted) into every rank's shards.
        Collective."""
        if self.world.distributed:
            scatter_full_state(self.model, self.push_model.state_dict() if self.world.is_main else {}, self.world)
            if self.world.is_main:
                self._shards_version = self.pusher.version

    # ---------------------------------------------------------------- prompts
    def _next_problems(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.train_set)))
                self.rng.shuffle(self.order)
            out.append(self.train_set[self.order.pop()])
        return out

    def _prompt_ids(self, problems: list[Problem]) -> list[list[int]]:
        return [self.tokenizer(format_prompt(p.question))["input_ids"] for p in problems]

    # ---------------------------------------------------------------- one step
    def step(self) -> StepStats:
        if not self.world.is_main:
            return self._follow_step()
        cfg = self.cfg
        Q, G = cfg.prompts_per_step, cfg.group_size
        problems = self._next_problems(Q)
        prompt_ids = self._prompt_ids(problems)

        t0 = time.perf_counter()
        sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed * 1_000_003 + self.step_index)
        batch = self._generate(prompt_ids, G, sampling)
        version = self.pusher.version  # the rollouts' version (a re-sync in _generate moves it)
        t1 = time.perf_counter()

        kept = fresh_groups(batch.completions, version, cfg.max_staleness)
        dropped = (Q - len(kept)) * G
        completions: list[Completion] = [c for i in kept for c in batch.completions[i]]
        rewards, correct = self.score(completions, [problems[i] for i in kept for _ in range(G)])
        t2 = time.perf_counter()

        frac_zero = 1.0
        train_batch = TrainBatch([], [], [], torch.zeros(0))
        if completions:
            advantages = group_advantages(rewards, G, cfg.advantage_scale)  # (N,)
            frac_zero = float(group_reward_stats(rewards, G).frac_zero_std)
            prompts = [prompt_ids[i] for i in kept for _ in range(G)]
            train_batch = TrainBatch(prompts, [c.token_ids for c in completions], [c.logprobs for c in completions],
                                     advantages)
        loss, kl, clip, grad_norm = self._train_all_ranks(train_batch)
        t3 = time.perf_counter()
        pushed = self._push_from_rank0()
        t4 = time.perf_counter()
        self.step_index += 1
        n = max(len(completions), 1)
        return broadcast_record(StepStats(
            step=self.step_index,
            policy_version=version,
            new_version=pushed.version,
            reward_mean=float(rewards.mean()) if completions else 0.0,
            reward_std=float(rewards.std()) if len(completions) > 1 else 0.0,
            accuracy=sum(correct) / n,
            frac_zero_std=frac_zero,
            loss=loss,
            kl=kl,
            clip_fraction=clip,
            grad_norm=grad_norm,
            completion_tokens=sum(len(c.token_ids) for c in completions),
            dropped_stale=dropped,
            acceptance_length=batch.spec().acceptance_length,
            generate_s=t1 - t0,
            score_s=t2 - t1,
            train_s=t3 - t2,
            push_s=t4 - t3,
        ), StepStats, self.world)

    def score(self, completions: list[Completion], problems: list[Problem]) -> tuple[torch.Tensor, list[float]]:
        """Each completion's reward (N,) and correctness, problems[i] the one completions[i] answers."""
        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        rewards = torch.tensor(self.reward_fn.batch(texts, problems), dtype=torch.float32)
        return rewards, [correctness_reward(t, p) for t, p in zip(texts, problems)]

    # ---------------------------------------------------------------- the ranks under torchrun
    # Rank 0's step and _follow_step make the same collectives in the same order: the weights flag
    # and the batch (_train_all_ranks), the update's passes (_train), the gather for the push and the
    # scatter of the served values (_push_from_rank0), the step's figures (broadcast_record).
    def _follow_step(self) -> StepStats:
        """A rank other than 0: trains its share of the batch rank 0 generated and scored."""
        self._train_all_ranks(None)
        self._push_from_rank0()
        self.step_index += 1
        return broadcast_record(None, StepStats, self.world)

    def _train_all_ranks(self, batch: TrainBatch | None) -> tuple[float, float, float, float]:
        """Rank 0's batch (the others pass None) trained on by every rank, each on its share."""
        main = self.world.is_main
        if broadcast_flag(main and self.pusher.version != self._shards_version, self.world):
            self._weights_from_pusher()  # a full push re-synced the services and rank 0 took what they serve
        batch = share_batch(batch, self.world)
        return self._train(batch) if len(batch) else (0.0, 0.0, 0.0, 0.0)

    def _push_from_rank0(self) -> PushResult | None:
        """Rank 0 pushes the update (gathered whole from the shards); every rank takes the served values."""
        self._weights_to_pusher()
        pushed = self._push() if self.world.is_main else None
        self._weights_from_pusher()
        return pushed

    # ---------------------------------------------------------------- a rollout service that restarts
    def _ensure_served(self) -> None:
        """Brings back set-aside replicas that answer again (re-synced in full first), and pushes the
        learner's weights in full where a replica serves others (it restarted): to that replica alone
        while others serve the learner's, to all of them when none does."""
        self.pusher.rejoin_answering()
        served = self.client.statuses(timeout=self.cfg.timeout)
        mirror = self.pusher.mirror
        stale = {i: s for i, s in served.items() if (s.policy_checksum, s.policy_version) != (mirror.checksum,
                                                                                             mirror.version)}
        if stale and len(stale) == len(served):
            s = next(iter(stale.values()))
            log.warning("the rollout service serves version %d (checksum %s), not the learner's %d: pushing the "
                        "learner's weights in full", s.policy_version, s.policy_checksum[:12], mirror.version)
            self.pusher.sync()
        else:
            for i, s in stale.items():
                self.pusher.resync(i, s)

    def _recover(self, what: str, exc: RolloutError, attempt: int) -> None:
        if attempt + 1 >= RESTART_ATTEMPTS or exc.code not in RECOVERABLE:
            raise exc
        log.warning("%s failed (%s): waiting for the rollout service, then doing it again", what, exc)
        self.client.wait_ready(timeout=self.cfg.timeout)

    def _generate(self, prompts: list[list[int]], G: int, sampling: Sampling) -> GroupedBatch:
        """This step's rollouts, all from the weights the learner holds."""
        for attempt in range(RESTART_ATTEMPTS):
            try:
                self._ensure_served()
                batch = self.client.generate_batch(prompts, G, sampling, timeout=self.cfg.timeout)
            except RolloutError as exc:
                self._recover("Generate", exc, attempt)
                continue
            if all(c.policy_version == self.pusher.version for c in batch.flat()):
                return batch
            # the service restarted while it generated: these came from its start-up weights
            log.warning("rollouts came from another policy version than the learner's %d: generating again",
                        self.pusher.version)
        raise RuntimeError(f"the rollout service kept changing its weights during {RESTART_ATTEMPTS} attempts")

    def _push(self) -> PushResult:
        """Pushes this step's change; after a failure (the service restarted), the weights in full."""
        for attempt in range(RESTART_ATTEMPTS):
            try:
                return self.pusher.push() if attempt == 0 else self.pusher.sync()
            except RolloutError as exc:
                self._recover("the weight push", exc, attempt)
        raise AssertionError("unreachable: _recover raises on the last attempt")

    def _train(self, batch: TrainBatch):
        """One optimiser step over the batch, in micro-batches normalised as one batch would be.

        Under torchrun every rank holds the whole batch and trains on its share of the sequences;
        the normalisers (N, total_tokens) stay the whole batch's, so the ranks' gradients, summed by
        FSDP, are the gradient of one process on the whole batch. Returns the whole batch's loss, KL,
        clip fraction and gradient norm."""
        cfg = self.cfg
        N = len(batch)
        total_tokens = sum(len(c) for c in batch.completions)
        advantages = batch.advantages  # (N,)
        # sequences with zero advantage add exactly nothing to the loss or its gradient unless a
        # KL term is on; skip their forward passes (they still count in the normalisers below)
        active = [i for i in self.world.share(N) if cfg.beta > 0 or advantages[i] != 0]
        # FSDP gathers each layer's weights in every forward: all ranks make as many passes
        passes = self.world.max_int(-(-len(active) // cfg.micro_batch))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = kl_sum = clip_sum = 0.0
        for start in range(0, passes * cfg.micro_batch, cfg.micro_batch):
            idx = active[start : start + cfg.micro_batch]
            if not idx:  # this rank's share is done: a pass that adds nothing keeps it in step
                dummy = SequenceBatch.build([[self.pad_id]], [[self.pad_id]], self.pad_id)
                (completion_logprobs(self.model, dummy, 1.0).sum() * 0.0).backward()
                continue
            mb = SequenceBatch.build([batch.prompts[i] for i in idx], [batch.completions[i] for i in idx], self.pad_id)
            T = mb.completion_ids.shape[1]
            old = torch.zeros(len(idx), T)  # (b, T) logprobs the rollout returned
            for row, i in enumerate(idx):
                old[row, : len(batch.logprobs[i])] = torch.tensor(batch.logprobs[i])
            new = completion_logprobs(self.model, mb, cfg.temperature)  # (b, T)
            ref = None
            if cfg.beta > 0:
                with torch.no_grad():
                    if self.reference is not None:
                        ref = completion_logprobs(self.reference, mb, cfg.temperature)
                    else:
                        with adapters_disabled(self.model) as base:
                            ref = completion_logprobs(base, mb, cfg.temperature)
            out = grpo_loss(new, old.to(new.device), advantages[idx].to(new.device), mb.completion_mask.to(new.device),
                            eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, logp_ref=ref,
                            mode=cfg.loss_mode, max_completion_length=max(cfg.max_new_tokens, T))
            tokens = int(mb.completion_mask.sum())
            # rescale the micro-batch's own normalisation to the whole batch's
            weight = tokens / max(total_tokens, 1) if cfg.loss_mode == "dapo" else len(idx) / N
            (out.loss * weight).backward()
            loss_sum += float(out.loss.detach()) * weight
            # token-level means over the whole batch (a skipped sequence's tokens neither clip nor,
            # with beta = 0, have a KL), whatever the micro-batches and ranks
            kl_sum += float(out.kl_mean) * tokens / max(total_tokens, 1)
            clip_sum += float(out.clip_fraction) * tokens / max(total_tokens, 1)
        loss_sum, kl_sum, clip_sum = self.world.sum_floats([loss_sum, kl_sum, clip_sum])
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = 0.0
        if passes:
            # under FSDP, norms of sharded gradients: the whole gradient's norm on every rank
            if cfg.grad_clip > 0:
                grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)))
            else:
                grad_norm = float(full_value(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])))
            self.optimizer.step()
        self.model.eval()
        return loss_sum, kl_sum, clip_sum, grad_norm

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, n: int | None = None) -> float:
        """Greedy accuracy on the first n test problems, generated by the rollout service."""
        problems = self.test_set[: (self.cfg.eval_size if n is None else n)]
        if not problems:
            return float("nan")
        sampling = Sampling(temperature=0.0, max_new_tokens=self.cfg.max_new_tokens)
        batch = self.client.generate_batch(self._prompt_ids(problems), 1, sampling, timeout=self.cfg.timeout)
        texts = [self.tokenizer.decode(g[0].token_ids, skip_special_tokens=True) for g in batch.completions]
        return sum(correctness_reward(t, p) for t, p in zip(texts, problems)) / len(problems)

