"""Continuous-batching engine: one background thread owns the model, the cache and every sequence.

Each loop iteration is one engine step:
  1. run queued operations (weight updates) — this is the "between decode steps" point where they
     are applied atomically;
  2. drop sequences of cancelled requests;
  3. admit queued sequences while KV-cache blocks allow (runtime.blocks) and prefill them in one
     batched forward, which also samples their first token. The samples of one prompt share its
     full blocks and are prefilled once (the partly filled last block is copied for each); a prompt
     prefix still cached from an earlier sequence is not computed again;
  4. one batched decode step over the sequences that were already running; when their next tokens
     need more blocks than are free, the most recently admitted sequences are preempted (blocks
     freed, queued again at the front, recomputed by a prefill when readmitted);
  5. finished sequences leave at once (their completion goes to the request's result queue) and
     release their blocks for the next step's admissions;
  6. one piece of background work (a draft-training step), if any is waiting and may run now.
Callers talk to it only through `submit`, `run_exclusive`, `snapshot` and `wake`, all thread-safe;
it reports to its observers (metrics, draft learning) through `EngineObserver`.
"""
from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, TypeVar

import torch

from fastgrpo.common.config import help_field
from fastgrpo.rollout.runtime import packed, sampler
from fastgrpo.rollout.runtime.batch import ForwardBatch
from fastgrpo.rollout.runtime.blocks import BlockManager, blocks_for
from fastgrpo.rollout.runtime.kv_cache import kv_budget_bytes, padded_tables, token_slots
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.runtime.steps import DecodeStep, batch_buckets, compiled_batch, to_host_rows
from fastgrpo.rollout.runtime.threads import use_threads
from fastgrpo.rollout.scheduler.observer import BackgroundWork, EngineObserver
from fastgrpo.rollout.scheduler.requests import (EngineLimits, GenerationRequest, InvalidRequest, KVCacheTooSmall,
                                                 StepReport, validate_request)
from fastgrpo.rollout.scheduler.sequence import Admission, RequestHandle, SequenceState, sequence_seed
from fastgrpo.rollout.speculative.controller import SpecController
from fastgrpo.rollout.speculative.draft_runner import Drafter
from fastgrpo.rollout.speculative.spec_step import SpecDecoder
from fastgrpo.rollout.speculative.chooser import StepChooser, Way
from fastgrpo.rollout.speculative.text_drafts import Proposal, TextDrafts
from fastgrpo.rollout.speculative.tree import TreeShape
from fastgrpo.wire.records import Completion, FinishReason

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """How many sequences the engine runs and holds (flags without a prefix: --max-running, ...)."""

    max_running: int = help_field(64, "most sequences decoding at once")
    max_prefill_tokens: int = help_field(4096, "prompt tokens admitted into one prefill step (bounds prefill memory)")
    kv_cache_memory: str = help_field("auto", "KV-cache budget: bytes with an optional suffix (e.g. 512MiB, 2GiB, 4G), or auto: --kv-cache-fraction of the device memory free after loading the models on a GPU, a quarter of the available memory (at most 4 GiB) on the CPU; never more than --max-running full contexts need")
    kv_cache_fraction: float = help_field(0.8, "share of the GPU memory free after loading the models that an auto KV-cache budget takes")
    kv_block_size: int = help_field(16, "tokens per KV-cache block")
    prefix_sharing: bool = help_field(True, "the samples of a prompt share its KV-cache blocks and prefill it once, and later sequences reuse a prompt prefix still cached (off: every sequence prefills its own prompt)")
    attention_backend: Literal["gather", "flex"] = help_field("gather", "how attention reads the paged KV cache: gather (copies the blocks a forward reads, then SDPA) or flex (FlexAttention reads them in place; compiled at start-up, needs a C++ compiler on the CPU; faster at large-batch decode, slower at prefill and deep trees on the CPU: see fastgrpo-bench kv)")
    compile: Literal["auto", "on", "off"] = help_field("auto", "torch.compile the decode steps (plain; speculative draft and verify), the batch padded to a power of two (CUDA graphs on a GPU): auto = on on CUDA, off on the CPU; on the CPU, on compiles the batches of at most 4, where it pays; compiling takes a while at start-up (logged, and /readyz says so)")
    cpu_linears: Literal["packed", "tuned"] = help_field("tuned", "float32 projections on the CPU: tuned = MKL's or oneDNN's, whichever measures faster per row count (faster where MKL's matrix-vector product is good, e.g. 1-2 rows on an Intel Xeon), timed at the first start on a machine (about a second) and remembered under the cache ($FASTGRPO_CACHE/linears/, per CPU, torch version, thread count and model shapes; delete a file to time again), so restarts take the same ops and reproduce their logits bit for bit; packed = oneDNN's packed op at every row count, nothing timed")
    max_queued: int = help_field(4096, "sequences waiting to be admitted; a request that would pass it is refused (RESOURCE_EXHAUSTED, or INVALID_ARGUMENT when it alone is larger)")


