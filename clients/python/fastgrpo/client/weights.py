"""Encoding weight updates for UpdateWeights, and a mirror of the served weights to verify them.

A trainer that pushes deltas keeps a `WeightMirror`: a copy of exactly what the rollout serves. The
mirror applies each update with the same function the server uses (fastgrpo.wire.updated_values),
so after a push its checksum must equal the one the server returns, bit for bit.
"""
from __future__ import annotations

from typing import Iterator, Literal, Mapping

import torch

from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.wire.tensors import (
    MAX_CHUNK_BYTES,
    chunk_bytes,
    combine_digests,
    encode_tensor,
    tensor_digest,
    unique_state,
    updated_values,
)

Kind = Literal["full", "dense_delta", "lora_delta"]
Target = Literal["policy", "draft"]
KINDS = {"full": pb.UPDATE_KIND_FULL, "dense_delta": pb.UPDATE_KIND_DENSE_DELTA, "lora_delta": pb.UPDATE_KIND_LORA_DELTA}
TARGETS = {"policy": pb.MODEL_TARGET_POLICY, "draft": pb.MODEL_TARGET_DRAFT}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


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
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    encoded = [encode_tensor(name, t) for name, t in tensors.items()]
    header = pb.WeightHeader(
        target=TARGETS[target],
        kind=KINDS[kind],
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
            dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
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
        return updated_values(self.state, KINDS[kind], tensors, lora_scale)

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
