"""Offline draft training: sample rollouts from the target, capture its features, train the head.

Used to bootstrap a draft for a policy before serving (the fixture builds one this way); online
learning (during serving) then keeps it aligned as the policy moves.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from fastgrpo.common.config import help_field
from fastgrpo.rollout.draft_learning.trainer import DraftTrainConfig, DraftTrainer
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
from fastgrpo.rollout.scheduler.requests import GenerationRequest
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.pairs import FeatureSequence
from fastgrpo.wire.records import Sampling

log = logging.getLogger("fastgrpo.draft")


@dataclass(frozen=True)
class OfflineConfig:
    """Bootstrapping a draft head offline (`fastgrpo-rollout train-draft` flags)."""

    samples_per_prompt: int = help_field(2, "rollouts per prompt")
    temperature: float = help_field(1.0, "sampling temperature of the rollouts")
    max_new_tokens: int = help_field(128, "tokens per rollout at most")
    epochs: int = help_field(3, "passes over the captured sequences")
    batch_size: int = help_field(32, "sequences per optimiser step")
    lr: float = help_field(1e-3, "AdamW learning rate of the head")
    seed: int = help_field(0, "seed of rollouts, initialisation and batch order")


@torch.inference_mode()
def capture_features(model: torch.nn.Module, sequences: list[list[int]], batch_size: int = 32) -> list[FeatureSequence]:
    """Target features of whole token sequences: pair i = (f_i, x_{i+1}) for i < len - 1."""
    out = []
    dev = next(model.parameters()).device
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        S = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), S, dtype=torch.long, device=dev)  # (B, S)
        attn = torch.zeros(len(chunk), S, dtype=torch.long, device=dev)  # (B, S)
        for b, s in enumerate(chunk):
            ids[b, : len(s)] = torch.tensor(s, device=dev)
            attn[b, : len(s)] = 1
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, S, H) final-norm
        for b, s in enumerate(chunk):
            n = len(s) - 1
            out.append(FeatureSequence(torch.tensor(s[1:]), hidden[b, :n].float().cpu().clone(), 0))
    return out


ROLLOUT_BATCH = 64  # sequences the rollout engine decodes at once


def rollouts(runner: ModelRunner, eos: tuple[int, ...], prompts: list[list[int]], cfg: OfflineConfig) -> list[list[int]]:
    """prompt + completion token ids sampled from the target with the plain engine."""
    engine = Engine(runner, eos, EngineConfig(max_running=ROLLOUT_BATCH))
    try:
        req = GenerationRequest("draft-data", tuple(tuple(p) for p in prompts), cfg.samples_per_prompt,
                                Sampling(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed))
        return [list(prompts[r.prompt_index]) + r.token_ids for r in engine.submit(req)]
    finally:
        engine.shutdown()


def train_offline(model: torch.nn.Module, eos: tuple[int, ...], prompts: list[list[int]],
                  cfg: OfflineConfig = OfflineConfig(), head: DraftHead | None = None) -> tuple[DraftHead, dict]:
    """Returns a head trained on the target's own rollouts of `prompts`, and a report."""
    t0 = time.perf_counter()
    max_len = max(len(p) for p in prompts) + cfg.max_new_tokens
    runner = ModelRunner(model, max_len=max_len)
    seqs = rollouts(runner, eos, prompts, cfg)
    data = capture_features(model, seqs)
    t1 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    head = head or DraftHead.for_target(model)
    trainer = DraftTrainer(head, DraftTrainConfig(lr=cfg.lr))
    rng = random.Random(cfg.seed)
    last = None
    history = []
    for epoch in range(cfg.epochs):
        rng.shuffle(data)
        for i in range(0, len(data), cfg.batch_size):
            last = trainer.step(data[i : i + cfg.batch_size])
            history.append(float(last.top1))
        log.info("draft epoch %d: loss %.4f top1 %.3f", epoch, float(last.loss.detach()), float(last.top1))
    report = {
        "sequences": len(data),
        "pairs": sum(len(s.tokens) for s in data),
        "capture_seconds": t1 - t0,
        "train_seconds": time.perf_counter() - t1,
        "steps": trainer.steps,
        "final_loss": float(last.loss.detach()) if last is not None else None,
        "final_top1": sum(history[-20:]) / max(1, len(history[-20:])),
    }
    return head, report
