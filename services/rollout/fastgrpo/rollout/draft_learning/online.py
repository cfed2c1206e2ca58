"""Online draft learning: keep the draft aligned with the policy it drafts for.

The target computes its features while verifying anyway; every finished sequence's pairs land in
a bounded CaptureBuffer. A *round* trains a shadow copy of the draft head on the sequences captured
since the previous round (one optimiser step at a time, run by the engine thread when it has no
decode work, or interleaved one step per decode step when a round was asked for explicitly), then
copies the shadow into the served head between two decode steps and bumps the draft version.
Rounds start after every N finished Generate requests (the schedule), or on TrainDraft.

The learner is one of the engine's observers (it receives finished sequences' pairs, finished
requests and step times) and one of its pieces of background work (it trains between steps).

Scheduled rounds are also bounded in time: training may spend at most `time_fraction` of the time
the engine spends serving (a budget credited by every engine step and spent by every optimiser
step); a round gets as many steps as the budget affords at the measured step cost, so draft
learning never costs more than that share of the rollouts it learns from, however long the service
then sits idle. Rounds asked for with TrainDraft ignore the bound (their time still counts).
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import torch

from fastgrpo.common.config import help_field
from fastgrpo.rollout.draft_learning.buffer import CaptureBuffer
from fastgrpo.rollout.draft_learning.trainer import DraftTrainConfig, DraftTrainer
from fastgrpo.rollout.scheduler.observer import EngineObserver
from fastgrpo.rollout.scheduler.requests import GenerationRequest, StepReport
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.pairs import FeatureSequence
from fastgrpo.wire.records import Completion, DraftTraining


@dataclass(frozen=True)
class DraftLearningConfig:
    """Online draft learning while serving (flags --draft-*)."""

    enabled: bool = help_field(True, "with --draft: keep training the draft online on the pairs verification captures", flag="draft-learning")
    every_n_batches: int = help_field(1, "a round after every N finished Generate requests (0 = only on TrainDraft)")
    buffer_bytes: int = help_field(256 * 1024 * 1024, "capture buffer bound in bytes (oldest sequences dropped first)")
    batch_size: int = help_field(16, "sequences per draft optimiser step")
    max_steps: int = help_field(64, "optimiser steps per round at most")
    lr: float = help_field(3e-4, "AdamW learning rate of the draft head")
    warmup_steps: int = help_field(16, "optimiser steps over which the learning rate ramps up from 0")
    time_fraction: float = help_field(0.05, "scheduled rounds use at most this fraction of the engine's serving time (0 = unbounded; TrainDraft rounds are not bounded)")
    seed: int = help_field(0, "seed of the batch order")


class DraftPublisher(Protocol):
    """Where a trained draft is served from: its version, and a versioned swap of its weights
    (the service's WeightStore of the draft)."""

    version: int

    def replace(self, values: Mapping[str, torch.Tensor], version: int) -> None: ...


class OnlineDraftLearner(EngineObserver):
    wants_pairs = True

    def __init__(self, live: DraftHead, store: DraftPublisher, config: DraftLearningConfig = DraftLearningConfig(),
                 clock: Callable[[], float] = time.perf_counter):
        """clock: what training time is measured with (a test steps one of its own)."""
        self.live = live
        self._clock = clock
        self.store = store
        self.config = config
        self.every_n_batches = config.every_n_batches
        self.buffer = CaptureBuffer(config.buffer_bytes)
        param = next(live.parameters())
        self.shadow = DraftHead(live.config, live.embed_tokens, live.lm_head, live.rotary).to(param.device, param.dtype)
        self.sync_from_live()
        self.trainer = DraftTrainer(self.shadow, DraftTrainConfig(lr=config.lr, warmup_steps=config.warmup_steps))
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()
        self._queue: list[list[FeatureSequence]] = []  # batches of the current round
        self._waiters: list[Future] = []
        self._forced = False
        self._next_serial = 0
        self._batches = 0
        self.rounds = 0
        self.last_loss = float("nan")
        self.last_top1 = float("nan")
        self.samples_seen = 0
        self.seconds = 0.0
        self._budget_s = 0.0  # training seconds scheduled rounds may still spend
        self._step_s = 0.0  # running mean of one optimiser step's seconds (0: none measured yet)

    # ---------------------------------------------------------------- engine observer (engine thread)
    def step_done(self, report: StepReport) -> None:
        if report.batch_size or report.first_token_seconds:
            self.credit(report.seconds)  # serving time buys draft-training time

    def sequence_done(self, result: Completion, seconds: float, pairs: FeatureSequence | None) -> None:
        if pairs is not None:
            self.capture(pairs)

    def request_done(self, request: GenerationRequest) -> None:
        self.on_batch_done()

    # ---------------------------------------------------------------- called from any thread
    def on_batch_done(self) -> None:
        with self._lock:
            self._batches += 1
            due = self.every_n_batches > 0 and self._batches % self.every_n_batches == 0
        if due:
            self.schedule()

    def schedule(self, force: bool = False) -> Future:
        """Starts a round on what was captured since the last one; the Future resolves at its swap."""
        fut: Future = Future()
        with self._lock:
            self._waiters.append(fut)
            self._forced |= force
            if not self._queue:
                data = self.buffer.since(self._next_serial)
                self._next_serial = self.buffer.serial
                self._rng.shuffle(data)
                bs = self.config.batch_size
                steps = self.config.max_steps if force else self._affordable_steps()
                self._queue = [data[i : i + bs] for i in range(0, len(data), bs)][:steps]
            if not self._queue:  # nothing new to learn from
                self._resolve()
        return fut

    def _affordable_steps(self) -> int:
        """Optimiser steps the time budget pays for now (the first round runs one, to measure)."""
        cfg = self.config
        if cfg.time_fraction <= 0:
            return cfg.max_steps
        if not self._step_s:
            return 1
        # a long serving stretch must not buy an unbounded burst: at most one full round
        self._budget_s = min(self._budget_s, cfg.max_steps * self._step_s)
        return max(0, min(cfg.max_steps, int(self._budget_s / self._step_s)))

    def credit(self, serving_seconds: float) -> None:
        """The engine spent `serving_seconds` on one step: time_fraction of it goes to the budget."""
        self._budget_s += self.config.time_fraction * serving_seconds

    def set_schedule(self, every_n_batches: int) -> None:
        """A round after every `every_n_batches` finished Generate requests (0: only when asked)."""
        if every_n_batches < 0:
            raise ValueError(f"every_n_batches must be >= 0, got {every_n_batches}")
        with self._lock:
            self.every_n_batches = every_n_batches

    def stats(self) -> DraftTraining:
        b = self.buffer.stats()
        return DraftTraining(self.store.version, self.every_n_batches, self.rounds, self.trainer.steps,
                                  self.last_loss, self.last_top1, self.samples_seen, self.seconds,
                                  b.sequences, b.bytes, b.dropped_sequences)

    # ---------------------------------------------------------------- background work (engine thread)
    def has_work(self) -> bool:
        return bool(self._queue)

    def urgent(self) -> bool:
        """A round asked for with TrainDraft interleaves with decoding; scheduled ones wait for idle."""
        return self._forced and bool(self._queue)

    def run_step(self) -> None:
        self.step()

    def capture(self, seq: FeatureSequence) -> None:
        if len(seq.tokens) >= 2:  # one pair has no next feature to learn from
            self.buffer.add(seq)

    def step(self) -> None:
        """One optimiser step of the current round; the last one swaps the result in."""
        with self._lock:
            if not self._queue:
                return
            batch = self._queue.pop(0)
            last = not self._queue
        t0 = self._clock()
        out = self.trainer.step(batch)
        self.last_loss = float(out.loss.detach())
        self.last_top1 = float(out.top1)
        self.samples_seen += sum(len(s.tokens) for s in batch)
        if last:
            self._swap()
        spent = self._clock() - t0
        self.seconds += spent
        self._budget_s -= spent
        self._step_s = spent if not self._step_s else 0.8 * self._step_s + 0.2 * spent
        if last:
            with self._lock:
                self._resolve()

    @torch.no_grad()
    def _swap(self) -> None:
        self.store.replace(self.shadow.state_dict(), self.store.version + 1)
        self.rounds += 1

    def _resolve(self) -> None:
        waiters, self._waiters = self._waiters, []
        self._forced = False
        for w in waiters:
            w.set_result(self.stats())

    @torch.no_grad()
    def sync_from_live(self) -> None:
        """Shadow := served head (after the draft was replaced from outside with UpdateWeights)."""
        self.shadow.load_state_dict(self.live.state_dict())
