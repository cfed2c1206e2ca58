"""Continuous-batching engine: one background thread owns the model, the cache and every sequence.

Each loop iteration is one engine step:
  1. run queued operations (weight updates) — this is the "between decode steps" point where they
     are applied atomically;
  2. drop sequences of cancelled requests;
  3. admit queued sequences into free cache slots and prefill them in one batched forward, which
     also samples their first token;
  4. one batched decode step over the sequences that were already running;
  5. finished sequences leave at once (their completion goes to the request's result queue) and
     free their slots for the next step's admissions;
  6. one piece of background work (a draft-training step), if any is waiting and may run now.
Callers talk to it only through `submit`, `run_exclusive`, `snapshot` and `wake`, all thread-safe;
it reports to its observers (metrics, draft learning) through `EngineObserver`.
"""
from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch

from fastgrpo.common.config import help_field
from fastgrpo.rollout.runtime import sampler
from fastgrpo.rollout.runtime.batch import ForwardBatch
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.scheduler.observer import BackgroundWork, EngineObserver
from fastgrpo.rollout.scheduler.requests import (EngineLimits, GenerationRequest, InvalidRequest, StepReport,
                                                 validate_request)
from fastgrpo.rollout.scheduler.sequence import RequestHandle, SequenceState, sequence_seed
from fastgrpo.rollout.speculative.controller import SpecController
from fastgrpo.rollout.speculative.draft_runner import Drafter
from fastgrpo.rollout.speculative.spec_step import SpecDecoder
from fastgrpo.rollout.speculative.tree import TreeShape
from fastgrpo.wire.records import Completion, FinishReason

T = TypeVar("T")


@dataclass(frozen=True)
class EngineConfig:
    """How many sequences the engine runs and holds (flags without a prefix: --max-running, ...)."""

    max_running: int = help_field(64, "most sequences decoding at once (KV-cache slots)")
    max_prefill_tokens: int = help_field(4096, "prompt tokens admitted into one prefill step (bounds prefill memory)")
    max_queued: int = help_field(4096, "sequences waiting for a slot; a request that would pass it is refused (RESOURCE_EXHAUSTED, or INVALID_ARGUMENT when it alone is larger)")