class Engine:
    def __init__(self, runner: ModelRunner, eos_token_ids: tuple[int, ...], config: EngineConfig = EngineConfig(),
                 drafter: Drafter | None = None, controller: SpecController | None = None,
                 observers: Iterable[EngineObserver] = (), text_drafts: TextDrafts | None = None):
        """Speculative decoding needs a controller and a source of drafts: the drafter (the draft
        head), text_drafts (chains from the sibling samples' and earlier completions' text:
        speculative.text_drafts), or both in one tree."""
        if (controller is None) != (drafter is None and text_drafts is None):
            raise ValueError("speculative decoding needs a speculation controller and a drafter or text drafts")
        if controller is not None and runner.max_positions < runner.max_len + controller.max_nodes():
            raise ValueError(f"the runner needs {controller.max_nodes()} positions of headroom for the largest tree")
        self.runner = runner
        # most positions past the settled ones a decode step may write (the target's tree, the
        # draft's); a step reserves what its own trees write (_tree_lookahead), admission what the
        # latest step's largest tree did
        self.lookahead = 1 if controller is None else max(controller.max_nodes(), controller.draft_headroom()) + 1
        self._lookahead_hint = 1
        self.kv_bytes_per_block = self._bytes_per_block(runner, drafter, config.kv_block_size)
        # the target features of every cached position (num_blocks * block_size, H), with a draft
        self.blocks, self._features = self._allocate_cache(runner, drafter, config, self.kv_bytes_per_block)
        self.preemptions = 0
        self.shared_prompt_tokens = 0  # prompt tokens served from shared blocks instead of being prefilled
        self.observers = list(observers)
        compiled = compiled_batch(config.compile, runner.device, config.max_running)
        self.decode_step = DecodeStep(runner, compiled, config.max_running)
        # which of MKL's and oneDNN's linears runs at each row count (process-wide: the latest engine's say)
        if config.cpu_linears not in ("packed", "tuned"):
            raise ValueError(f"--cpu-linears must be packed or tuned; got {config.cpu_linears!r}")
        linears = [m for m in runner.model.modules() if isinstance(m, torch.nn.Linear)] if config.cpu_linears == "tuned" else []
        self.warmup_seconds = packed.tune(linears, remember=packed.choice_path(linears) if linears else None)
        self.warmup_seconds += self.decode_step.warm_up()
        self.spec = None
        if controller is not None:
            self.spec = SpecDecoder(runner, drafter, controller.verify, compiled, config.max_running)
            self.spec.capture = drafter is not None and any(o.wants_pairs for o in self.observers)
            self.warmup_seconds += self.spec.warm_up(
                {size: controller.tree_for(size) for size in batch_buckets(self.spec.compiled_batch, config.max_running)})
        if drafter is None and any(o.wants_pairs for o in self.observers):
            raise ValueError("an observer wants draft pairs, but without a drafter the engine captures none")
        if controller is not None and controller.calibrator is not None:
            runner.observe_decode_forwards(controller.calibrator.observe)
        self.controller = controller
        self.text_drafts = text_drafts
        self.chooser = StepChooser()  # speculative steps: plainly, with the text chains alone, or with the head
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
        self._stop = False
        # the thread count of the thread that built the engine: the engine thread computes with it
        # (runtime.threads: other threads of a serving process run torch on one thread)
        self._torch_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="fastgrpo-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def _bytes_per_block(runner: ModelRunner, drafter: Drafter | None, block_size: int) -> int:
        """Target KV, and with a draft: its KV and the target features its catch-ups read."""
        size = runner.kv_bytes_per_block(block_size)
        if drafter is not None:
            size += drafter.kv_bytes_per_block(block_size) + block_size * runner.config.hidden_size * runner.dtype.itemsize
        return size

    def _allocate_cache(self, runner: ModelRunner, drafter: Drafter | None, config: EngineConfig,
                        per_block: int) -> tuple[BlockManager, torch.Tensor | None]:
        bs = config.kv_block_size
        if bs < 1:
            raise ValueError(f"--kv-block-size must be >= 1, got {bs}")
        runner.cache = None  # a profile's cache goes before the budget is measured
        if drafter is not None:
            drafter.cache = None
        budget = kv_budget_bytes(config.kv_cache_memory, config.kv_cache_fraction, runner.device)
        # more blocks than max_running full contexts could ever hold would only sit idle (+1: scratch)
        enough = config.max_running * blocks_for(runner.max_len + self.lookahead, bs) + 1
        num_blocks = min(budget // per_block, enough)
        if num_blocks < 2:
            raise ValueError(f"a KV-cache budget of {budget} bytes holds no {bs}-token block ({per_block} bytes with "
                             "every layer); raise --kv-cache-memory")
        if num_blocks - 1 < blocks_for(runner.max_len + self.lookahead, bs):
            log.warning("the KV cache (%d blocks of %d tokens, %.1f MiB) holds fewer tokens than one full %d-token "
                        "context: longer requests are refused", num_blocks - 1, bs, num_blocks * per_block / 2**20,
                        runner.max_len)
        backend = config.attention_backend
        runner.allocate_cache(num_blocks, bs, backend)
        features = None
        if drafter is not None:
            drafter.allocate_cache(num_blocks, bs, backend)
            features = torch.zeros(num_blocks * bs, runner.config.hidden_size, dtype=runner.dtype, device=runner.device)
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks - 1, bs, num_blocks * per_block / 2**20)
        return BlockManager(num_blocks, bs), features

    # ---------------------------------------------------------------- public, thread-safe
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validates (InvalidRequest) and queues every (prompt, sample) sequence of the request."""
        validate_request(request, self.limits)
        self._check_fits(request)
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
                    seed = sequence_seed(base_seed, i, j) if s.temperature > 0 else 0
                    self._queue.append(SequenceState(handle, i, j, tuple(prompt), seed, stop, self.policy_version))
            self._cv.notify()
        return handle

    def _check_fits(self, request: GenerationRequest) -> None:
        """Refuses a request one of whose sequences could not fit the whole KV cache even alone."""
        total = self.blocks.num_blocks - 1
        longest = max(len(p) for p in request.prompts)
        tokens = longest + request.sampling.max_new_tokens - 1 + self.lookahead
        need = blocks_for(tokens, self.blocks.block_size)
        if need > total:
            raise KVCacheTooSmall(
                f"a prompt of {longest} tokens with max_new_tokens {request.sampling.max_new_tokens} needs {need} KV-cache "
                f"blocks ({need * self.kv_bytes_per_block / 2**20:.1f} MiB, {tokens} tokens with "
                f"{self.lookahead - 1} speculative positions); the cache holds {total} "
                f"({total * self.kv_bytes_per_block / 2**20:.1f} MiB, --kv-cache-memory): shorten the prompt or "
                "max_new_tokens, or raise the budget")

    def set_policy_version(self, version: int) -> None:
        """The policy weights changed (on the engine thread, between steps): cached prompt blocks
        hold keys and values of the old weights, so no later sequence may share them."""
        self.policy_version = version
        self.blocks.forget_prefixes()

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
            return {"running": running, "queued": len(self._queue), "policy_version": self.policy_version,
                    "kv_blocks": self.blocks.stats(), "preemptions": self.preemptions,
                    "shared_prompt_tokens": self.shared_prompt_tokens}

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
        use_threads(self._torch_threads)
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
                    if self.text_drafts is not None:
                        self.text_drafts.close(id(seq.handle))
                self._running, self._prefilling = [], []
                self.blocks.forget_prefixes()  # blocks registered this step may never have been written
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
        """Takes queued sequences while the batch, the prefill budget and the free KV blocks allow;
        the blocks that running sequences may need for their next step are kept back."""
        admitted, budget = [], self.config.max_prefill_tokens
        reserve = sum(self._growth(s, self._lookahead_hint) for s in self._running)
        leaders: dict[tuple[int, ...], SequenceState] = {}  # prompt -> its sequence admitted this step
        while self._queue and len(self._running) + len(admitted) < self.config.max_running:
            seq = self._queue[0]
            plan = self._plan(seq, leaders.get(seq.prompt) if not seq.recompute else None)
            if admitted and plan.compute > budget:
                break
            if plan.takes + reserve > self.blocks.available:
                break
            self._queue.popleft()
            self._take(seq, plan)
            if not seq.recompute:
                seq.min_version = self.policy_version
                leaders.setdefault(seq.prompt, seq)
            budget -= plan.compute
            admitted.append(seq)
        return admitted

    def _growth(self, seq: SequenceState, lookahead: int) -> int:
        """Blocks seq needs beyond its own to write `lookahead` positions past its settled tokens."""
        return max(0, blocks_for(seq.cached + lookahead, self.blocks.block_size) - len(seq.blocks))

    def _plan(self, seq: SequenceState, leader: SequenceState | None) -> Admission:
        """How seq enters the cache: which prompt blocks it shares and from where it computes.

        Only full blocks before the prompt's last token are shared (the block holding the last
        token also holds the draft's pair for the sample's first token, which differs per sample).
        A sample whose prompt's leader was admitted this step shares the leader's blocks and copies
        its last one after the prefill, computing nothing; any other sequence shares what the
        prefix cache knows of its prompt and computes the rest.
        """
        bs = self.blocks.block_size
        context = seq.prompt + tuple(seq.generated[:-1])  # recomputing: all but the last token generated
        n_share = (len(seq.prompt) - 1) // bs
        blocks = blocks_for(len(context) + self._lookahead_hint, bs)
        if not self.config.prefix_sharing:
            return Admission(context, [], [], blocks, blocks, 0, None)
        if leader is not None:
            shared = leader.blocks[:n_share]
            return Admission(context, shared, [], blocks, blocks - n_share, len(context), leader)
        digests = self.blocks.digests(seq.prompt, n_share)
        shared = self.blocks.lookup(digests)
        takes = blocks - len(shared) + sum(1 for b in shared if self.blocks.refs(b) == 0)
        return Admission(context, shared, digests, blocks, takes, len(shared) * bs, None)

    def _take(self, seq: SequenceState, plan: Admission) -> None:
        for block in plan.shared:
            self.blocks.hold(block)
        seq.blocks = plan.shared + self.blocks.allocate(plan.blocks - len(plan.shared))
        self.blocks.register(plan.digests, seq.blocks)  # known blocks keep their entry
        seq.admission = plan

    def _step(self, admitted: list[SequenceState]) -> None:
        t0 = time.perf_counter()
        decoding = list(self._running)
        fresh = [s for s in admitted if not s.recompute]  # (recomputed ones had their first token)
        if self.text_drafts is not None:
            for s in admitted:
                self.text_drafts.begin(id(s.handle))
        if admitted:
            self._prefill(admitted)
            with self._cv:
                self._running.extend(admitted)
                self._prefilling = []
        first_token_at = time.perf_counter()
        accept_lengths: list[int] = []
        decode_tokens = 0
        if decoding:
            groups = self._reserve(self._trees_for(decoding))
            decoding = [s for _, _, group in groups for s in group]
            tokens_before = sum(len(s.generated) for s in decoding)
            for tree, adaptive, group in groups:
                if tree is None:
                    self._decode(group)
                else:
                    accept_lengths += self._spec_decode(group, tree, adaptive)
            decode_tokens = sum(len(s.generated) for s in decoding) - tokens_before
        report = StepReport(
            seconds=time.perf_counter() - t0,
            batch_size=len(decoding),
            decode_tokens=decode_tokens,
            first_token_seconds=tuple(first_token_at - s.handle.submitted for s in fresh),
            accept_lengths=tuple(accept_lengths),
        )
        for observer in self.observers:
            observer.step_done(report)
        for seq in admitted + decoding:
            reason = self._finish_reason(seq)
            if reason is not None and seq in self._running:
                self._running.remove(seq)
                self._finish(seq, reason)

    def _reserve(self, groups: list[tuple[TreeShape | None, bool, list[SequenceState]]]
                 ) -> list[tuple[TreeShape | None, bool, list[SequenceState]]]:
        """Gives every decoding sequence the blocks its step writes into, preempting the most
        recently admitted sequences while they do not fit. Returns the groups without the preempted."""
        def need() -> int:
            return sum(self._growth(s, self._tree_lookahead(tree)) for tree, _, g in groups for s in g)
        self._lookahead_hint = max(self._tree_lookahead(tree) for tree, _, _ in groups)
        while need() > self.blocks.available:
            victim = self._running[-1]
            self._preempt(victim)
            groups = [(tree, adaptive, [s for s in g if s is not victim]) for tree, adaptive, g in groups]
        groups = [(tree, adaptive, g) for tree, adaptive, g in groups if g]
        for tree, _, group in groups:
            for s in group:
                s.blocks += self.blocks.allocate(self._growth(s, self._tree_lookahead(tree)))
        return groups

    @staticmethod
    def _tree_lookahead(tree: TreeShape | None) -> int:
        """Positions from the settled length on that a step with this tree writes: the target's
        nodes, and the draft's K per expanded level (fewer for sampled layouts)."""
        return 1 if tree is None else max(tree.n_verify, tree.width * tree.depth) + 1

    def _preempt(self, seq: SequenceState) -> None:
        """Frees seq's blocks and queues it first, to be recomputed from its tokens when readmitted."""
        self._running.remove(seq)
        self._release(seq)
        seq.cached = 0
        seq.recompute = True
        self.preemptions += 1
        with self._cv:
            self._queue.appendleft(seq)

    def _table(self, seqs: list[SequenceState]) -> torch.Tensor:
        """(B, nb) block tables of seqs, padded with the scratch block."""
        return padded_tables([s.blocks for s in seqs], max(len(s.blocks) for s in seqs), self.runner.device)

    def _prefill(self, seqs: list[SequenceState]) -> None:
        """One forward over the admitted sequences that compute anything (every token from their
        first unshared one); samples their first tokens (not for recomputed sequences, whose next
        token exists); the samples that share a leader's prompt copy its last block and its logits."""
        dev = self.runner.device
        bs = self.blocks.block_size
        rows = [s for s in seqs if s.admission.leader is None]
        starts = torch.tensor([s.admission.compute_from for s in rows], device=dev)  # (R,)
        lens = torch.tensor([len(s.admission.context) for s in rows], device=dev)  # (R,)
        Q = int((lens - starts).max())
        tokens = torch.zeros(len(rows), Q, dtype=torch.long, device=dev)  # (R, Q) right-padded
        for r, s in enumerate(rows):
            tokens[r, : len(s.admission.context) - s.admission.compute_from] = torch.tensor(
                s.admission.context[s.admission.compute_from:], device=dev)
        positions = starts[:, None] + torch.arange(Q, device=dev)[None, :]  # (R, Q)
        table = self._table(rows)
        out = self.runner.forward(ForwardBatch(tokens, positions, table, starts), logits_at=lens - starts - 1)
        if self._features is not None:  # the features of every computed position, for the draft
            self._features[token_slots(table, positions, bs).reshape(-1)] = out.hidden.reshape(-1, out.hidden.shape[-1])
        # copy on write of the prompt's last block: the one after those a follower shares
        followers = [s for s in seqs if s.admission.leader is not None]
        src = [s.admission.leader.blocks[len(s.admission.shared)] for s in followers]
        dst = [s.blocks[len(s.admission.shared)] for s in followers]
        self.runner.cache.copy_blocks(src, dst)
        if self._features is not None and followers:
            features = self._features.view(-1, bs, self._features.shape[-1])  # (num_blocks, bs, H)
            features[torch.tensor(dst, device=dev)] = features[torch.tensor(src, device=dev)]
        row_of = {id(s): r for r, s in enumerate(rows)}
        sampling = [s for s in seqs if not s.recompute]
        if sampling:
            pick = torch.tensor([row_of[id(s.admission.leader or s)] for s in sampling], device=dev)
            self._sample_and_append(sampling, out.logits[pick])
        if self._features is not None:  # pool slots of every context position, for the draft's features
            n = max(len(s.admission.context) for s in seqs)
            slots = token_slots(self._table(seqs), torch.arange(n, device=dev)[None].expand(len(seqs), n), bs)
        for b, s in enumerate(seqs):
            s.cached = len(s.admission.context)
            self.shared_prompt_tokens += s.admission.compute_from
            if self._features is not None:
                SpecDecoder.after_prefill(s.spec, s.admission.context, s.generated[-1],
                                          self._features[slots[b, : s.cached]], len(s.prompt))
            s.admission = None
            s.recompute = False

    def _decode(self, seqs: list[SequenceState]) -> None:
        t0 = time.perf_counter()
        out = self.decode_step([s.generated[-1] for s in seqs], [s.cached for s in seqs], [s.blocks for s in seqs],
                               [self._params(s) for s in seqs], [s.seed for s in seqs],
                               [len(s.generated) for s in seqs])
        self._append_drawn(seqs, out.tokens, out.logprobs)
        self.runner.report_decode(len(seqs), time.perf_counter() - t0)
        # the draft catches up on plainly decoded tokens at its next step: each row's (1, H) feature,
        # cut in one call (indexing row by row cost 0.6 ms a step at B = 128, a few % of a small model's step)
        features = out.hidden[:, None].unbind(0) if self._features is not None else None
        for b, s in enumerate(seqs):
            s.cached += 1
            if features is not None:
                SpecDecoder.queue_pair(s.spec, features[b], s.generated[-1])

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
        B = self.spec.batch_size(B)  # the rows a step computes: a compiled step's batch bucket
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
        """One step of sequences given a tree: draft and verify, or decode plainly where that is
        measured to be faster (StepChooser); returns the tokens each verify step emitted (none for a
        plain step). Adaptive trees report how deep their accepted paths reached (the controller's alpha)."""
        regime = self._with_history(seqs)  # (the chooser keeps its rates apart by it)
        ways = self._ways(adaptive, regime)
        # the C_peak calibrator's probe: verified as sized (its latency is the point) and not taken
        # as its way's speed -- unless plain decoding is the fastest way at this batch size, where
        # trees are not used and a probe would only cost
        probe = adaptive and self.controller.probing and self.chooser.leader(len(seqs), ways, regime) != "plain"
        if probe or not self.controller.choose:
            way = ways[0]
        else:
            way = self.chooser.choose(len(seqs), ways, regime)
        t0 = time.perf_counter()  # (a way's time includes its proposals: host work a plain step skips)
        chains = None  # (the proposals cost a lookup per sequence: none for a plain step)
        estimate = None
        if way != "plain" and self.text_drafts is not None:
            chains = [self._proposal(s, tree) for s in seqs]
            if way == "text" and not any(chains):
                way = "plain"
            elif (not probe and "text" in ways and "head" in ways
                  and way == self.chooser.leader(len(seqs), ways, regime)):
                # the leader is the head or the chains alone: whichever this step's chains make faster
                estimates = {w: self.spec.expected_tokens(chains, tree, head=w == "head") for w in ("head", "text")}
                way = self.chooser.refine(len(seqs), estimates, regime)
                estimate = estimates[way]
        if way == "plain":
            self._decode(seqs)
            self.chooser.record(len(seqs), way, len(seqs), 0.0 if probe else time.perf_counter() - t0, regime)
            return []
        steps = self.spec.step(roots=[s.generated[-1] for s in seqs], settled=[s.cached for s in seqs],
                               tables=[s.blocks for s in seqs], states=[s.spec for s in seqs],
                               params=[self._params(s) for s in seqs], seeds=[s.seed for s in seqs],
                               drawn=[len(s.generated) for s in seqs], shape=tree, chains=chains, head=way == "head")
        took = 0.0 if probe else time.perf_counter() - t0  # (a probe's time is not its way's speed)
        self.chooser.record(len(seqs), way, sum(st.accepted + 1 for st in steps), took, regime, estimate)
        for s, st in zip(seqs, steps):
            s.cached += st.accepted + 1  # the root and the accepted draft tokens are now in the cache
            self._append(s, st.tokens, st.logprobs)
        if adaptive and self.controller.calibrator is not None and tree.n_verify > 2:
            # (a two-node tree is one level deep whatever alpha says: it tells nothing about alpha)
            self.controller.calibrator.observe_acceptance([st.depth for st in steps], [st.accepted for st in steps])
        return [st.accepted + 1 for st in steps]

    def _ways(self, plain: bool, with_history: bool) -> list[Way]:
        """The ways a step may take: with the head if there is one, with the text chains alone if
        the sources include text (a step without any chain then runs plainly) and, where there is
        a head, most rows have history, plainly if the controller sizes the trees (a fixed tree is
        what was asked for) or nothing else is open; the first is the tree as sized.

        Without history the chains come from the siblings alone, which write in step with each
        other and so rarely ahead of one another: short, seldom accepted (chains alone ran at
        0.4-0.8x plain's tokens/s at B = 2-16 on the CPU here). Their confident tokens still join
        a head step's tree; a way of their own would only cost its tries."""
        ways: list[Way] = []
        if self.spec.drafter is not None:
            ways.append("head")
        if self.text_drafts is not None and (with_history or self.spec.drafter is None):
            ways.append("text")
        if plain or not ways:
            ways.append("plain")
        return ways

    def _with_history(self, seqs: list[SequenceState]) -> bool:
        """Whether most of seqs can draft from their prompt's earlier completions: text chains are
        worth another kind of thing with them (long, often accepted) than without (siblings'
        rare repeats), so the chooser rates the ways apart for the two."""
        if self.text_drafts is None or self.text_drafts.history is None:
            return False
        have = sum(self.text_drafts.has_history(self._group_key(s), s.prompt, self.policy_version) for s in seqs)
        return 2 * have >= len(seqs)

    @property
    def accepted_by_source(self) -> dict[str, int]:
        """Draft tokens accepted since start, by source (head, siblings, history); zeros without speculation."""
        return dict(self.spec.accepted_by_source) if self.spec else {"head": 0, "siblings": 0, "history": 0}

    @staticmethod
    def _group_key(seq: SequenceState) -> tuple[int, int]:
        return id(seq.handle), seq.prompt_index

    def _proposal(self, seq: SequenceState, tree: TreeShape) -> Proposal | None:
        """seq's text chain for this step: from what its siblings (and itself) wrote so far and the
        prompt's earlier completions; at most as long as the tree could keep."""
        group = self.text_drafts.group(self._group_key(seq), seq.prompt, self.policy_version)
        return self.text_drafts.propose(group, seq.sample_index, seq.prompt, seq.generated, tree.n_verify - 1)

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
        seeds, drawn = self._noise(seqs)
        truncate = sampler.truncates([self._params(s) for s in seqs])
        tokens, logp = sampler.sample_no_sync(logits, self._sampling_batch(seqs), seeds,
                                              sampler.draw_counters(drawn, sampler.STREAM_TOKEN), truncate)
        self._append_drawn(seqs, tokens, logp)

    @staticmethod
    def _append_drawn(seqs: list[SequenceState], tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Each sequence's drawn token (B,) and its logprob (B,), fetched in the step's one transfer."""
        for s, (t, lp) in zip(seqs, to_host_rows(tokens, logprobs)):
            s.generated.append(int(t))
            s.logprobs.append(lp)

    def _noise(self, seqs: list[SequenceState]) -> tuple[torch.Tensor, torch.Tensor]:
        """The counter-based noise's inputs on the device: seeds (B,), and tokens drawn so far (B,)."""
        dev = self.runner.device
        return (torch.tensor([s.seed for s in seqs], device=dev),
                torch.tensor([len(s.generated) for s in seqs], device=dev))

    @staticmethod
    def _params(seq: SequenceState) -> tuple[float, int, float]:
        return seq.sampling.temperature, seq.sampling.top_k, seq.sampling.top_p

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
        self.blocks.release(seq.blocks)
        seq.blocks = []

    def _finish(self, seq: SequenceState, reason: FinishReason) -> None:
        self._release(seq)
        if self.text_drafts is not None:
            self.text_drafts.finished(self._group_key(seq), seq.prompt, seq.sample_index, seq.generated,
                                      seq.min_version, keep=reason != "abort")
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
        if seq.handle._remaining == 0 and self.text_drafts is not None:
            self.text_drafts.close(id(seq.handle))
        if seq.handle._remaining == 0 and not seq.handle.cancelled:
            for observer in self.observers:
                observer.request_done(seq.handle.request)
