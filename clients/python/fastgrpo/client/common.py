"""What the blocking and asyncio clients share: options, request building, retry policy, channels."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import grpc

from fastgrpo.client.types import RolloutError
from fastgrpo.v1 import rollout_pb2 as pb

Prompt = str | Sequence[int]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, for UNAVAILABLE on idempotent calls only."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int, rng: random.Random = random.Random()) -> float:
        """Seconds to wait before retry number `attempt` (1-based): uniform in [0, capped exponential]."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return rng.uniform(0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)


def retryable(exc: grpc.RpcError) -> bool:
    return exc.code() == grpc.StatusCode.UNAVAILABLE


def to_error(exc: grpc.RpcError, method: str) -> RolloutError:
    return RolloutError(exc.code(), exc.details() or "", method)


def prompt_to_pb(p: Prompt) -> pb.Prompt:
    if isinstance(p, str):
        return pb.Prompt(text=p)
    return pb.Prompt(token_ids=pb.TokenIds(ids=[int(t) for t in p]))


def generate_request(prompts: Sequence[Prompt], num_samples: int, sampling, request_id: str) -> pb.GenerateRequest:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts (strings or token-id lists), not one string")
    return pb.GenerateRequest(
        request_id=request_id,
        prompts=[prompt_to_pb(p) for p in prompts],
        num_samples=num_samples,
        sampling=sampling.to_pb(),
    )


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def addresses_of(address: str | Sequence[str]) -> list[str]:
    addrs = [address] if isinstance(address, str) else list(address)
    if not addrs:
        raise ValueError("at least one address is required")
    return addrs
