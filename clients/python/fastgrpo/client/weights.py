"""Weight pushes: encoding an update for UpdateWeights, planning one (versions, dtype, the checksum
to expect), and a mirror of the served weights to verify it.

A trainer that pushes deltas keeps a `WeightMirror`: a copy of exactly what the rollout serves. The
mirror applies each update with the same function the server uses
(fastgrpo.common.weight_updates.updated_values), so after a push its checksum must equal the one
the server returns, bit for bit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping

import torch

from fastgrpo.client.types import ChecksumMismatch, RolloutError, Status, UpdateResult
from fastgrpo.common.weight_updates import UpdateKind, updated_values
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.wire.convert import TARGETS, UPDATE_KINDS, from_pb
from fastgrpo.wire.dtypes import dtype_from_name
from fastgrpo.wire.tensors import (
    MAX_CHUNK_BYTES,
    chunk_bytes,
    combine_digests,
    encode_tensor,
    state_checksum,
    tensor_digest,
    unique_state,
)

Kind = UpdateKind
Target = Literal["policy", "draft"]


def as_state(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's state dict without tied aliases, or a mapping as given."""
    if isinstance(weights, torch.nn.Module):
        return unique_state(weights.state_dict())
    return dict(weights)


def update_stream(
    tensors: Mapping[str, torch.Tensor],
    kind: Kind,
    base_version: int,
    new_version: int,
    target: Target = "policy",
    lora_scale: float = 1.0,
    chunk_size: int = MAX_CHUNK_BYTES,
) -> tuple[int, Iterator[pb.WeightChunk]]:
    """(total bytes, the UpdateWeights messages: header, then data chunks of <= chunk_size bytes)."""
    if kind not in UPDATE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(UPDATE_KINDS)}; got {kind!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    encoded = [encode_tensor(name, t) for name, t in tensors.items()]
    header = pb.WeightHeader(
        target=TARGETS[target],
        kind=UPDATE_KINDS[kind],
        base_version=base_version,
        new_version=new_version,
        tensors=[meta.to_pb() for meta, _ in encoded],
        lora=pb.LoraSpec(scale=lora_scale),
    )
    total = sum(meta.byte_length for meta, _ in encoded)

    def messages() -> Iterator[pb.WeightChunk]:
        yield pb.WeightChunk(header=header)
        for data in chunk_bytes((raw for _, raw in encoded), chunk_size):
            yield pb.WeightChunk(data=data)

    return total, messages()


class WeightMirror:
    """What a rollout service serves, kept on the trainer's side (CPU) to compute deltas and checksums.

    `state` is changed only through `commit`: the checksum comes from per-tensor digests taken then.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], version: int = 0):
        self.state = {name: t.detach().to("cpu").clone() for name, t in unique_state(state).items()}
        self.version = version
        # per-tensor digests, as the server keeps them: a push re-hashes only the tensors it changes
        self._digests = {name: tensor_digest(t) for name, t in self.state.items()}
        self.checksum = combine_digests(self._digests)

    @staticmethod
    def of(weights: torch.nn.Module | Mapping[str, torch.Tensor], dtype: str | torch.dtype | None = None,
           version: int = 0) -> "WeightMirror":
        """Mirror of weights served in `dtype` (e.g. Status.model.dtype); None keeps their dtype."""
        state = as_state(weights)
        if dtype is not None:
            dt = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
            state = {n: t.detach().to(dt) for n, t in state.items()}
        return WeightMirror(state, version)

    def dense_delta(self, new: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """new - served for every tensor that changed, in the served dtype."""
        out = {}
        for name, t in as_state(new).items():
            if name not in self.state:
                continue
            served = self.state[name]
            delta = t.detach().to("cpu", served.dtype) - served
            if bool(delta.any()):
                out[name] = delta
        return out

    def preview(self, kind: Kind, tensors: Mapping[str, torch.Tensor], lora_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """New values the update would give, without changing the mirror (raises like the server would)."""
        return updated_values(self.state, kind, tensors, lora_scale)

    def digests_after(self, new_values: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """Per-tensor digests of the served weights once `new_values` are applied."""
        return {**self._digests, **{name: tensor_digest(v) for name, v in new_values.items()}}

    def expected_checksum(self, new_values: Mapping[str, torch.Tensor]) -> str:
        return combine_digests(self.digests_after(new_values))

    def commit(self, new_values: Mapping[str, torch.Tensor], version: int,
               digests: Mapping[str, str] | None = None) -> None:
        """Adopts `new_values` as served at `version`; `digests` (from digests_after) saves re-hashing."""
        for name, value in new_values.items():
            self.state[name] = value.clone()
        self._digests = dict(digests) if digests is not None else self.digests_after(new_values)
        self.version = version
        self.checksum = combine_digests(self._digests)


@dataclass(frozen=True)
class PushPlan:
    """One weight push, decided before any byte is sent: what goes out, and what must come back."""

    tensors: dict[str, torch.Tensor]  # on the CPU, cast to the served dtype
    kind: Kind
    target: Target
    lora_scale: float
    base_version: int
    new_version: int
    expected_checksum: str | None  # None: the reply is not verified
    mirror: WeightMirror | None
    new_values: dict[str, torch.Tensor] | None  # the mirror's values after the update (with a mirror)
    new_digests: dict[str, str] | None = None  # the mirror's per-tensor digests after the update

    def stream(self) -> tuple[int, Iterator[pb.WeightChunk]]:
        """(total bytes, a fresh UpdateWeights message stream) for one replica."""
        return update_stream(self.tensors, self.kind, self.base_version, self.new_version, self.target, self.lora_scale)

    def result(self, reply: pb.UpdateWeightsReply, address: str) -> UpdateResult:
        """The reply of one replica as an UpdateResult; ChecksumMismatch if it serves other weights."""
        if self.expected_checksum is not None and reply.checksum != self.expected_checksum:
            raise ChecksumMismatch(self.expected_checksum, reply.checksum, address)
        return dataclasses.replace(from_pb(UpdateResult, reply), address=address)

    def after_failure(self, error: RolloutError, served: Status | None, address: str) -> UpdateResult:
        """A push that failed on one replica, judged by the checksum that replica serves now
        (`served`, None when it cannot be asked): when it serves exactly what the push would make,
        the update was applied and only its reply was lost (the call was cancelled, or its deadline
        passed, after the commit), so the push succeeded there; otherwise `error` stands."""
        if (served is not None and self.target == "policy" and self.expected_checksum is not None
                and served.policy_checksum == self.expected_checksum and served.policy_version == self.new_version):
            return UpdateResult(served.policy_version, served.policy_checksum, 0.0, self.nbytes, address)
        raise error

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

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
    try:
        dtype = dtype_from_name(served.model.dtype)
    except ValueError:
        raise ValueError(f"the service reports dtype {served.model.dtype!r}, which the client cannot encode") from None
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
    return PushPlan(tensors, kind, target, lora_scale, base, new, expected, mirror, new_values, new_digests)
