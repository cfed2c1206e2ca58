"""`fastgrpo-bench drift`: does online draft learning keep acceptance up while GRPO moves the policy?

Three rollout services in this process host the fixture policy, each with a draft:
  * online:  the fixture's bootstrapped draft, trained online (the default server);
  * frozen:  the same draft with online learning off;
  * scratch: a randomly initialised draft trained online only.
A GRPO learner trains on the frozen service's rollouts and pushes every update to all three. Each
Generate the learner makes is repeated on the other two (same prompts, same seeds), so all three
drafts are measured on the same policy and the same requests at every step. The learner reads the
frozen service because its samples depend on nothing that learns or on the clock: speculative
sampling is lossless, but which sample a seed gives depends on the draft, so a learner reading the
online service would follow a different policy whenever draft learning changed.

overhead_fraction = draft-training seconds the online service spent during the step / the step's
seconds on the online service (its Generate, which holds the training rounds, plus the learner's
score + train + push). The scratch replica may spend a larger share (--scratch-time-fraction): its
overhead is reported separately.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgrpo.common.config import help_field

REPLICAS = ("online", "frozen", "scratch")


@dataclass(frozen=True)
class DriftBenchConfig:
    out: str = help_field("benchmarks/results/drift.json", "JSON output path (a PNG is written beside it)")
    steps: int = help_field(80, "GRPO steps")
    quick: bool = help_field(False, "5 steps of 4 prompts: about a minute once the fixture is cached")
    preset: str = help_field("default", "fixture preset of the policy")
    prompts_per_step: int = help_field(8, "Q prompts per GRPO step")
    group_size: int = help_field(8, "G completions per prompt")
    lr: float = help_field(3e-4, "learner AdamW learning rate (the policy visibly moves; at 5e-4 its entropy rises and every draft falls)")
    max_new_tokens: int = help_field(64, "tokens per completion at most")
    spec_width: int = help_field(4, "static tree K of every service")
    spec_depth: int = help_field(5, "static tree L")
    spec_n_verify: int = help_field(16, "static tree N_verify")
    draft_max_steps: int = help_field(64, "online draft learning: optimiser steps per round at most")
    draft_time_fraction: float = help_field(0.05, "online draft learning: share of serving time its rounds may use (online replica)")
    scratch_time_fraction: float = help_field(0.25, "the same for the random draft: bootstrapping from nothing buys more training")
    draft_batch_size: int = help_field(16, "online draft learning: sequences per optimiser step")
    draft_lr: float = help_field(3e-4, "online draft learning: AdamW learning rate")
    draft_warmup_steps: int = help_field(16, "online draft learning: optimiser steps of learning-rate warm-up")
    seed: int = help_field(0, "seed of the learner and of the scratch draft")


class _MirroredClient:
    """The learner's client: Generate goes to the primary service (whose rollouts the learner
    trains on) and is repeated on the others to measure their drafts; everything else (pushes,
    status) goes through a client of all the replicas."""

    def __init__(self, everyone, clients: dict, primary: str):
        self.everyone, self.clients, self.primary = everyone, clients, primary
        self.last: dict = {}  # replica -> its GroupedBatch of the latest Generate
        self.seconds = {name: 0.0 for name in clients}  # replica -> Generate seconds so far

    def generate_batch(self, *args, **kwargs):
        for name in [self.primary] + [n for n in self.clients if n != self.primary]:
            t0 = time.perf_counter()
            self.last[name] = self.clients[name].generate_batch(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - t0
        return self.last[self.primary]

    def __getattr__(self, name):
        return getattr(self.everyone, name)


def _moving_mean(xs: list[float], n: int) -> list[float]:
    """Means of every n consecutive values (the whole list's mean when it is shorter)."""
    n = min(n, len(xs))
    return [sum(xs[i : i + n]) / n for i in range(len(xs) - n + 1)]


def _mean_nll(batch) -> float:
    """Mean -logprob per sampled token of a step's rollouts: the policy's entropy, estimated. When it
    rises every draft's acceptance falls, stale or not."""
    lps = [lp for c in batch.flat() for lp in c.logprobs]
    return -sum(lps) / max(1, len(lps))


def run(cfg: DriftBenchConfig) -> dict:
    from transformers import AutoModelForCausalLM

    from fastgrpo.bench.common import plot, write_results
    from fastgrpo.client import RolloutClient
    from fastgrpo.fixture import build_fixture
    from fastgrpo.fixture.draft import build_draft
    from fastgrpo.learner.config import LearnerConfig
    from fastgrpo.learner.loop import GRPOLearner
    from fastgrpo.rollout.draft_learning.online import DraftLearningConfig
    from fastgrpo.rollout.scheduler.engine import EngineConfig
    from fastgrpo.rollout.service.app import build_app
    from fastgrpo.rollout.service.config import ServeConfig
    from fastgrpo.rollout.speculative.controller import SpecConfig
    from fastgrpo.rollout.speculative.draft_head import DraftHead

    torch.set_num_threads(os.cpu_count() or 1)
    fixture = build_fixture(cfg.preset)
    bootstrapped = build_draft(fixture)
    steps, Q = (5, 4) if cfg.quick else (cfg.steps, cfg.prompts_per_step)
    tmp = Path(tempfile.mkdtemp(prefix="fastgrpo-drift-"))
    torch.manual_seed(cfg.seed)
    DraftHead.for_target(AutoModelForCausalLM.from_pretrained(str(fixture))).save(tmp / "scratch-draft")
    drafts = {"online": bootstrapped, "frozen": bootstrapped, "scratch": tmp / "scratch-draft"}
    apps = {}
    try:
        for name in REPLICAS:
            apps[name] = build_app(ServeConfig(
                model=str(fixture), port=0, draft=str(drafts[name]), engine=EngineConfig(max_running=Q * cfg.group_size),
                spec=SpecConfig("static", width=cfg.spec_width, depth=cfg.spec_depth, n_verify=cfg.spec_n_verify),
                draft_learning=DraftLearningConfig(
                    enabled=name != "frozen", max_steps=cfg.draft_max_steps, batch_size=cfg.draft_batch_size,
                    lr=cfg.draft_lr, warmup_steps=cfg.draft_warmup_steps,
                    time_fraction=cfg.scratch_time_fraction if name == "scratch" else cfg.draft_time_fraction)))
        address = {name: f"127.0.0.1:{app.port}" for name, app in apps.items()}
        everyone = RolloutClient([address[n] for n in REPLICAS])
        client = _MirroredClient(everyone, {n: RolloutClient(address[n]) for n in REPLICAS}, "frozen")
        learner = GRPOLearner(LearnerConfig(rollout=address["frozen"], model=str(fixture), steps=steps,
                                            prompts_per_step=Q, group_size=cfg.group_size, lr=cfg.lr,
                                            max_new_tokens=cfg.max_new_tokens, eval_size=0, seed=cfg.seed), client)
        records = []
        draft_s = everyone.train_draft(replica=0).seconds
        scratch_prev = everyone.train_draft(replica=2).seconds
        for _ in range(steps):
            generate_before = dict(client.seconds)
            st = learner.step()
            generate_s = {n: client.seconds[n] - generate_before[n] for n in REPLICAS}
            step_s = generate_s["online"] + st.score_s + st.train_s + st.push_s
            online = everyone.train_draft(replica=0)
            scratch = everyone.train_draft(replica=2)
            scratch_s = scratch.seconds - scratch_prev
            scratch_prev = scratch.seconds
            rec = {
                "step": st.step,
                "acceptance_length_online": client.last["online"].spec().acceptance_length,
                "acceptance_length_frozen": st.acceptance_length,
                "acceptance_length_scratch": client.last["scratch"].spec().acceptance_length,
                "overhead_fraction": (online.seconds - draft_s) / step_s,
                "overhead_fraction_scratch": scratch_s / (generate_s["scratch"] + step_s - generate_s["online"]),
                "draft_seconds": online.seconds - draft_s,
                "step_seconds": step_s,
                "draft_version_online": online.draft_version,
                "draft_version_scratch": scratch.draft_version,
                "draft_loss_online": online.last_loss,
                "reward_mean": st.reward_mean,
                "policy_nll": _mean_nll(client.last[client.primary]),
                "accuracy": st.accuracy,
                "policy_version": st.new_version,
            }
            draft_s = online.seconds
            records.append(rec)
            print(f"step {rec['step']:3d}  acceptance online {rec['acceptance_length_online']:.2f}  "
                  f"frozen {rec['acceptance_length_frozen']:.2f}  scratch {rec['acceptance_length_scratch']:.2f}  "
                  f"overhead {100 * rec['overhead_fraction']:.1f}%  reward {rec['reward_mean']:.3f}  nll {rec['policy_nll']:.3f}", flush=True)
    finally:
        for app in apps.values():
            app.stop(grace=0.5)
    online = [r["acceptance_length_online"] for r in records]
    frozen = [r["acceptance_length_frozen"] for r in records]
    head = max(1, len(records) // 10)
    summary = {
        "online_best": max(online),
        "online_min_over_best": min(online) / max(online),
        # per step the prompts differ (+-8% on a steady draft); over 5 steps that noise averages out
        "online_ma5_min_over_best": min(_moving_mean(online, 5)) / max(_moving_mean(online, 5)),
        "frozen_ma5_last_over_first": _moving_mean(frozen, 5)[-1] / _moving_mean(frozen, 5)[0],
        "online_minus_frozen_last": sum(online[-head:]) / head - sum(frozen[-head:]) / head,
        "policy_nll_first": sum(r["policy_nll"] for r in records[:head]) / head,
        "policy_nll_last": sum(r["policy_nll"] for r in records[-head:]) / head,
        "frozen_first": sum(frozen[:head]) / head,
        "frozen_last": sum(frozen[-head:]) / head,
        "online_last": sum(online[-head:]) / head,
        "scratch_best": max(r["acceptance_length_scratch"] for r in records),
        "scratch_first_step_above_2_5": next((r["step"] for r in records if r["acceptance_length_scratch"] > 2.5), None),
        "overhead_fraction_mean": sum(r["draft_seconds"] for r in records) / sum(r["step_seconds"] for r in records),
        "overhead_fraction_max": max(r["overhead_fraction"] for r in records),
    }
    print("summary: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    path = write_results(cfg.out, "drift", records, summary=summary, fixture=str(fixture), config=cfg.__dict__)
    xs = [r["step"] for r in records]
    plot(path.with_suffix(".png"), "acceptance length while GRPO moves the policy", "GRPO step", "acceptance length",
         {name: (xs, [r[f"acceptance_length_{name}"] for r in records]) for name in REPLICAS}, logx=False, hline=None)
    print(f"wrote {path}")
    return {"path": str(path), "records": records, "summary": summary}