class Engine:
    def __init__(self, runner: ModelRunner, eos_token_ids: tuple[int, ...], config: EngineConfig = EngineConfig(),
                 drafter: Drafter | None = None, controller: SpecController | None = None,
                 observers: Iterable[EngineObserver] = ()):
        if config.max_running > runner.num_slots:
            raise ValueError(f"max_running {config.max_running} exceeds the cache's {runner.num_slots} slots")
        if (drafter is None) != (controller is None):
            raise ValueError("speculative decoding needs both a drafter and a speculation controller")
        if controller is not None and runner.cache.max_len < runner.max_len + controller.max_nodes():
            raise ValueError(f"the KV cache needs {controller.max_nodes()} positions of headroom for the largest tree")
        self.runner = runner
        self.observers = list(observers)
        self.spec = SpecDecoder(runner, drafter, controller.verify) if drafter is not None else None
        if self.spec is not None:
            self.spec.capture = any(o.wants_pairs for o in self.observers)
        elif any(o.wants_pairs for o in self.observers):
            raise ValueError("an observer wants draft pairs, but without a drafter the engine captures none")
        if controller is not None and controller.calibrator is not None:
            runner.observe_decode_forwards(controller.calibrator.observe)
        self.controller = controller
        self.background: list[BackgroundWork] = []
        self.last_tree: TreeShape | None = None  # tree of the latest decode step (None: plain)
        self.last_batch_size = 0
        self.config = config
        self._step_turn: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self.eos_token_ids = frozenset(eos_token_ids)
        self.limits = EngineLimits(vocab_size=runner.vocab_size, max_context=runner.max_len)
        self.policy_version = 0
        self._cv = threading.Condition()
        self._queue: deque[SequenceState] = deque()
        self._ops: list[tuple[Callable[[], object], Future]] = []
        self._running: list[SequenceState] = []
        self._prefilling: list[SequenceState] = []  # admitted this step, until their prefill is done
        self._free_slots = list(range(config.max_running - 1, -1, -1))
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="fastgrpo-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public, thread-safe
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validates (InvalidRequest) and queues every (prompt, sample) sequence of the request."""
        validate_request(request, self.limits)
        handle = RequestHandle(request, self.wake)
        s = request.sampling
        stop = frozenset(s.stop_token_ids) | (frozenset() if s.ignore_eos else self.eos_token_ids)
        base_seed = s.seed if s.seed is not None else secrets.randbits(63)
        n_new = len(request.prompts) * request.num_samples
        if n_new > self.config.max_queued:  # would never fit: not worth a retry
            raise InvalidRequest("num_samples", f"{len(request.prompts)} prompts x {request.num_samples} samples = "
                                                f"{n_new} sequences, more than the {self.config.max_queued} the queue "
                                                "holds (--max-queued); split the request")
        with self._cv:
            if len(self._queue) + n_new > self.config.max_queued:
                raise OverflowError(f"queue full: {len(self._queue)} sequences waiting and {n_new} more asked for, "
                                    f"limit {self.config.max_queued} (--max-queued); retry later")
            for i, prompt in enumerate(request.prompts):
                for j in range(request.num_samples):
                    gen = None
                    if s.temperature > 0:
                        gen = torch.Generator().manual_seed(sequence_seed(base_seed, i, j))
                    self._queue.append(SequenceState(handle, i, j, tuple(prompt), gen, stop, self.policy_version))
            self._cv.notify()
        return handle

    def run_exclusive(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Runs fn on the engine thread between two steps (no forward in flight) and returns its result."""
        fut: Future = Future()
        with self._cv:
            if self._stop:
                raise RuntimeError("engine is stopped")
            self._ops.append((fn, fut))
            self._cv.notify()
        return fut.result(timeout)

    def snapshot(self) -> dict:
        with self._cv:
            # sequences being prefilled have left the queue but not yet joined the running ones
            running = len(self._running) + len(self._prefilling)
            return {"running": running, "queued": len(self._queue), "policy_version": self.policy_version}

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)
        for seq in list(self._running) + list(self._queue):
            self._finish(seq, "abort")

    def wake(self) -> None:
        """Makes the engine thread look again (a request was cancelled, background work is waiting)."""
        with self._cv:
            self._cv.notify()

    def add_background(self, work: BackgroundWork) -> None:
        """Runs `work` between steps: while nothing decodes, or between decode steps when it is urgent."""
        with self._cv:
            self.background.append(work)
            self._cv.notify()

    def set_step_turn(self, turn: Callable[[], contextlib.AbstractContextManager]) -> None:
        """`turn()` is entered around every step on the engine thread: a benchmark that runs several
        engines in one process gives the machine to one step at a time (fastgrpo.bench.lockstep)."""
        self._step_turn = turn

    # ---------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._ops or self._queue or self._running
                           or any(w.has_work() for w in self.background)):
                    self._cv.wait()
                if self._stop:
                    ops, self._ops = self._ops, []
                    for _, fut in ops:
                        fut.set_exception(RuntimeError("engine is stopped"))
                    return
                ops, self._ops = self._ops, []
                self._drop_cancelled()
                admitted = self._prefilling = self._admit()
            for fn, fut in ops:
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # the caller gets the exception; the engine goes on
                    fut.set_exception(exc)
            try:
                with self._step_turn():
                    self._step(admitted)
            except BaseException as exc:  # a failing forward must not hang every caller
                for seq in {id(s): s for s in admitted + self._running}.values():
                    seq.handle._fail(exc)
                    self._release(seq)
                self._running, self._prefilling = [], []
            # background work takes the engine only between steps, one piece at a time
            for work in self.background:
                if work.has_work() and (not self._running or work.urgent()):
                    work.run_step()

    def _drop_cancelled(self) -> None:
        """Cancelled requests' sequences leave with an ABORT completion each, so that whoever
        iterates the handle (a Generate servicer thread) reaches the end instead of waiting forever."""
        if any(s.handle.cancelled for s in self._queue):
            dropped = [s for s in self._queue if s.handle.cancelled]
            self._queue = deque(s for s in self._queue if not s.handle.cancelled)
            for seq in dropped:
                self._finish(seq, "abort")
        for seq in [s for s in self._running if s.handle.cancelled]:
            self._running.remove(seq)
            self._finish(seq, "abort")

    def _admit(self) -> list[SequenceState]:
        admitted, budget = [], self.config.max_prefill_tokens
        while self._queue and self._free_slots:
            seq = self._queue[0]
            if admitted and len(seq.prompt) > budget:
                break
            self._queue.popleft()
            seq.slot = self._free_slots.pop()
            seq.min_version = self.policy_version
            budget -= len(seq.prompt)
            admitted.append(seq)
        return admitted

    def _step(self, admitted: list[SequenceState]) -> None:
        t0 = time.perf_counter()
        decoding = list(self._running)
        if admitted:
            self._prefill(admitted)
            with self._cv:
                self._running.extend(admitted)
                self._prefilling = []
        first_token_at = time.perf_counter()
        tokens_before = sum(len(s.generated) for s in decoding)
        accept_lengths: list[int] = []
        if decoding:
            for tree, adaptive, group in self._trees_for(decoding):
                if tree is None:
                    self._decode(group)
                else:
                    accept_lengths += self._spec_decode(group, tree, adaptive)
        report = StepReport(
            seconds=time.perf_counter() - t0,
            batch_size=len(decoding),
            decode_tokens=sum(len(s.generated) for s in decoding) - tokens_before,
            first_token_seconds=tuple(first_token_at - s.handle.submitted for s in admitted),
            accept_lengths=tuple(accept_lengths),
        )
        for observer in self.observers:
            observer.step_done(report)
        for seq in admitted + decoding:
            reason = self._finish_reason(seq)
            if reason is not None:
                self._running.remove(seq)
                self._finish(seq, reason)

    def _prefill(self, seqs: list[SequenceState]) -> None:
        dev = self.runner.device
        lens = torch.tensor([len(s.prompt) for s in seqs], device=dev)  # (B,)
        Q = int(lens.max())
        tokens = torch.zeros(len(seqs), Q, dtype=torch.long, device=dev)  # (B, Q) right-padded
        for b, s in enumerate(seqs):
            tokens[b, : len(s.prompt)] = torch.tensor(s.prompt, device=dev)
        positions = torch.arange(Q, device=dev)[None, :].expand(len(seqs), Q)  # (B, Q)
        slots = torch.tensor([s.slot for s in seqs], device=dev)  # (B,)
        batch = ForwardBatch(tokens, positions, slots, torch.zeros_like(slots))
        out = self.runner.forward(batch, logits_at=lens - 1)  # logits (B, V)
        for s in seqs:
            s.cached = len(s.prompt)
        self._sample_and_append(seqs, out.logits)
        if self.spec is not None:
            for b, s in enumerate(seqs):
                SpecDecoder.after_prefill(s.spec, s.prompt, s.generated[-1], out.hidden[b, : len(s.prompt)])

    def _decode(self, seqs: list[SequenceState]) -> None:
        dev = self.runner.device
        tokens = torch.tensor([[s.generated[-1]] for s in seqs], device=dev)  # (B, 1)
        starts = torch.tensor([s.cached for s in seqs], device=dev)  # (B,)
        slots = torch.tensor([s.slot for s in seqs], device=dev)  # (B,)
        out = self.runner.forward(ForwardBatch(tokens, starts[:, None], slots, starts))
        for s in seqs:
            s.cached += 1
        self._sample_and_append(seqs, out.logits[:, 0])
        if self.spec is not None:  # the draft catches up on plainly decoded tokens at its next step
            for b, s in enumerate(seqs):
                SpecDecoder.queue_pair(s.spec, out.hidden[b, 0], s.generated[-1])

    def _trees_for(self, seqs: list[SequenceState]) -> list[tuple[TreeShape | None, bool, list[SequenceState]]]:
        """Groups the decoding sequences by the tree each gets this step (None: plain decode) and
        whether the adaptive controller sized it.

        The live batch size B is every decoding sequence: the controller sizes trees so that the
        step's total verified tokens stay near C_peak. Requests may override the server's mode.
        """
        if self.controller is None:
            self.last_tree, self.last_batch_size = None, len(seqs)
            return [(None, False, seqs)]
        B = len(seqs)
        self.last_batch_size = B
        c_peak = self.controller.step_c_peak()
        trees: dict[str | None, TreeShape | None] = {}  # per request mode, computed once per step
        groups: dict[tuple[TreeShape | None, bool], list[SequenceState]] = {}
        for s in seqs:
            mode = s.handle.request.spec_mode
            if mode not in trees:
                trees[mode] = self.controller.tree_for(B, mode, c_peak)
            groups.setdefault((trees[mode], (mode or self.controller.mode) == "adaptive"), []).append(s)
        self.last_tree = trees[None] if None in trees else self.controller.tree_for(B, None, c_peak)
        return [(tree, adaptive, group) for (tree, adaptive), group in groups.items()]

    def _spec_decode(self, seqs: list[SequenceState], tree: TreeShape, adaptive: bool) -> list[int]:
        """One draft-and-verify step; returns the tokens each sequence's verify step emitted.
        Adaptive trees report how deep their accepted paths reached (the controller's alpha)."""
        dev = self.runner.device
        steps = self.spec.step(
            slots=torch.tensor([s.slot for s in seqs], device=dev),
            settled=torch.tensor([s.cached for s in seqs], device=dev),
            roots=torch.tensor([s.generated[-1] for s in seqs], device=dev),
            states=[s.spec for s in seqs],
            params=self._sampling_batch(seqs),
            generators=[s.generator for s in seqs],
            shape=tree,
        )
        for s, st in zip(seqs, steps):
            s.cached += st.accepted + 1  # the root and the accepted draft tokens are now in the cache
            self._append(s, st.tokens, st.logprobs)
        if adaptive and self.controller.calibrator is not None and tree.n_verify > 2:
            # (a two-node tree is one level deep whatever alpha says: it tells nothing about alpha)
            self.controller.calibrator.observe_acceptance([st.depth for st in steps], [st.accepted for st in steps])
        return [st.accepted + 1 for st in steps]

    @staticmethod
    def _append(seq: SequenceState, tokens: list[int], logprobs: list[float]) -> None:
        """Appends tokens up to and including the first stop token, and at most up to max_new_tokens."""
        for t, lp in zip(tokens, logprobs):
            seq.generated.append(t)
            seq.logprobs.append(lp)
            if t in seq.stop_ids or len(seq.generated) >= seq.sampling.max_new_tokens:
                return

    def _sample_and_append(self, seqs: list[SequenceState], logits: torch.Tensor) -> None:
        """logits (B, V) of the next token of each sequence -> one token each, with its logprob."""
        params = self._sampling_batch(seqs)
        logp_sample = sampler.sampling_logprobs(logits, params)  # (B, V)
        noise = torch.ones_like(logp_sample, dtype=torch.float64)  # (B, V); greedy rows: one-hot wins
        sampled_rows = [b for b, s in enumerate(seqs) if s.generator is not None]
        if sampled_rows:
            gens = [seqs[b].generator for b in sampled_rows]
            noise[sampled_rows] = sampler.exponential_noise(gens, logits.shape[-1], logits.device)
        tokens = sampler.sample_from_logprobs(logp_sample, noise)  # (B,)
        logp = sampler.gather_rows(sampler.policy_logprobs(logits, params.temperature), tokens)  # (B,)
        for s, t, lp in zip(seqs, tokens.tolist(), logp.tolist()):
            s.generated.append(t)
            s.logprobs.append(lp)

    def _sampling_batch(self, seqs: list[SequenceState]) -> sampler.SamplingBatch:
        dev = self.runner.device
        return sampler.SamplingBatch(
            temperature=torch.tensor([s.sampling.temperature for s in seqs], device=dev, dtype=torch.float32),
            top_k=torch.tensor([s.sampling.top_k for s in seqs], device=dev, dtype=torch.long),
            top_p=torch.tensor([s.sampling.top_p for s in seqs], device=dev, dtype=torch.float32),
        )

    @staticmethod
    def _finish_reason(seq: SequenceState) -> FinishReason | None:
        if seq.generated and seq.generated[-1] in seq.stop_ids:
            return "stop"
        if len(seq.generated) >= seq.sampling.max_new_tokens:
            return "length"
        return None

    def _release(self, seq: SequenceState) -> None:
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def _finish(self, seq: SequenceState, reason: FinishReason) -> None:
        self._release(seq)
        pairs = None
        if self.spec is not None and self.spec.capture and reason != "abort" and seq.spec.pending_chunks:
            pairs = SpecDecoder.captured(seq.spec)
        result = Completion(
            request_id=seq.handle.request.request_id,
            prompt_index=seq.prompt_index,
            sample_index=seq.sample_index,
            token_ids=list(seq.generated),
            logprobs=list(seq.logprobs),
            finish_reason=reason,
            policy_version=seq.min_version,
            spec=seq.spec.stats(),
        )
        seconds = time.perf_counter() - seq.handle.submitted
        for observer in self.observers:
            observer.sequence_done(result, seconds, pairs)
        seq.handle._deliver(result)
        if seq.handle._remaining == 0 and not seq.handle.cancelled:
            for observer in self.observers:
                observer.request_done(seq.handle.request)
