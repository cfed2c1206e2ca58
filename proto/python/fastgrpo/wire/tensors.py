"""Tensors on the wire: raw little-endian bytes with dtype and shape, sha256 per tensor, and the
weight checksum both sides compute. Nothing here unpickles: bytes become tensors only through
`torch.frombuffer` with a dtype and shape declared up front and checked against the byte count.

Both the rollout service and its clients import this module, so that "what the learner thinks is
served" and "what is served" are computed by one piece of code.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch

from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.wire.dtypes import DTYPES, dtype_name
from fastgrpo.wire.errors import WireError

MAX_CHUNK_BYTES = 4 * 1024 * 1024  # gRPC's default message limit is 4 MiB; chunks stay below it

# proto enum DTYPE_<NAME> for every dtype of the shared table
_TORCH_TO_PB = {dtype: pb.DType.Value(f"DTYPE_{name.upper()}") for name, dtype in DTYPES.items()}
_PB_TO_TORCH = {v: k for k, v in _TORCH_TO_PB.items()}


@dataclass(frozen=True)
class TensorMeta:
    """Declaration of one tensor: what its bytes must be."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    byte_length: int
    sha256: str

    def to_pb(self) -> pb.TensorSpec:
        return pb.TensorSpec(
            name=self.name,
            dtype=_TORCH_TO_PB[self.dtype],
            shape=list(self.shape),
            byte_length=self.byte_length,
            sha256=self.sha256,
        )

    @staticmethod
    def from_pb(spec: pb.TensorSpec) -> "TensorMeta":
        if spec.dtype not in _PB_TO_TORCH:
            raise WireError(f"tensors[{spec.name!r}].dtype: unsupported dtype {spec.dtype}")
        if any(d < 0 for d in spec.shape):
            raise WireError(f"tensors[{spec.name!r}].shape: negative dimension in {list(spec.shape)}")
        dtype = _PB_TO_TORCH[spec.dtype]
        expected = _numel(spec.shape) * dtype.itemsize
        if spec.byte_length != expected:
            raise WireError(
                f"tensors[{spec.name!r}].byte_length: {spec.byte_length} does not match "
                f"shape {list(spec.shape)} x {dtype_name(dtype)} = {expected} bytes"
            )
        return TensorMeta(spec.name, dtype, tuple(int(d) for d in spec.shape), spec.byte_length, spec.sha256.lower())


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def tensor_bytes(t: torch.Tensor) -> bytes:
    """C-order little-endian bytes of `t` (on the CPU, in its own dtype)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _TORCH_TO_PB:
        raise WireError(f"unsupported dtype {t.dtype}")
    # view as uint8 keeps bf16 (which numpy lacks) and avoids any copy through numpy
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts in CI
        raise WireError("big-endian hosts are not supported")
    return raw


def encode_tensor(name: str, t: torch.Tensor) -> tuple[TensorMeta, bytes]:
    raw = tensor_bytes(t)
    meta = TensorMeta(name, t.dtype, tuple(t.shape), len(raw), hashlib.sha256(raw).hexdigest())
    return meta, raw


def decode_tensor(meta: TensorMeta, raw: bytes | bytearray | memoryview) -> torch.Tensor:
    """Bytes -> tensor after checking length and sha256. Raises WireError (DATA_LOSS on a bad hash)."""
    if len(raw) != meta.byte_length:
        raise WireError(
            f"tensors[{meta.name!r}]: got {len(raw)} bytes, manifest says {meta.byte_length}", "DATA_LOSS"
        )
    digest = hashlib.sha256(raw).hexdigest()
    if digest != meta.sha256:
        raise WireError(f"tensors[{meta.name!r}]: sha256 {digest} does not match manifest {meta.sha256}", "DATA_LOSS")
    if meta.byte_length == 0:
        return torch.empty(meta.shape, dtype=meta.dtype)
    buf = bytearray(raw)  # frombuffer needs a writable buffer it can own
    return torch.frombuffer(buf, dtype=meta.dtype).reshape(meta.shape).clone()


def chunk_bytes(parts: Iterable[bytes], chunk_size: int = MAX_CHUNK_BYTES) -> Iterator[bytes]:
    """Concatenation of `parts`, cut into pieces of at most `chunk_size` bytes."""
    if not 0 < chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be in (0, {MAX_CHUNK_BYTES}], got {chunk_size}")
    pending = bytearray()
    for part in parts:
        pending += part
        while len(pending) >= chunk_size:
            yield bytes(pending[:chunk_size])
            del pending[:chunk_size]
    if pending:
        yield bytes(pending)


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's values as float32 little-endian bytes, with its dtype and shape.

    float32 makes equal values hash equal whatever the served dtype (bf16/fp16 -> float32 is exact),
    so a bf16 server and a learner mirroring it in bf16 agree.
    """
    h = hashlib.sha256()
    h.update(dtype_name(t.dtype).encode())
    h.update(repr(tuple(t.shape)).encode())
    h.update(tensor_bytes(t.detach().to(torch.float32)))
    return h.hexdigest()


def combine_digests(digests: Mapping[str, str]) -> str:
    """The weight checksum: sha256 over (name, per-tensor digest) in name order. Per-tensor digests
    let a server re-hash only the tensors an update touched."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode())
        h.update(b"\0")
        h.update(digests[name].encode())
    return h.hexdigest()


def state_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """Checksum of a state dict (use `unique_state` first so tied weights count once)."""
    return combine_digests({name: tensor_digest(t) for name, t in state.items()})


def unique_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """state_dict without aliases: tied weights (e.g. lm_head tied to the embedding) appear once, under
    their first name in sorted order. This is the set of names updates may address, and what the
    checksum covers, so a delta can never be added twice to one storage."""
    seen: dict[tuple[int, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen[key] = name
        out[name] = t
    return out
