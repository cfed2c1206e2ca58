"""Served weights of one model: version, checksum, and streamed updates applied atomically.

An update goes through three stages, and only the last touches the model:
  1. `begin(header)`: the header is checked against the served model (target, kind, versions,
     every tensor name / shape / dtype / byte length) before a byte of data is read;
  2. `receive(chunk)`: bytes are cut into tensors as they arrive; each tensor's sha256 is checked
     the moment its last byte arrives;
  3. `commit()`, on the engine thread between two decode steps: every new value is computed first
     and checked to be finite, then copied in, then the version and checksum move. A failure in
     1-3 leaves the model as it was.
What may arrive is bounded by the header check: full and dense updates carry the model's own
shapes, LoRA factors a rank of at most min(out, in) of their weight, so an update never asks for
more memory than about twice the weights it touches.
"""
from __future__ import annotations

import math
import threading
import time

import torch

from fastgrpo.common.weight_updates import check_lora_shapes, lora_pairs, updated_values
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.wire.convert import UPDATE_KINDS, name_of
from fastgrpo.wire.dtypes import dtype_name
from fastgrpo.wire.errors import WireError
from fastgrpo.wire.records import UpdateResult
from fastgrpo.wire.tensors import MAX_CHUNK_BYTES, TensorMeta, combine_digests, decode_tensor, tensor_digest, unique_state

MAX_VERSION_STEP = 2**31  # how far one update may move the version: INT64_MAX would lock out every later push


def non_finite(name: str, t: torch.Tensor, what: str) -> None:
    """Raises INVALID_ARGUMENT naming `name` when `t` holds NaN or Inf (`what` says where they are)."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise WireError(f"tensors[{name!r}]: {what} {bad} NaN or Inf value{'s' if bad > 1 else ''}; nothing was applied")


class WeightStore:
    """Version and checksum of a served module; the one place its weights are changed."""

    def __init__(self, module: torch.nn.Module, version: int = 0):
        self.module = module
        self.params = unique_state(module.state_dict())
        self.version = version
        self._digests = {name: tensor_digest(t) for name, t in self.params.items()}
        self.checksum = combine_digests(self._digests)
        self._lock = threading.Lock()  # guards version/checksum against concurrent commits

    def begin(self, header: pb.WeightHeader) -> "PendingUpdate":
        if name_of(UPDATE_KINDS, header.kind) is None:
            raise WireError(f"header.kind: unknown update kind {header.kind}")
        if not header.base_version < header.new_version <= header.base_version + MAX_VERSION_STEP:
            raise WireError(
                f"header.new_version: {header.new_version} must be greater than base_version {header.base_version} "
                f"and at most {MAX_VERSION_STEP} above it"
            )
        self._check_base(header.base_version)
        metas = [TensorMeta.from_pb(spec) for spec in header.tensors]
        if not metas:
            raise WireError("header.tensors: the manifest is empty")
        names = [m.name for m in metas]
        if len(set(names)) != len(names):
            raise WireError("header.tensors: a tensor name appears twice")
        if header.kind == pb.UPDATE_KIND_LORA_DELTA:
            if not math.isfinite(header.lora.scale):
                raise WireError(f"header.lora.scale: must be finite, got {header.lora.scale}")
            by_name = {m.name: m for m in metas}
            for base, (a_name, b_name) in lora_pairs(names).items():  # factors come in pairs
                if base not in self.params:
                    raise WireError(f"tensors[{a_name!r}]: no weight named {base!r} in the model{self._alias_hint(base)}")
                # checked before a byte is read: a header cannot make the server buffer factors of any size
                check_lora_shapes(a_name, by_name[a_name].shape, by_name[b_name].shape, tuple(self.params[base].shape))
                for m in (by_name[a_name], by_name[b_name]):
                    self._check_dtype(m, self.params[base].dtype)
        else:
            for m in metas:
                if m.name not in self.params:
                    raise WireError(f"tensors[{m.name!r}]: no tensor of that name in the model{self._alias_hint(m.name)}")
                want = tuple(self.params[m.name].shape)
                if m.shape != want:
                    raise WireError(f"tensors[{m.name!r}].shape: {list(m.shape)} but the model's is {list(want)}")
                self._check_dtype(m, self.params[m.name].dtype)
        return PendingUpdate(self, header, metas)

    @staticmethod
    def _check_dtype(meta: TensorMeta, served: torch.dtype) -> None:
        # the sender casts to the served dtype, so that it can mirror exactly what is served
        if meta.dtype != served:
            raise WireError(
                f"tensors[{meta.name!r}].dtype: {dtype_name(meta.dtype)} but the served weight is "
                f"{dtype_name(served)}; send {dtype_name(served)}"
            )

    def _alias_hint(self, name: str) -> str:
        full = self.module.state_dict()
        if name in full:
            return " (it is tied to another weight; send that one)"
        return ""

    def _check_base(self, base_version: int) -> None:
        if base_version != self.version:
            raise WireError(
                f"header.base_version: update was computed against version {base_version} but version "
                f"{self.version} is served",
                "FAILED_PRECONDITION",
            )

    @torch.no_grad()
    def commit(self, pending: "PendingUpdate") -> UpdateResult:
        """Applies a fully received update. Call between decode steps (engine.run_exclusive)."""
        with self._lock:
            self._check_base(pending.header.base_version)
            kind = name_of(UPDATE_KINDS, pending.header.kind)
            new_values = updated_values(self.params, kind, pending.tensors, pending.header.lora.scale)
            for name, value in new_values.items():  # a finite update can still overflow the served dtype
                non_finite(name, value, f"the update would make the served {dtype_name(value.dtype)} weight hold")
            self._set(new_values, pending.header.new_version)
            return UpdateResult(self.version, self.checksum, time.monotonic() - pending.started, pending.received)

    @torch.no_grad()
    def replace(self, values: dict[str, torch.Tensor], version: int) -> None:
        """Serves `values` (same names and shapes) as `version`: the online draft learner's swap."""
        with self._lock:
            unknown = set(values) - set(self.params)
            if unknown:
                raise ValueError(f"unknown tensors {sorted(unknown)[:3]}")
            self._set(values, version)

    def _set(self, new_values: dict[str, torch.Tensor], version: int) -> None:
        for name, value in new_values.items():  # shapes were checked: nothing fails past this point
            self.params[name].copy_(value)
        for name in new_values:
            self._digests[name] = tensor_digest(self.params[name])
        self.checksum = combine_digests(self._digests)
        self.version = version


