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
from typing import AsyncIterator, Mapping, Sequence

import torch
from grpc_health.v1 import health_pb2

from fastgrpo.client.core import (ClientCore, Prompt, RetryPolicy, errors, generate_request,
                                  group_completions, not_serving, train_draft_request)
from fastgrpo.client.types import (Completion, DraftTraining, GroupedBatch, RolloutError, Sampling, Status,
                                   UpdateResult)
from fastgrpo.client.weights import Kind, PushPlan, Target, WeightMirror, plan_push
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.wire.convert import from_pb


class AsyncRolloutClient:
    """Talks to one or more rollout replicas from asyncio code.

    Same contract as RolloutClient: every call has a deadline (`timeout` seconds, per call or the
    client default); GetStatus, health checks and Generate before its first completion are retried
    on UNAVAILABLE by gRPC's own retry policy (`retry`); failures raise RolloutError carrying the gRPC
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
        self._core = ClientCore(address, token=token, tls=tls, root_certificates=root_certificates, timeout=timeout,
                                retry=retry, aio=True)
        self.replicas = self._core.replicas

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in self.replicas))

    async def __aenter__(self) -> "AsyncRolloutClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---------------------------------------------------------------- calls
    async def status(self, *, replica: int = 0, timeout: float | None = None) -> Status:
        with errors("GetStatus"):
            reply = await self.replicas[replica].stub.GetStatus(pb.GetStatusRequest(), **self._core.options(timeout))
        return from_pb(Status, reply)

    async def train_draft(self, *, run_now: bool = False, every_n_batches: int | None = None, replica: int = 0,
                          timeout: float | None = None) -> DraftTraining:
        """Online draft learning: run a round now (returns once it is served) and/or set the schedule
        (a round after every N finished Generate requests; 0 = off); reports the learner's state."""
        request = train_draft_request(run_now, every_n_batches)
        with errors("TrainDraft"):
            reply = await self.replicas[replica].stub.TrainDraft(request, **self._core.options(timeout))
        return from_pb(DraftTraining, reply)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once every replica's health check answers SERVING; RolloutError(DEADLINE_EXCEEDED)
        otherwise. Waits for a replica that cannot be reached yet (it may still be starting)."""
        deadline = time.monotonic() + timeout
        for r in self.replicas:
            with errors("Health.Watch"):
                watch = r.health.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True,
                                       **self._core.options(max(deadline - time.monotonic(), 1e-3)))
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
        """Gathers a whole GRPO batch: result.completions[i][j] is sample j of prompt i."""
        stream = self.generate(prompts, num_samples, sampling, request_id=request_id, timeout=timeout)
        return group_completions([c async for c in stream], len(prompts), num_samples)

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
            plan_push, weights, kind, served, target=target, base_version=base_version,
            new_version=new_version, lora_scale=lora_scale, mirror=mirror, verify=verify,
        )
        outcomes = await asyncio.gather(*(self._push_one(i, plan, timeout) for i in range(len(self.replicas))),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        await asyncio.to_thread(plan.commit)
        return list(outcomes)

    async def _push_one(self, replica: int, plan: PushPlan, timeout: float | None) -> UpdateResult:
        r = self.replicas[replica]
        _, messages = await asyncio.to_thread(plan.stream)
        try:
            with errors("UpdateWeights"):
                reply = await r.stub.UpdateWeights(messages, **self._core.options(timeout))
            return plan.result(reply, r.address)
        except RolloutError as exc:  # the update may still have been applied: ask what is served
            try:
                served = await self.status(replica=replica, timeout=timeout)
            except RolloutError:
                served = None
            return plan.after_failure(exc, served, r.address)
