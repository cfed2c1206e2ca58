"""Blocking client of the rollout service: a thin face over ClientCore (core.py)."""
from __future__ import annotations

import time
import uuid
from typing import Iterator, Mapping, Sequence

import torch
from grpc_health.v1 import health_pb2

from fastgrpo.client.core import (ClientCore, Prompt, RetryPolicy, errors, generate_request, group_completions,
                                  not_serving, train_draft_request)
from fastgrpo.client.types import (Completion, DraftTraining, GroupedBatch, RolloutError, Sampling, Status,
                                   UpdateResult)
from fastgrpo.client.weights import Kind, Target, WeightMirror, plan_push
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.wire.convert import from_pb


class RolloutClient:
    """Talks to one or more rollout replicas.

    Every call has a deadline (`timeout` seconds, per call or the client default). Calls that are
    safe to repeat (GetStatus, health checks, and Generate before its first completion arrived) are
    retried on UNAVAILABLE by gRPC's own retry policy (`retry`); failures raise RolloutError carrying
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
        self._core = ClientCore(address, token=token, tls=tls, root_certificates=root_certificates, timeout=timeout,
                                retry=retry, aio=False)
        self.replicas = self._core.replicas

    def close(self) -> None:
        for r in self.replicas:
            r.channel.close()

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- calls
    def status(self, *, replica: int = 0, timeout: float | None = None) -> Status:
        with errors("GetStatus"):
            reply = self.replicas[replica].stub.GetStatus(pb.GetStatusRequest(), **self._core.options(timeout))
        return from_pb(Status, reply)

    def train_draft(self, *, run_now: bool = False, every_n_batches: int | None = None, replica: int = 0,
                    timeout: float | None = None) -> DraftTraining:
        """Online draft learning: run a round now (returns once it is served) and/or set the schedule
        (a round after every N finished Generate requests; 0 = off); reports the learner's state."""
        request = train_draft_request(run_now, every_n_batches)
        with errors("TrainDraft"):
            reply = self.replicas[replica].stub.TrainDraft(request, **self._core.options(timeout))
        return from_pb(DraftTraining, reply)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once every replica's health check answers SERVING; RolloutError(DEADLINE_EXCEEDED)
        otherwise. Waits for a replica that cannot be reached yet (it may still be starting)."""
        deadline = time.monotonic() + timeout
        for r in self.replicas:
            with errors("Health.Watch"):
                watch = r.health.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True,
                                       **self._core.options(max(deadline - time.monotonic(), 1e-3)))
                if not any(reply.status == health_pb2.HealthCheckResponse.SERVING for reply in watch):
                    raise not_serving(r.address)
                watch.cancel()

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
        request = generate_request(prompts, num_samples, sampling, request_id or uuid.uuid4().hex)
        with errors("Generate"):
            call = self._core.next_replica().stub.Generate(request, **self._core.options(timeout))
            try:
                for msg in call:
                    yield from_pb(Completion, msg)
            finally:
                call.cancel()

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
        return group_completions(completions, len(prompts), num_samples)

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
        cannot be verified (verify=False required). A push whose call fails is judged by the
        checksum the replica then serves: if the update was applied (its reply was lost) the push
        counts as done, else the failure is raised and the mirror stays.
        """
        plan = plan_push(weights, kind, self.status(timeout=timeout), target=target, base_version=base_version,
                         new_version=new_version, lora_scale=lora_scale, mirror=mirror, verify=verify)
        results = []
        for i, r in enumerate(self.replicas):
            _, messages = plan.stream()
            try:
                with errors("UpdateWeights"):
                    reply = r.stub.UpdateWeights(messages, **self._core.options(timeout))
                results.append(plan.result(reply, r.address))
            except RolloutError as exc:  # the update may still have been applied: ask what is served
                results.append(plan.after_failure(exc, self._served(i, timeout), r.address))
        plan.commit()
        return results

    def _served(self, replica: int, timeout: float | None) -> Status | None:
        try:
            return self.status(replica=replica, timeout=timeout)
        except RolloutError:
            return None
