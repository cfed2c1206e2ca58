"""What the service takes on at once, and how long it waits: worker threads, long calls, weight
pushes, idle streams, the shutdown grace. Nothing queues where nobody can see it: a call beyond a
limit is refused at once with RESOURCE_EXHAUSTED, and counted."""
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

    workers: int = help_field(32, "gRPC worker threads; a call beyond them is refused with RESOURCE_EXHAUSTED (nothing waits unseen)")
    reserved_workers: int = help_field(4, "workers only GetStatus, health checks and reflection use: long calls (Generate, UpdateWeights, TrainDraft) get at most workers - reserved_workers")
    max_pushes: int = help_field(2, "UpdateWeights streams received at once (each buffers up to one update); more are refused with RESOURCE_EXHAUSTED")
    push_idle_timeout_s: float = help_field(60.0, "an UpdateWeights stream that sends nothing for this long ends with DEADLINE_EXCEEDED")
    shutdown_grace_s: float = help_field(30.0, "on SIGTERM: health turns NOT_SERVING, new calls are refused, and calls in flight get this long to finish")

    def __post_init__(self):
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
                 on_idle: Callable[[], None]) -> Iterator[T]:
    """The messages of a client stream, read by a thread of their own so that a stream which sends
    nothing for timeout_s ends: on_idle() is called (it aborts the call, and raises). At most two
    messages wait between the reader and the consumer, so nothing is read ahead of use."""
    handoff: queue.Queue = queue.Queue(maxsize=2)

    def put(item) -> bool:
        while is_active():
            try:
                handoff.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for message in messages:
                if not put(message):
                    return
            put(_END)
        except Exception as exc:  # the call ended under the reader (cancelled): the consumer re-raises
            put(exc)

    threading.Thread(target=read, name="fastgrpo-push-reader", daemon=True).start()
    while True:
        try:
            item = handoff.get(timeout=timeout_s)
        except queue.Empty:
            on_idle()
            raise AssertionError("on_idle() must raise")
        if item is _END:
            return
        if isinstance(item, Exception):
            raise item
        yield item
