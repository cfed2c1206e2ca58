"""Linears on the CPU through oneDNN's packed weight layout.

MKL's float32 GEMM is slow at the row counts decoding runs at: on the 2-core CPU here the bench
fixture's seven projections per layer take, by rows 1 / 4 / 8 / 16 / 64, 18 / 26 / 28 / 32 / 71 ms a
forward through `F.linear`, and 10 / 8 / 10 / 14 / 41 ms through oneDNN with the weight reordered
into its blocked layout once (`mkldnn._reorder_linear_weight`). The reordered copy is a second copy
of the weights (the served one stays: weight updates, checksums and the draft's training read it).

A packed copy is keyed on its weight and that weight's version counter, so any in-place change of
the weight (a WeightStore commit, the online draft learner's swap, an optimizer step) repacks it on
the next call: nothing has to remember to invalidate it. Writes through `.data` bypass the counter;
nothing in the service writes served weights that way.
"""
from __future__ import annotations

import weakref

import torch

ONEDNN = torch.backends.mkldnn.is_available()  # (read once: a compiled graph cannot call it)
# id(weight) -> (weakref to the weight, its version when packed, the packed copy)
_PACKED: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def packable(weight: torch.Tensor) -> bool:
    """Whether linears over `weight` can run packed here: float32 on a CPU with oneDNN, no autograd
    (the packed op has no backward; the draft's training takes the plain path)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and ONEDNN)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of `weight` (out, in), current with its version counter."""
    key = id(weight)
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        # the entry goes with its weight (a later weight may reuse the id only after this one died)
        _PACKED[key] = (weakref.ref(weight, lambda _, k=key: _PACKED.pop(k, None)), weight._version, packed)
        return packed
    return entry[2]


def linear_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, x (..., in) -> (..., out), through the packed weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")


# A compiled graph cannot take the packed (opaque) tensor as an input, so it calls this op with the
# served weight, and the op looks the packed copy up at run time.
@torch.library.custom_op("fastgrpo::linear_packed", mutates_args=())
def linear_packed_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return linear_packed(x, weight, bias)


@linear_packed_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
