"""Blocking client of the rollout service: a thin face over ClientCore (core.py)."""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Mapping, Sequence, TypeVar

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


class RolloutClient:
    """Talks to one or more rollout replicas.

    Every call has a deadline (`timeout` seconds, per call or the client default). Calls that are
    safe to repeat (GetStatus, health checks, and Generate before its first completion arrived) are
    retried on UNAVAILABLE by gRPC's own retry policy (`retry`); failures raise RolloutError carrying
    the gRPC status code and the server's message.

    Several replicas: generate_batch splits a batch's prompts over the replicas in service by their
    free capacity (GetStatus; all samples of a prompt on one replica) and generates the parts at once;
    a streamed generate goes to them round-robin; push_weights updates them all at once. A replica
    that fails for a reason of its own (core.REPLICA_FAULTS) while others work is set aside: its work
    goes to the others, and it gets none until `rejoin` (after the caller has re-synced it, see
    `probe`). Calls over several replicas fail at once on one that cannot be reached rather than wait
    for it; with one replica in service the client behaves as a one-replica client and failures are
    raised.
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
            for channel in r.channels():
                channel.close()

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- replicas in service
    def replica_states(self) -> list[ReplicaState]:
        """Each replica: in service or set aside, and how often it was set aside and rejoined."""
        return self._core.states()

    def set_aside(self, replica: int, error: RolloutError) -> None:
        """Gives `replica` no work until `rejoin`, after `error`; raises `error` instead when it is no
        replica fault or `replica` is the last one in service."""
        self._core.set_aside(replica, error)

    def rejoin(self, replica: int) -> None:
        """Puts a set-aside replica back in service; make it serve the right weights first (push_weights
        with replicas=[replica] reaches it while it is set aside)."""
        self._core.rejoin(replica)

    def probe(self, replica: int, timeout: float = 5.0) -> Status | None:
        """The Status of `replica` if it answers its health check SERVING now, else None. Asks over a
        connection of its own, without waiting or retrying (for replicas set aside)."""
        channel = self.replicas[replica].probe_channel()
        options = self._core.options(timeout)
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), **options)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                return None
            return from_pb(Status, pb_grpc.RolloutServiceStub(channel).GetStatus(pb.GetStatusRequest(), **options))
        except grpc.RpcError:
            return None
        finally:
            channel.close()

    # ---------------------------------------------------------------- calls
    def status(self, *, replica: int | None = None, timeout: float | None = None) -> Status:
        """What `replica` serves (default: the first replica in service)."""
        r = self.replicas[self._core.first_in_service(replica)]
        with errors("GetStatus"):
            reply = r.stub.GetStatus(pb.GetStatusRequest(), **self._core.options(timeout))
        return from_pb(Status, reply)

    def statuses(self, *, timeout: float | None = None) -> dict[int, Status]:
        """replica -> Status of every replica in service, asked at once; one that fails is set aside
        while another answers."""
        return self._run(statuses_flow(self._core, self._core.in_service(), timeout))

    def train_draft(self, *, run_now: bool = False, every_n_batches: int | None = None, replica: int | None = None,
                    timeout: float | None = None) -> DraftTraining:
        """Online draft learning on `replica` (default: the first in service): run a round now (returns
        once it is served) and/or set the schedule (a round after every N finished Generate requests;
        0 = off); reports the learner's state."""
        request = train_draft_request(run_now, every_n_batches)
        with errors("TrainDraft"):
            reply = self.replicas[self._core.first_in_service(replica)].stub.TrainDraft(request,
                                                                                        **self._core.options(timeout))
        return from_pb(DraftTraining, reply)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Returns once every replica in service answers its health check SERVING;
        RolloutError(DEADLINE_EXCEEDED) otherwise. Waits for a replica that cannot be reached yet (it
        may still be starting)."""
        deadline = time.monotonic() + timeout
        for r in [self.replicas[i] for i in self._core.in_service()]:
            with errors("Health.Watch"):
                watch = r.health.Watch(health_pb2.HealthCheckRequest(service=""),
                                       **self._core.options(max(deadline - time.monotonic(), 1e-3), wait_for_ready=True))
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
        """Gathers a whole GRPO batch: result.completions[i][j] is sample j of prompt i. Over several
        replicas, split by free capacity; a seeded batch then draws each part's samples from a seed
        derived from where the part starts (core.part_sampling)."""
        return self._run(generate_batch_flow(self._core, prompts, num_samples, sampling,
                                             request_id or uuid.uuid4().hex, timeout))

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
        replicas: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> list[UpdateResult]:
        """Streams an update to every replica in service (or to `replicas`), all at once, and checks
        the checksum each one returns; the results of those that accepted it, in replica order.

        weights: for "full" the new values (a module or any subset of its state dict); for
        "dense_delta" the differences; for "lora_delta" '<W>.lora_A' / '<W>.lora_B' factors.
        Tensors are cast to the served dtype. With a `mirror` (a WeightMirror of the served weights)
        the expected checksum comes from it and the mirror advances on success; without one a "full"
        update is taken to cover every tensor (pass verify=False for a partial one), and deltas
        cannot be verified (verify=False required). A push whose call fails is judged by the
        checksum the replica then serves: if the update was applied (its reply was lost) the push
        counts as done there. A replica that still failed is set aside when another accepted the
        update (the mirror advances with those); when none did, the first failure is raised and the
        mirror stays.
        """
        return self._run(push_flow(self._core, weights, kind, replicas, timeout, target=target,
                                   base_version=base_version, new_version=new_version, lora_scale=lora_scale,
                                   mirror=mirror, verify=verify))

    # ---------------------------------------------------------------- running core.py's flows
    def _run(self, flow: Flow[T]) -> T:
        """Drives a flow: the calls of a round at once (a thread each), its CPU work here."""
        answer: Any = None
        while True:
            try:
                step = flow.send(answer)
            except StopIteration as done:
                return done.value
            if isinstance(step, Compute):
                answer = step.fn()
            elif len(step) == 1:
                answer = [self._call(step[0])]
            else:
                with ThreadPoolExecutor(len(step)) as pool:
                    answer = list(pool.map(self._call, step))

    def _call(self, op: Op) -> Any:
        """One call of a flow: its value, or the RolloutError it failed with."""
        r = self.replicas[op.replica]
        stub, options = r.stub_for(op.wait), self._core.options(op.timeout)
        try:
            if op.method == "status":
                with errors("GetStatus"):
                    return from_pb(Status, stub.GetStatus(pb.GetStatusRequest(), **options))
            if op.method == "generate":
                with errors("Generate"):
                    return [from_pb(Completion, msg) for msg in stub.Generate(op.arg, **options)]
            _, messages = op.arg.stream()
            with errors("UpdateWeights"):
                return stub.UpdateWeights(messages, **options)
        except RolloutError as exc:
            return exc
