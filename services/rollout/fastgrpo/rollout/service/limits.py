"""What the service takes on at once, and how long it waits: worker threads, long calls, weight
pushes, idle streams, the shutdown grace. Long work never queues: a long call beyond its limit is
refused at once with RESOURCE_EXHAUSTED, and counted; what waits for a worker are quick calls
(GetStatus, health checks, refusals), at most max_concurrent_rpcs of them."""
from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from fastgrpo.common.config import help_field

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceLimits:
    """Flags without a prefix: --workers, --reserved-workers, ..."""

    workers: int = help_field(32, "gRPC worker threads: long calls take at most workers - reserved_workers; quick calls (GetStatus, health, refusals) share the rest")
    max_concurrent_rpcs: int = help_field(1024, "calls the server holds at once, running or waiting for a worker; beyond, gRPC itself refuses them with RESOURCE_EXHAUSTED (not counted in fastgrpo_rollout_refused_calls_total)")
    reserved_workers: int = help_field(4, "workers only GetStatus, health checks and reflection use: long calls (Generate, UpdateWeights, TrainDraft) get at most workers - reserved_workers")
    max_pushes: int = help_field(2, "UpdateWeights streams received at once (each buffers up to one update); more are refused with RESOURCE_EXHAUSTED")
    push_idle_timeout_s: float = help_field(60.0, "an UpdateWeights stream that sends nothing for this long ends with DEADLINE_EXCEEDED")
    shutdown_grace_s: float = help_field(30.0, "on SIGTERM: health turns NOT_SERVING, new calls are refused, and calls in flight get this long to finish")

    def __post_init__(self):
        if self.max_concurrent_rpcs < self.workers:
            raise ValueError(f"--max-concurrent-rpcs {self.max_concurrent_rpcs} must be >= --workers {self.workers}")
        if not 1 <= self.reserved_workers < self.workers:
            raise ValueError(f"--reserved-workers must be in [1, --workers), got {self.reserved_workers} of {self.workers}")
        if self.max_pushes < 1 or self.push_idle_timeout_s <= 0 or self.shutdown_grace_s < 0:
            raise ValueError("--max-pushes must be >= 1, --push-idle-timeout-s > 0 and --shutdown-grace-s >= 0")

    @property
    def long_calls(self) -> int:
        return self.workers - self.reserved_workers


class Slots:
    """A count of calls allowed at once; `take` says at once whether one more fits."""

    def __init__(self, n: int):
        self.limit = n
        self._free = threading.BoundedSemaphore(n)

    @contextlib.contextmanager
    def take(self, refuse: Callable[[], None]) -> Iterator[None]:
        """Holds a slot for the block; calls refuse() (which must raise) when none is free."""
        if not self._free.acquire(blocking=False):
            refuse()
            raise AssertionError("refuse() must raise")
        try:
            yield
        finally:
            self._free.release()


_END = object()


def idle_bounded(messages: Iterator[T], timeout_s: float, is_active: Callable[[], bool],
                 on_idle: Callable[[], None], poll_s: float = 0.25) -> Iterator[T]:
    """The messages of a client stream, read by a thread of their own so that a stream which sends
    nothing for timeout_s ends: on_idle() is called (it aborts the call, and raises). A call that
    ends meanwhile (the client cancelled or vanished) ends the iteration within poll_s. At most two
    messages wait between the reader and the consumer, so nothing is read ahead of use."""
    handoff: queue.Queue = queue.Queue(maxsize=2)

    def read() -> None:
        try:
            for message in messages:
                while True:  # hand it over, unless the call ended meanwhile
                    try:
                        handoff.put(message, timeout=poll_s)
                        break
                    except queue.Full:
                        if not is_active():
                            return
            handoff.put(_END)
        except Exception as exc:  # the call ended under the reader (cancelled): the consumer re-raises
            handoff.put(exc)

    threading.Thread(target=read, name="fastgrpo-push-reader", daemon=True).start()
    idle = 0.0
    while True:
        try:
            item = handoff.get(timeout=poll_s)
        except queue.Empty:
            if not is_active():
                raise ConnectionAbortedError("the call ended: the client cancelled it or went away")
            idle += poll_s
            if idle >= timeout_s:
                on_idle()
                raise AssertionError("on_idle() must raise")
            continue
        idle = 0.0
        if item is _END:
            return
        if isinstance(item, Exception):
            raise item
        yield item
