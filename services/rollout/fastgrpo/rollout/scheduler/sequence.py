"""A submitted request's handle, and the state of each sequence it runs."""
from __future__ import annotations

import hashlib
import queue
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from fastgrpo.rollout.scheduler.requests import GenerationRequest
from fastgrpo.rollout.speculative.spec_step import SpecState
from fastgrpo.wire.records import Completion, Sampling

_DONE = object()  # end-of-stream marker in a request's result queue


class RequestHandle:
    """Results of one submitted request, in finishing order. Iterate to receive them."""

    def __init__(self, request: GenerationRequest, wake: Callable[[], None]):
        """wake: tells the engine thread to look again (it drops a cancelled request's sequences)."""
        self.request = request
        self.submitted = time.perf_counter()
        self._wake = wake
        self._results: queue.Queue = queue.Queue()
        self._remaining = len(request.prompts) * request.num_samples
        self.cancelled = False

    def __iter__(self) -> Iterator[Completion]:
        while True:
            item = self._results.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """Drop this request's queued and running sequences at the next step."""
        self.cancelled = True
        self._wake()

    def _deliver(self, result: Completion) -> None:
        self._results.put(result)
        self._remaining -= 1
        if self._remaining == 0:
            self._results.put(_DONE)

    def _fail(self, exc: BaseException) -> None:
        self._results.put(exc)


@dataclass(frozen=True)
class Admission:
    """How an admitted sequence enters the KV cache (Engine._plan)."""

    context: tuple[int, ...]  # tokens to have in the cache after the prefill
    shared: list[int]  # leading blocks it shares (held once more), computed by others
    digests: list[bytes]  # prefix digests of its prompt's shareable blocks, to register
    blocks: int  # blocks it holds once admitted (shared ones included)
    takes: int  # blocks admission takes from the available ones (new, and cached ones it revives)
    compute_from: int  # first position it computes (len(context): none, it copies its leader's)
    leader: SequenceState | None  # the sample of the same prompt admitted with it that computes it

    @property
    def compute(self) -> int:
        return len(self.context) - self.compute_from


@dataclass(eq=False)
class SequenceState:
    """One (prompt, sample) of a request, from queued to finished: its tokens, logprobs, KV-cache
    blocks and speculative state."""

    handle: RequestHandle
    prompt_index: int
    sample_index: int
    prompt: tuple[int, ...]
    seed: int  # of its sampling noise (sampler.counter_uniforms); 0 for greedy
    stop_ids: frozenset[int]
    min_version: int
    blocks: list[int] = field(default_factory=list)  # KV-cache block table (runtime.blocks)
    recompute: bool = False  # preempted: its tokens are recomputed by a prefill when readmitted
    admission: Admission | None = None  # from admission to the end of its prefill
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the cache
    spec: SpecState = field(default_factory=SpecState)

    @property
    def sampling(self) -> Sampling:
        return self.handle.request.sampling


def sequence_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Independent, batching-agnostic stream per (request seed, prompt, sample)."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
