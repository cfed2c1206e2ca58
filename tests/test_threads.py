"""One OpenMP team in a serving process (runtime.threads): the engine thread computes with the
threads of the thread that built it, gRPC worker threads on one, and start-up runs on a thread
that ends. (That two teams slow every parallel region is measured, not asserted: the module's
docstring has the figures.)"""
from __future__ import annotations

import threading

import grpc
import pytest
import torch

from fastgrpo.client import RolloutClient
from fastgrpo.rollout.runtime.threads import on_passing_thread, use_threads

pytestmark = pytest.mark.unit


def test_on_passing_thread_returns_or_raises_and_its_thread_ends():
    seen = []

    def work():
        seen.append(threading.current_thread())
        return 42

    assert on_passing_thread(work) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(ValueError, match="bad flag"):
        on_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad flag")))


def test_use_threads_holds_when_another_thread_sets_its_own_count_later():
    counts, set_elsewhere, done = [], threading.Event(), threading.Event()

    def pinned():
        use_threads(2)
        set_elsewhere.wait(30)
        counts.append(torch.get_num_threads())
        done.set()

    t = threading.Thread(target=pinned)
    t.start()
    other = threading.Thread(target=lambda: use_threads(1))  # (what a gRPC worker thread does)
    other.start()
    other.join()
    set_elsewhere.set()
    t.join(30)
    assert counts == [2]


class _ThreadCounts(grpc.ServerInterceptor):
    """Records torch's thread count where unary calls are handled: on the gRPC worker threads
    (the interceptor itself runs on the server's polling thread)."""

    def __init__(self):
        self.counts: list[int] = []

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        def counted(request, context):
            self.counts.append(torch.get_num_threads())
            return behaviour(request, context)

        return handler._replace(unary_unary=counted)


@pytest.mark.service
def test_engine_computes_with_the_builders_threads_and_grpc_workers_on_one(tiny_dir, start_service):
    counts = _ThreadCounts()

    def build():
        use_threads(2)  # the threads the service is started with (OMP_NUM_THREADS in a serving process)
        return start_service(tiny_dir, interceptors=[counts])

    app = on_passing_thread(build)
    with RolloutClient(f"127.0.0.1:{app.port}") as client:
        client.status()
        client.status()
    # asked after gRPC workers set their own count to 1: the engine thread's stays
    assert app.engine.run_exclusive(torch.get_num_threads, timeout=30) == 2
    assert counts.counts and set(counts.counts) == {1}
