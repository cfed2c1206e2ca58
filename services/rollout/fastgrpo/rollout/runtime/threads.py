"""One OpenMP team in a serving process: the engine thread's.

torch's CPU kernels run their parallel regions on OpenMP (GNU libgomp in the PyPI wheels). libgomp
gives every thread that starts a parallel region a team of worker threads of its own, which lives as
long as that thread does, and once its worker threads outnumber the cores it stops letting idle
workers spin (its "throttled" spin count) so that every parallel region pays a futex wake-up. On
the 2-core CPU here that is ~100 us a region: an elementwise op on 393k floats took 29 us where
one team existed and 140 us where two did (the main thread's, kept after loading the model, and
the engine thread's); the bench fixture's decode step at B = 64 took 66 ms instead of 97, and a
64-sequence rollout with a long tail ran at 454 tok/s instead of 354.

So in a serving process the engine thread is the one thread that computes with several threads:
the model is loaded, profiled and compiled on a thread that ends before serving (`on_passing_thread`),
the engine thread takes the configured thread count (`Engine` keeps the count of the thread that
built it), and the gRPC worker threads run torch single-threaded (`single_threaded`: their work is
decoding and hashing pushed weights, small next to a step).
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def use_threads(n: int) -> None:
    """This thread's torch ops run on n threads from now on, whatever other threads set later.

    (torch.set_num_threads sets the calling thread's OpenMP count and a process-wide one; a thread
    takes the process-wide count when it first computes in parallel, unless it has asked for its
    count before: so the count is asked for first, then set.)"""
    torch.get_num_threads()
    torch.set_num_threads(n)


def single_threaded() -> None:
    """This thread's torch ops run on it alone: it never starts an OpenMP team (a thread pool's
    initializer)."""
    use_threads(1)


def on_passing_thread(fn: Callable[[], T], name: str = "fastgrpo-startup") -> T:
    """fn() on a thread that ends when it returns (its OpenMP team ends with it); its result, or
    its exception re-raised here."""
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as exc:  # handed to the caller
            out.append((False, exc))

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value
