"""What an update does to weights: the new values of a full, dense-delta or LoRA-delta update.

The rollout service applies updates with these functions and a trainer's mirror of the served
weights (fastgrpo.client.WeightMirror) previews them with the same ones, so that after every push
the two hold the same bits (old + delta is not exactly new in floating point, and a LoRA product
depends on the order of its arithmetic).
"""
from __future__ import annotations

from typing import Iterable, Literal, Mapping

import torch

from fastgrpo.wire.errors import WireError

UpdateKind = Literal["full", "dense_delta", "lora_delta"]
UPDATE_KINDS: tuple[UpdateKind, ...] = ("full", "dense_delta", "lora_delta")


def lora_product(a: torch.Tensor, b: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """scale * B @ A, computed in float32, as a delta for a weight of dtype out_dtype."""
    assert a.dim() == 2 and b.dim() == 2 and b.shape[1] == a.shape[0], (a.shape, b.shape)
    return (scale * (b.to(torch.float32) @ a.to(torch.float32))).to(out_dtype)  # (out, in)


def lora_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Maps weight name -> (A name, B name) for names "<W>.lora_A" / "<W>.lora_B"; raises on orphans."""
    names = list(names)
    pairs: dict[str, tuple[str, str]] = {}
    for n in names:
        if n.endswith(".lora_A"):
            base = n[: -len(".lora_A")]
            if base + ".lora_B" not in names:
                raise WireError(f"tensors[{n!r}]: LoRA factor without its {base + '.lora_B'!r}")
            pairs[base] = (n, base + ".lora_B")
        elif n.endswith(".lora_B"):
            if n[: -len(".lora_B")] + ".lora_A" not in names:
                raise WireError(f"tensors[{n!r}]: LoRA factor without its lora_A")
        else:
            raise WireError(f"tensors[{n!r}]: a lora_delta update holds only '<weight>.lora_A' / '.lora_B' tensors")
    return pairs


def check_lora_shapes(name: str, a: tuple[int, ...], b: tuple[int, ...], weight: tuple[int, ...]) -> None:
    """Factors A (r, in) and B (out, r) of a weight (out, in), with 1 <= r <= min(out, in) (a larger
    rank adds nothing a full delta could not, and would let a header ask for any memory)."""
    if len(weight) != 2:
        raise WireError(f"tensors[{name!r}]: LoRA adapts matrices; the weight's shape is {list(weight)}")
    out_dim, in_dim = weight
    rank = a[0] if len(a) == 2 else -1
    if len(a) != 2 or len(b) != 2 or a != (rank, in_dim) or b != (out_dim, rank):
        raise WireError(f"tensors[{name!r}]: LoRA factors A {list(a)} and B {list(b)} do not make a delta of shape "
                        f"{[out_dim, in_dim]} (want A [r, {in_dim}], B [{out_dim}, r])")
    if not 1 <= rank <= min(out_dim, in_dim):
        raise WireError(f"tensors[{name!r}].shape: rank {rank} is outside [1, {min(out_dim, in_dim)}] for a "
                        f"{out_dim} x {in_dim} weight")


def updated_values(
    current: Mapping[str, torch.Tensor],
    kind: UpdateKind,
    tensors: Mapping[str, torch.Tensor],
    lora_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """New values of the weights an update touches (current is not modified).

    Every name and shape is checked before anything is computed, so a bad
    update raises WireError with nothing half-applied.
    """
    if kind == "lora_delta":
        pairs = lora_pairs(tensors)
        for base, (an, bn) in pairs.items():
            if base not in current:
                raise WireError(f"tensors[{an!r}]: no weight named {base!r} in the model")
            check_lora_shapes(an, tuple(tensors[an].shape), tuple(tensors[bn].shape), tuple(current[base].shape))
        return {base: current[base] + _like(lora_product(tensors[an], tensors[bn], lora_scale, torch.float32), current[base])
                for base, (an, bn) in pairs.items()}
    if kind not in ("full", "dense_delta"):
        raise WireError(f"header.kind: unknown update kind {kind!r}")
    for name, t in tensors.items():
        if name not in current:
            raise WireError(f"tensors[{name!r}]: no tensor of that name in the model")
        if tuple(t.shape) != tuple(current[name].shape):
            raise WireError(
                f"tensors[{name!r}].shape: {list(t.shape)} but the model's is {list(current[name].shape)}"
            )
    if kind == "full":
        return {name: _like(t, current[name]) for name, t in tensors.items()}
    return {name: current[name] + _like(t, current[name]) for name, t in tensors.items()}


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return t.to(device=ref.device, dtype=ref.dtype)