class PendingUpdate:
    """Bytes of an update being received; tensors are decoded and hash-checked one by one."""

    def __init__(self, store: WeightStore, header: pb.WeightHeader, metas: list[TensorMeta]):
        self.store = store
        self.header = header
        self.metas = metas
        self.tensors: dict[str, torch.Tensor] = {}
        self.received = 0
        self.started = time.monotonic()
        self._index = 0
        self._buffer = bytearray()
        self._total = sum(m.byte_length for m in metas)
        self._drain()  # zero-length tensors are complete before any data

    def receive(self, data: bytes) -> None:
        if len(data) > MAX_CHUNK_BYTES:
            raise WireError(f"data: chunk of {len(data)} bytes exceeds the {MAX_CHUNK_BYTES}-byte limit")
        if self.received + len(data) > self._total:
            raise WireError(f"data: more bytes than the manifest declares ({self._total})")
        self.received += len(data)
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        while self._index < len(self.metas) and len(self._buffer) >= self.metas[self._index].byte_length:
            meta = self.metas[self._index]
            raw = bytes(self._buffer[: meta.byte_length])
            del self._buffer[: meta.byte_length]
            tensor = decode_tensor(meta, raw)
            non_finite(meta.name, tensor, "the update carries")
            self.tensors[meta.name] = tensor
            self._index += 1

    def finish(self) -> None:
        """Raises DATA_LOSS unless every declared byte arrived."""
        if self._index < len(self.metas):
            missing = self.metas[self._index].name
            raise WireError(
                f"stream ended after {self.received} of {self._total} bytes; tensor {missing!r} is incomplete",
                "DATA_LOSS",
            )
