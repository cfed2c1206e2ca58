"""asyncio client of the rollout service (grpc.aio): the surface and semantics of RolloutClient.

Create it inside the event loop that uses it (grpc.aio channels belong to one loop), and close it
there: `async with AsyncRolloutClient(address) as client: ...`. Everything that is not transport
(request building, retry delays, push planning and checksums) comes from `common` and `weights`,
so the two clients cannot drift apart. CPU-heavy steps of a push (casting, hashing, encoding) run
in a worker thread so that they do not stall the event loop.
"""
from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable, Mapping, Sequence, TypeVar

import grpc
import grpc.aio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastgrpo.client import common
from fastgrpo.client.common import PushPlan, Prompt, RetryPolicy
from fastgrpo.client.types import Completion, DraftTraining, GroupedBatch, RolloutError, Sampling, Status, UpdateResult
from fastgrpo.client.weights import Kind, Target, WeightMirror, update_stream
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc

T = TypeVar("T")


class _Replica:
    def __init__(self, address: str, creds: grpc.ChannelCredentials | None):
        self.address = address
        if creds is None:
            self.channel = grpc.aio.insecure_channel(address, options=common.CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(address, creds, options=common.CHANNEL_OPTIONS)
        self.stub = pb_grpc.RolloutServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


class AsyncRolloutClient:
    """Talks to one or more rollout replicas from asyncio code.

    Same contract as RolloutClient: every call has a deadline (`timeout` seconds, per call or the
    client default); GetStatus, health checks and Generate before its first completion are retried
    on UNAVAILABLE with exponential backoff and jitter; failures raise RolloutError carrying the gRPC
    status code and the server's message. Generate spreads requests over the replicas round-robin;
    push_weights updates every replica, all of them concurrently.
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
        creds = common.credentials(tls, root_certificates)
        self.replicas = [_Replica(a, creds) for a in common.addresses_of(address)]
        self.timeout = timeout
        self.retry = retry
        self._metadata = common.metadata(token)
        self._next = itertools.cycle(range(len(self.replicas)))

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in self.replicas))

    async def __aenter__(self) -> "AsyncRolloutClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---------------------------------------------------------------- calls
    async def _retrying(self, method: str, call: Callable[[], Awaitable[T]], policy: RetryPolicy) -> T:
        attempt = 1
        while True:
            try:
                return await call()
            except grpc.RpcError as exc:
                if not common.retryable(exc) or attempt >= policy.max_attempts:
                    raise common.to_error(exc, method) from None
                await asyncio.sleep(policy.delay(attempt))
                attempt += 1

    async def status(self, *, replica: int = 0, timeout: float | None = None) -> Status:
        r = self.replicas[replica]
        reply = await self._retrying(
            "GetStatus",
            lambda: r.stub.GetStatus(pb.GetStatusRequest(), timeout=timeout or self.timeout, metadata=self._metadata),
            self.retry,
        )
        return Status.from_pb(reply)

    async def train_draft(self, *, run_now: bool = False, every_n_batches: int | None = None, replica: int = 0,
                    timeout: float | None = None) -> DraftTraining:
        """Online draft learning: run a round now (returns once it is served) and/or set the schedule
        (a round after every N finished Generate requests; 0 = off); reports the learner's state."""
        r = self.replicas[replica]
        req = common.train_draft_request(run_now, every_n_batches)
        try:
            reply = await r.stub.TrainDraft(req, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise common.to_error(exc, "TrainDraft") from None
        return DraftTraining.from_pb(reply)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once every replica's health check answers SERVING; RolloutError(DEADLINE_EXCEEDED) otherwise."""
        deadline = time.monotonic() + timeout
        for r in self.replicas:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RolloutError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{r.address} not ready within {timeout}s", "Check")
                try:
                    reply = await r.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=min(left, 5.0),
                                                 metadata=self._metadata)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise common.to_error(exc, "Check") from None
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

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
        request = common.generate_request(prompts, num_samples, sampling, request_id or uuid.uuid4().hex)
        r = self.replicas[next(self._next)]
        attempt = 1
        while True:
            received = 0
            call = r.stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
            try:
                async for msg in call:
                    received += 1
                    yield Completion.from_pb(msg)
                return
            except grpc.RpcError as exc:
                # before any completion arrived nothing was consumed, so the call may be repeated
                if received or not common.retryable(exc) or attempt >= self.retry.max_attempts:
                    raise common.to_error(exc, "Generate") from None
                await asyncio.sleep(self.retry.delay(attempt))
                attempt += 1
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
        """Gathers a whole GRPO batch: result.completions[i][j] is sample j of prompt i."""
        stream = self.generate(prompts, num_samples, sampling, request_id=request_id, timeout=timeout)
        completions = [c async for c in stream]
        return common.group_completions(completions, len(prompts), num_samples)

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
        timeout: float | None = None,
    ) -> list[UpdateResult]:
        """Streams an update to every replica (concurrently) and checks the checksum each one returns.

        Arguments as in RolloutClient.push_weights: with a `mirror` the expected checksum comes from
        it and the mirror advances once every replica accepted the update; without one a "full"
        update is taken to cover every tensor (verify=False for a partial one) and deltas need
        verify=False. If any replica fails, the first failure in replica order is raised and the
        mirror stays where it was (replicas that succeeded have moved on).
        """
        served = await self.status(timeout=timeout)
        plan = await asyncio.to_thread(
            common.plan_push, weights, kind, served, target=target, base_version=base_version,
            new_version=new_version, lora_scale=lora_scale, mirror=mirror, verify=verify,
        )
        outcomes = await asyncio.gather(
            *(self._push_one(r, plan, kind, target, lora_scale, timeout) for r in self.replicas),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        await asyncio.to_thread(plan.commit)
        return list(outcomes)

    async def _push_one(self, r: _Replica, plan: PushPlan, kind: Kind, target: Target, lora_scale: float,
                        timeout: float | None) -> UpdateResult:
        total, messages = await asyncio.to_thread(
            update_stream, plan.tensors, kind, plan.base_version, plan.new_version, target, lora_scale
        )
        try:
            reply = await r.stub.UpdateWeights(messages, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise common.to_error(exc, "UpdateWeights") from None
        return plan.result(reply, r.address, total)
