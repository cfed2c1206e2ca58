"""asyncio client of the rollout service (grpc.aio): the surface and semantics of RolloutClient, a
thin face over the same ClientCore (core.py).

Create it inside the event loop that uses it (grpc.aio channels belong to one loop), and close it
there: `async with AsyncRolloutClient(address) as client: ...`. CPU-heavy steps of a push (casting,
hashing, encoding) run in a worker thread so that they do not stall the event loop.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Mapping, Sequence, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastgrpo.client.core import (ClientCore, Compute, Flow, Op, Prompt, RetryPolicy, errors, generate_batch_flow,
                                  generate_request, not_serving, push_flow, statuses_flow, train_draft_request)
from fastgrpo.client.types import (Completion, DraftTraining, GroupedBatch, ReplicaState, RolloutError, Sampling,
                                   Status, UpdateResult)
from fastgrpo.client.weights import Kind, Target, WeightMirror
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc
from fastgrpo.wire.convert import from_pb

T = TypeVar("T")


class AsyncRolloutClient:
    """Talks to one or more rollout replicas from asyncio code.

    Same contract as RolloutClient: every call has a deadline (`timeout` seconds, per call or the
    client default); GetStatus, health checks and Generate before its first completion are retried
    on UNAVAILABLE by gRPC's own retry policy (`retry`); failures raise RolloutError carrying the gRPC
    status code and the server's message. Several replicas as in RolloutClient: generate_batch splits
    a batch by free capacity and gathers the parts, push_weights updates every replica in service at
    once, and a replica that fails while others work is set aside until `rejoin`.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float = 600.0,
        retry: RetryPolicy = RetryPolicy(),
    ):
        self._core = ClientCore(address, token=token, tls=tls, root_certificates=root_certificates, timeout=timeout,
                                retry=retry, aio=True)
        self.replicas = self._core.replicas

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for r in self.replicas for channel in r.channels()))

    async def __aenter__(self) -> "AsyncRolloutClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---------------------------------------------------------------- replicas in service
    def replica_states(self) -> list[ReplicaState]:
        """Each replica: in service or set aside, and how often it was set aside and rejoined."""
        return self._core.states()

    def set_aside(self, replica: int, error: RolloutError) -> None:
        """As RolloutClient.set_aside."""
        self._core.set_aside(replica, error)

    def rejoin(self, replica: int) -> None:
        """As RolloutClient.rejoin."""
        self._core.rejoin(replica)

    async def probe(self, replica: int, timeout: float = 5.0) -> Status | None:
        """As RolloutClient.probe: the Status of `replica` if it answers SERVING now, else None."""
        channel = self.replicas[replica].probe_channel()
        options = self._core.options(timeout)
        try:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                     **options)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                return None
            return from_pb(Status, await pb_grpc.RolloutServiceStub(channel).GetStatus(pb.GetStatusRequest(), **options))
        except grpc.RpcError:
            return None
        finally:
            await channel.close()

    # ---------------------------------------------------------------- calls
    async def status(self, *, replica: int | None = None, timeout: float | None = None) -> Status:
        """What `replica` serves (default: the first replica in service)."""
        r = self.replicas[self._core.first_in_service(replica)]
        with errors("GetStatus"):
            reply = await r.stub.GetStatus(pb.GetStatusRequest(), **self._core.options(timeout))
        return from_pb(Status, reply)

    async def statuses(self, *, timeout: float | None = None) -> dict[int, Status]:
        """As RolloutClient.statuses: replica -> Status of every replica in service, asked at once."""
        return await self._run(statuses_flow(self._core, self._core.in_service(), timeout))

    async def train_draft(self, *, run_now: bool = False, every_n_batches: int | None = None,
                          replica: int | None = None, timeout: float | None = None) -> DraftTraining:
        """Online draft learning on `replica` (default: the first in service): run a round now (returns
        once it is served) and/or set the schedule (a round after every N finished Generate requests;
        0 = off); reports the learner's state."""
        request = train_draft_request(run_now, every_n_batches)
        with errors("TrainDraft"):
            reply = await self.replicas[self._core.first_in_service(replica)].stub.TrainDraft(
                request, **self._core.options(timeout))
        return from_pb(DraftTraining, reply)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once every replica in service answers its health check SERVING;
        RolloutError(DEADLINE_EXCEEDED) otherwise. Waits for a replica that cannot be reached yet (it
        may still be starting)."""
        deadline = time.monotonic() + timeout
        for r in [self.replicas[i] for i in self._core.in_service()]:
            with errors("Health.Watch"):
                watch = r.health.Watch(health_pb2.HealthCheckRequest(service=""),
                                       **self._core.options(max(deadline - time.monotonic(), 1e-3), wait_for_ready=True))
                serving = False
                async for reply in watch:
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        serving = True
                        break
                watch.cancel()
                if not serving:
                    raise not_serving(r.address)

    async def generate(
        self,
        prompts: Sequence[Prompt],
        num_samples: int = 1,
        sampling: Sampling = Sampling(),
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[Completion]:
        """Completions as they finish (any order; prompt_index / sample_index identify them).

        Leaving the `async for` early cancels the call once the generator is closed; wrap it in
        `contextlib.aclosing(...)` to cancel at once rather than when it is garbage-collected.
        """
        request = generate_request(prompts, num_samples, sampling, request_id or uuid.uuid4().hex)
        with errors("Generate"):
            call = self._core.next_replica().stub.Generate(request, **self._core.options(timeout))
            try:
                async for msg in call:
                    yield from_pb(Completion, msg)
            finally:
                call.cancel()

    async def generate_batch(
        self,
        prompts: Sequence[Prompt],
        num_samples: int = 1,
        sampling: Sampling = Sampling(),
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> GroupedBatch:
        """Gathers a whole GRPO batch: result.completions[i][j] is sample j of prompt i (over several
        replicas as in RolloutClient.generate_batch)."""
        return await self._run(generate_batch_flow(self._core, prompts, num_samples, sampling,
                                                   request_id or uuid.uuid4().hex, timeout))

    async def push_weights(
        self,
        weights: torch.nn.Module | Mapping[str, torch.Tensor],
        kind: Kind = "full",
        *,
        base_version: int | None = None,
        new_version: int | None = None,
        target: Target = "policy",
        lora_scale: float = 1.0,
        mirror: WeightMirror | None = None,
        verify: bool = True,
        replicas: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> list[UpdateResult]:
        """Streams an update to every replica in service (or to `replicas`), all at once, and checks
        the checksum each one returns. Arguments, results and failures as in
        RolloutClient.push_weights; casting, hashing and encoding run in worker threads.
        """
        return await self._run(push_flow(self._core, weights, kind, replicas, timeout, target=target,
                                         base_version=base_version, new_version=new_version, lora_scale=lora_scale,
                                         mirror=mirror, verify=verify))

    # ---------------------------------------------------------------- running core.py's flows
    async def _run(self, flow: Flow[T]) -> T:
        """Drives a flow: the calls of a round gathered, its CPU work in a worker thread."""
        answer: Any = None
        while True:
            try:
                step = flow.send(answer)
            except StopIteration as done:
                return done.value
            if isinstance(step, Compute):
                answer = await asyncio.to_thread(step.fn)
            else:
                answer = list(await asyncio.gather(*(self._call(op) for op in step)))

    async def _call(self, op: Op) -> Any:
        """One call of a flow: its value, or the RolloutError it failed with."""
        r = self.replicas[op.replica]
        stub, options = r.stub_for(op.wait), self._core.options(op.timeout)
        try:
            if op.method == "status":
                with errors("GetStatus"):
                    return from_pb(Status, await stub.GetStatus(pb.GetStatusRequest(), **options))
            if op.method == "generate":
                with errors("Generate"):
                    return [from_pb(Completion, msg) async for msg in stub.Generate(op.arg, **options)]
            _, messages = await asyncio.to_thread(op.arg.stream)
            with errors("UpdateWeights"):
                return await stub.UpdateWeights(messages, **options)
        except RolloutError as exc:
            return exc
