"""Tensor dtypes by the names that travel (a header's manifest, a status's model dtype) and are
given on command lines. The one table both sides use; it knows nothing of protobuf, so the rollout
engine's lower layers may read it too."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (any other dtype by its torch name)."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def dtype_from_name(name: str) -> torch.dtype:
    """"bfloat16" -> torch.bfloat16; ValueError naming the known dtypes for anything else."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]
