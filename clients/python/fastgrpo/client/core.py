"""The one implementation behind both clients: replicas and their channels, retries, replica choice,
request building, result mapping and errors. `RolloutClient` (blocking) and `AsyncRolloutClient`
(asyncio) are thin faces over it: each call is "build the request here, invoke the stub there, map
the reply here", and only the invoking differs (a value or an awaitable).

Retries are gRPC's own: every channel carries a service config whose retry policy covers the calls
that are safe to repeat (GetStatus, health checks, and Generate until its first completion arrives,
which is when gRPC commits a server-streaming call). So any gRPC client, in any language, gets the
same behaviour from `RETRY_METHODS` and the policy's JSON.
"""
from __future__ import annotations

import contextlib
import itertools
import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from fastgrpo.client.types import Completion, GroupedBatch, RolloutError
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc
from fastgrpo.wire.convert import to_pb
from fastgrpo.wire.records import Sampling

Prompt = str | Sequence[int]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]
# (service, method) of the calls that are safe to repeat; UpdateWeights and TrainDraft are not
RETRY_METHODS = [
    {"service": "fastgrpo.v1.RolloutService", "method": "GetStatus"},
    {"service": "fastgrpo.v1.RolloutService", "method": "Generate"},
    {"service": "grpc.health.v1.Health"},
]
GRPC_MAX_ATTEMPTS = 5  # gRPC caps a retry policy's attempts here


@dataclass(frozen=True)
class RetryPolicy:
    """How calls that are safe to repeat are retried, as gRPC's own retry policy does it: on
    UNAVAILABLE, with exponential backoff and full jitter. wait_for_ready (on by default): such a
    call made while no connection can be made waits for one, until its deadline, instead of failing
    at once, so it rides out a restart of the service; an address where no service ever comes up
    then fails at the call's deadline."""

    max_attempts: int = 5  # 1 = no retries; gRPC allows at most 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    wait_for_ready: bool = True

    def __post_init__(self):
        if not 1 <= self.max_attempts <= GRPC_MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be in [1, {GRPC_MAX_ATTEMPTS}] (gRPC's limit), got {self.max_attempts}; "
                             "to outlast a restart, use wait_for_ready=True and a longer timeout")
        if not (self.initial_backoff_s > 0 and self.max_backoff_s > 0 and self.multiplier > 0):
            raise ValueError("backoffs and multiplier must be positive")

    def service_config(self) -> str:
        """The gRPC service config (JSON) that implements this policy."""
        method: dict = {"name": RETRY_METHODS}
        if self.wait_for_ready:
            method["waitForReady"] = True
        if self.max_attempts > 1:
            method["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
        return json.dumps({"methodConfig": [method]})


NO_RETRY = RetryPolicy(max_attempts=1, wait_for_ready=False)  # every call once, failing at once when it cannot connect


@contextlib.contextmanager
def errors(method: str) -> Iterator[None]:
    """A failed call inside raises RolloutError with its status code and the server's message."""
    try:
        yield
    except grpc.RpcError as exc:
        raise RolloutError(exc.code(), exc.details() or "", method) from None


def not_serving(address: str) -> RolloutError:
    """A replica's health stream ended without ever answering SERVING (it is shutting down)."""
    return RolloutError(grpc.StatusCode.UNAVAILABLE, f"{address} stopped before it was serving", "Health.Watch")


class Replica:
    """One rollout service: its channel (blocking or asyncio) and the stubs on it."""

    def __init__(self, address: str, creds: grpc.ChannelCredentials | None, options: list, aio: bool):
        self.address = address
        transport = grpc.aio if aio else grpc
        if creds is None:
            self.channel = transport.insecure_channel(address, options=options)
        else:
            self.channel = transport.secure_channel(address, creds, options=options)
        self.stub = pb_grpc.RolloutServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


class ClientCore:
    """What a client holds and decides; it makes no call itself (the faces do)."""

    def __init__(self, address: str | Sequence[str], *, token: str | None, tls: bool, root_certificates: bytes | None,
                 timeout: float, retry: RetryPolicy, aio: bool):
        addresses = [address] if isinstance(address, str) else list(address)
        if not addresses:
            raise ValueError("at least one address is required")
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates) if tls or root_certificates else None
        options = CHANNEL_OPTIONS + [("grpc.service_config", retry.service_config()),
                                     ("grpc.enable_retries", int(retry.max_attempts > 1))]
        self.replicas = [Replica(a, creds, options, aio) for a in addresses]
        self.timeout = timeout
        self.retry = retry
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._next = itertools.cycle(range(len(self.replicas)))

    def options(self, timeout: float | None) -> dict:
        """Keyword arguments of every stub call: the deadline and the credentials."""
        return {"timeout": timeout or self.timeout, "metadata": self._metadata}

    def next_replica(self) -> Replica:
        """Generate calls go to the replicas round-robin."""
        return self.replicas[next(self._next)]


def generate_request(prompts: Sequence[Prompt], num_samples: int, sampling: Sampling, request_id: str) -> pb.GenerateRequest:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists), not one string")
    return pb.GenerateRequest(request_id=request_id, prompts=[_prompt(p) for p in prompts], num_samples=num_samples,
                              sampling=to_pb(sampling))


def _prompt(p: Prompt) -> pb.Prompt:
    if isinstance(p, str):
        return pb.Prompt(text=p)
    return pb.Prompt(token_ids=pb.TokenIds(ids=[int(t) for t in p]))


def train_draft_request(run_now: bool, every_n_batches: int | None) -> pb.TrainDraftRequest:
    if every_n_batches is not None and every_n_batches < 0:
        raise ValueError(f"every_n_batches must be >= 0 (0 = off), got {every_n_batches}")
    return pb.TrainDraftRequest(run_now=run_now, set_policy=every_n_batches is not None,
                                every_n_batches=every_n_batches or 0)


def group_completions(completions: Iterable[Completion], num_prompts: int, num_samples: int) -> GroupedBatch:
    """Completions in any order -> completions[i][j] = sample j of prompt i."""
    groups: list[list[Completion | None]] = [[None] * num_samples for _ in range(num_prompts)]
    for c in completions:
        groups[c.prompt_index][c.sample_index] = c
    return GroupedBatch([list(g) for g in groups])  # type: ignore[arg-type]
