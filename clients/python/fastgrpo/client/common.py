"""What the blocking and asyncio clients share: options, request building, retry policy, channels,
grouping a batch, and planning / checking a weight push. Nothing here does I/O."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import grpc
import torch

from fastgrpo.client.types import ChecksumMismatch, Completion, GroupedBatch, RolloutError, Status, UpdateResult
from fastgrpo.client.weights import DTYPES, Kind, Target, WeightMirror, as_state
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.wire.tensors import combine_digests, state_checksum, unique_state

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


def group_completions(completions: Iterable[Completion], num_prompts: int, num_samples: int) -> GroupedBatch:
    """Completions in any order -> completions[i][j] = sample j of prompt i."""
    groups: list[list[Completion | None]] = [[None] * num_samples for _ in range(num_prompts)]
    for c in completions:
        groups[c.prompt_index][c.sample_index] = c
    return GroupedBatch([list(g) for g in groups])  # type: ignore[arg-type]


@dataclass(frozen=True)
class PushPlan:
    """One weight push, decided before any byte is sent: what goes out, and what must come back."""

    tensors: dict[str, torch.Tensor]  # on the CPU, cast to the served dtype
    base_version: int
    new_version: int
    expected_checksum: str | None  # None: the reply is not verified
    mirror: WeightMirror | None
    new_values: dict[str, torch.Tensor] | None  # the mirror's values after the update (with a mirror)
    new_digests: dict[str, str] | None = None  # the mirror's per-tensor digests after the update

    def result(self, reply: pb.UpdateWeightsReply, address: str, bytes_sent: int) -> UpdateResult:
        """The reply of one replica as an UpdateResult; ChecksumMismatch if it serves other weights."""
        if self.expected_checksum is not None and reply.checksum != self.expected_checksum:
            raise ChecksumMismatch(self.expected_checksum, reply.checksum, address)
        return UpdateResult(address, reply.version, reply.checksum, reply.seconds, bytes_sent)

    def commit(self) -> None:
        """Advances the mirror; call once every replica has accepted the update."""
        if self.mirror is not None:
            self.mirror.commit(self.new_values, self.new_version, self.new_digests)


def plan_push(
    weights: torch.nn.Module | Mapping[str, torch.Tensor],
    kind: Kind,
    served: Status,
    *,
    target: Target,
    base_version: int | None,
    new_version: int | None,
    lora_scale: float,
    mirror: WeightMirror | None,
    verify: bool,
) -> PushPlan:
    """Versions, tensors and expected checksum of a push (see RolloutClient.push_weights).

    `served` is the status of the first replica: its version of `target` is the default base (unless
    a mirror says otherwise) and its dtype the one tensors are cast to.
    """
    if mirror is not None:
        base = mirror.version if base_version is None else base_version
    else:
        served_version = served.draft_version if target == "draft" else served.policy_version
        base = served_version if base_version is None else base_version
    new = base + 1 if new_version is None else new_version
    dtype = served_dtype(served.model.dtype)
    tensors = {n: t.detach().to("cpu", dtype) for n, t in as_state(weights).items()}
    expected = None
    new_values = new_digests = None
    if mirror is not None:
        new_values = mirror.preview(kind, tensors, lora_scale)
        new_digests = mirror.digests_after(new_values)
        expected = combine_digests(new_digests)
    elif verify and kind == "full":
        expected = state_checksum(unique_state(tensors))
    elif verify:
        raise ValueError(f"a {kind} update can only be verified against a mirror: pass mirror= or verify=False")
    return PushPlan(tensors, base, new, expected, mirror, new_values, new_digests)


def served_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"the service reports dtype {name!r}, which the client cannot encode")
    return DTYPES[name]


def train_draft_request(run_now: bool, every_n_batches: int | None) -> pb.TrainDraftRequest:
    if every_n_batches is not None and every_n_batches < 0:
        raise ValueError(f"every_n_batches must be >= 0 (0 = off), got {every_n_batches}")
    return pb.TrainDraftRequest(run_now=run_now, set_policy=every_n_batches is not None,
                                every_n_batches=every_n_batches or 0)
