"""What only the asyncio client (AsyncRolloutClient) adds, against real rollout services on 127.0.0.1;
each test drives its own event loop with asyncio.run. Every check the two faces share runs once per
face in test_client.py.

Covers: concurrent calls on one client give what the same calls give one at a time; leaving an
`async for` early (contextlib.aclosing) cancels the call on the server; a push reaches every replica
at the same time, not one after another.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
import pytest

from fastgrpo.client import AsyncRolloutClient, Sampling, WeightMirror
from test_client import PROMPTS, addr, local_model, perturbed  # helpers only: its tests are collected there

pytestmark = pytest.mark.service


async def wait_idle(client: AsyncRolloutClient, seconds: float = 10.0) -> None:
    """Until the service runs and queues nothing (a cancelled call's slots are freed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        s = await client.status()
        if s.running_sequences == 0 and s.queued_sequences == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"service still busy after {seconds}s: {s}")


class Rendezvous(grpc.ServerInterceptor):
    """Holds each UpdateWeights call, before the servicer reads any of it, until `parties` calls have
    arrived (across every server it is installed on); a call that waits in vain fails with UNKNOWN
    (BrokenBarrierError), so pushes made one after another cannot succeed."""

    def __init__(self, parties: int, timeout: float):
        self.barrier = threading.Barrier(parties)
        self.timeout = timeout

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.endswith("/UpdateWeights"):
            return handler
        behaviour = handler.stream_unary

        def meet_then_update(request_iterator, context):
            self.barrier.wait(self.timeout)
            return behaviour(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(meet_then_update, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)


def test_concurrent_calls_on_one_client_match_one_at_a_time(tiny_dir, start_service):
    app = start_service(tiny_dir)
    seeds = [11, 12, 13]

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            one_by_one = [await client.generate_batch(PROMPTS, 2, Sampling(max_new_tokens=5, seed=s)) for s in seeds]
            together = await asyncio.gather(
                *(client.generate_batch(PROMPTS, 2, Sampling(max_new_tokens=5, seed=s)) for s in seeds),
                client.status(),
            )
            return one_by_one, together[:-1]

    one_by_one, together = asyncio.run(main())
    tokens = lambda b: [c.token_ids for c in b.flat()]  # noqa: E731
    assert [tokens(b) for b in together] == [tokens(b) for b in one_by_one]  # seeded: batching-agnostic
    assert len({tuple(map(tuple, tokens(b))) for b in one_by_one}) == len(seeds)


def test_leaving_an_async_for_early_cancels_the_call(tiny_dir, start_service):
    # one slot: the 40 sequences decode one after another, ~40x as long as the first takes
    app = start_service(tiny_dir, max_running=1)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            stream = client.generate([[i] for i in range(40)], 1, Sampling(max_new_tokens=200, ignore_eos=True))
            async with contextlib.aclosing(stream):
                async for first in stream:
                    break
            await wait_idle(client, seconds=5.0)  # the 39 others were dropped, not decoded
            return first

    assert len(asyncio.run(main()).token_ids) == 200


def test_pushes_to_two_replicas_happen_concurrently(tiny_dir, start_service):
    # each replica holds its UpdateWeights until the other's has arrived too: one after another, the
    # first would wait for a second that never comes while it is pending, and fail
    rendezvous = Rendezvous(parties=2, timeout=20)
    apps = [start_service(tiny_dir, interceptors=[rendezvous]) for _ in range(2)]
    model = local_model(tiny_dir)

    async def main():
        async with AsyncRolloutClient([addr(a) for a in apps]) as client:
            mirror = WeightMirror.of(model)
            results = await client.push_weights(mirror.dense_delta(perturbed(model, seed=4)), "dense_delta",
                                                mirror=mirror)
            checksums = [(await client.status(replica=i)).policy_checksum for i in (0, 1)]
            return mirror, results, checksums

    mirror, results, checksums = asyncio.run(main())
    assert not rendezvous.barrier.broken
    assert [r.address for r in results] == [addr(a) for a in apps]
    assert [r.version for r in results] == [1, 1] and mirror.version == 1
    assert [r.checksum for r in results] == checksums == [mirror.checksum] * 2
