"""Paired timing: several engines run the same workload at once, taking turns one step at a time.

A shared machine drifts: on the 2-core CPU VM the same matmul loop runs at 14, then 18, then 15
iterations per second in spells of 10-30 s, so two modes timed one after the other (a rollout of
128 sequences takes ~20 s) differ by +-6-10 % with nothing changed. Here each mode runs on its own
engine and the engines take turns step by step, first come first served, so consecutive steps of
different modes are ~0.1 s apart and see the same machine. A mode's time is the sum of its own
steps (the machine is its alone meanwhile); everything speculation changes happens inside a step.
What lockstep cannot remove is noise within a step: with 2 torch threads the same step varies by
+-10-25 % (a parallel region waits for a descheduled vCPU), so identical work still differs by
+-3-7 % per round; with 1 thread by +-1 %.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator


class Lockstep:
    """A first-come-first-served turn (a ticket lock): engines waiting for the machine get it in
    the order they asked, so engines with work alternate step by step."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        """clock: what a step's seconds are read from (a test steps a clock of its own)."""
        self._cv = threading.Condition()
        self._clock = clock
        self._issued = 0
        self._serving = 0
        self.seconds: dict[int, float] = {}  # id(engine) -> seconds of its steps

    def wait_issued(self, n: int, timeout: float) -> bool:
        """Whether n turns have been asked for within timeout seconds."""
        with self._cv:
            return self._cv.wait_for(lambda: self._issued >= n, timeout)

    def attach(self, engine) -> None:
        key = id(engine)
        self.seconds[key] = 0.0
        engine.set_step_turn(lambda: self._turn(key))

    @contextlib.contextmanager
    def _turn(self, key: int) -> Iterator[None]:
        with self._cv:
            ticket = self._issued
            self._issued += 1
            self._cv.notify_all()
            while self._serving != ticket:
                self._cv.wait()
        t0 = self._clock()
        try:
            yield
        finally:
            self.seconds[key] += self._clock() - t0
            with self._cv:
                self._serving += 1
                self._cv.notify_all()


def lockstep_generation(engines: dict[str, object], requests: Callable[[str], list], first: int = 0) -> dict[str, dict]:
    """Runs requests(name) on engine `name` (typically one workload in speculation mode `name`),
    every engine at once, in lockstep, engine number `first` stepping first (rotate it between
    rounds: the first engine to run a new tensor shape pays the allocator's first touch of fresh
    memory, ~3 % of a round here). Returns per engine what `timed_generation` returns, with
    "seconds" the engine's own step time and "wall_seconds" the whole paired run."""
    from fastgrpo.bench.spec import timed_requests

    lock = Lockstep()
    for engine in engines.values():
        lock.attach(engine)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(mode: str) -> None:
        try:
            results[mode] = timed_requests(engines[mode], requests(mode))
        except BaseException as exc:  # re-raised on the caller's thread
            errors.append(exc)

    modes = list(engines)
    modes = modes[first % len(modes):] + modes[: first % len(modes)]
    threads = [threading.Thread(target=run, args=(mode,)) for mode in modes]
    t0 = time.perf_counter()
    try:
        for i, t in enumerate(threads):
            t.start()
            # each engine's first step queues behind the previous one's (unless its request failed)
            while not lock.wait_issued(i + 1, 0.1) and t.is_alive():
                pass
        for t in threads:
            t.join()
    finally:
        for engine in engines.values():
            engine.set_step_turn(contextlib.nullcontext)
    if errors:
        raise errors[0]
    wall = time.perf_counter() - t0
    for mode, engine in engines.items():
        results[mode].update(seconds=lock.seconds[id(engine)], wall_seconds=wall)
    return results
