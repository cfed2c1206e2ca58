"""Blocking client of the rollout service."""
from __future__ import annotations

import itertools
import time
import uuid
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastgrpo.client import common
from fastgrpo.client.common import Prompt, RetryPolicy
from fastgrpo.client.types import Completion, DraftTraining, GroupedBatch, RolloutError, Sampling, Status, UpdateResult
from fastgrpo.client.weights import Kind, Target, WeightMirror, update_stream
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc

T = TypeVar("T")


class _Replica:
    def __init__(self, address: str, creds: grpc.ChannelCredentials | None):
        self.address = address
        if creds is None:
            self.channel = grpc.insecure_channel(address, options=common.CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(address, creds, options=common.CHANNEL_OPTIONS)
        self.stub = pb_grpc.RolloutServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


class RolloutClient:
    """Talks to one or more rollout replicas.

    Every call has a deadline (`timeout` seconds, per call or the client default). Calls that are
    safe to repeat (GetStatus, health checks, and Generate before its first completion arrived) are
    retried on UNAVAILABLE with exponential backoff and jitter; failures raise RolloutError carrying
    the gRPC status code and the server's message. Generate spreads requests over the replicas
    round-robin; push_weights updates every replica.
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

    def close(self) -> None:
        for r in self.replicas:
            r.channel.close()

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- calls
    def _retrying(self, method: str, call: Callable[[], T], policy: RetryPolicy) -> T:
        attempt = 1
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if not common.retryable(exc) or attempt >= policy.max_attempts:
                    raise common.to_error(exc, method) from None
                time.sleep(policy.delay(attempt))
                attempt += 1

    def status(self, *, replica: int = 0, timeout: float | None = None) -> Status:
        r = self.replicas[replica]
        reply = self._retrying(
            "GetStatus",
            lambda: r.stub.GetStatus(pb.GetStatusRequest(), timeout=timeout or self.timeout, metadata=self._metadata),
            self.retry,
        )
        return Status.from_pb(reply)

    def train_draft(self, *, run_now: bool = False, every_n_batches: int | None = None, replica: int = 0,
                    timeout: float | None = None) -> DraftTraining:
        """Online draft learning: run a round now (returns once it is served) and/or set the schedule
        (a round after every N finished Generate requests; 0 = off); reports the learner's state."""
        r = self.replicas[replica]
        req = common.train_draft_request(run_now, every_n_batches)
        try:
            reply = r.stub.TrainDraft(req, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise common.to_error(exc, "TrainDraft") from None
        return DraftTraining.from_pb(reply)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Blocks until every replica's health check answers SERVING; RolloutError(DEADLINE_EXCEEDED) otherwise."""
        deadline = time.monotonic() + timeout
        for r in self.replicas:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RolloutError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{r.address} not ready within {timeout}s", "Check")
                try:
                    reply = r.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=min(left, 5.0),
                                           metadata=self._metadata)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise common.to_error(exc, "Check") from None
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def generate(
        self,
        prompts: Sequence[Prompt],
        num_samples: int = 1,
        sampling: Sampling = Sampling(),
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[Completion]:
        """Completions as they finish (any order; prompt_index / sample_index identify them)."""
        request = common.generate_request(prompts, num_samples, sampling, request_id or uuid.uuid4().hex)
        r = self.replicas[next(self._next)]
        attempt = 1
        while True:
            received = 0
            stream = r.stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
            try:
                for msg in stream:
                    received += 1
                    yield Completion.from_pb(msg)
                return
            except grpc.RpcError as exc:
                # before any completion arrived nothing was consumed, so the call may be repeated
                if received or not common.retryable(exc) or attempt >= self.retry.max_attempts:
                    raise common.to_error(exc, "Generate") from None
                time.sleep(self.retry.delay(attempt))
                attempt += 1
            finally:
                stream.cancel()

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        num_samples: int = 1,
        sampling: Sampling = Sampling(),
        *,
        request_id: str = "",
        timeout: float | None = None,
    ) -> GroupedBatch:
        """Gathers a whole GRPO batch: result.completions[i][j] is sample j of prompt i."""
        completions = self.generate(prompts, num_samples, sampling, request_id=request_id, timeout=timeout)
        return common.group_completions(completions, len(prompts), num_samples)

    def push_weights(
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
        """Streams an update to every replica and checks the checksum each one returns.

        weights: for "full" the new values (a module or any subset of its state dict); for
        "dense_delta" the differences; for "lora_delta" '<W>.lora_A' / '<W>.lora_B' factors.
        Tensors are cast to the served dtype. With a `mirror` (a WeightMirror of the served weights)
        the expected checksum comes from it and the mirror advances on success; without one a "full"
        update is taken to cover every tensor (pass verify=False for a partial one), and deltas
        cannot be verified (verify=False required).
        """
        plan = common.plan_push(weights, kind, self.status(timeout=timeout), target=target, base_version=base_version,
                                new_version=new_version, lora_scale=lora_scale, mirror=mirror, verify=verify)
        results = []
        for r in self.replicas:
            total, messages = update_stream(plan.tensors, kind, plan.base_version, plan.new_version, target, lora_scale)
            try:
                reply = r.stub.UpdateWeights(messages, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                raise common.to_error(exc, "UpdateWeights") from None
            results.append(plan.result(reply, r.address, total))
        plan.commit()
        return results

