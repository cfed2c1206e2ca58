"""Preallocated KV cache with one slot per running sequence.

Layout per layer: (num_slots, num_kv_heads, max_len, head_dim). A sequence owns one slot for its
whole life; position t of the slot holds the keys/values of its token t. Lengths live with the
scheduler (the cache does not know which positions are valid): a forward writes its new tokens at
`starts[b] + q` and attends to everything before `starts[b]` plus the new tokens its mask allows.
Writing past a sequence's valid length (padding, rejected tree nodes) is harmless: the next write
at those positions overwrites them and nothing reads them before that.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store new keys/values. slots (B,), positions (B, Q) cache positions, k/v (B, H_kv, Q, D)."""
        B, H, Q, D = k.shape
        assert slots.shape == (B,) and positions.shape == (B, Q), (slots.shape, positions.shape, k.shape)
        # advanced indices on dims 0 and 2 around a slice put the indexed dims first: (B, Q, H_kv, D)
        self.k[layer][slots[:, None], :, positions] = k.transpose(1, 2)
        self.v[layer][slots[:, None], :, positions] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of positions [0, length) of the given slots: (B, H_kv, length, D) each."""
        return self.k[layer][slots, :, :length], self.v[layer][slots, :, :length]

    def move(self, slots: torch.Tensor, src: torch.Tensor, dst: torch.Tensor):
        """Copy positions src -> dst within each slot, every layer. slots (B,), src/dst (B, n).

        Used to compact an accepted tree path onto consecutive positions. Reads happen before writes,
        so overlapping src/dst ranges are safe.
        """
        assert src.shape == dst.shape and src.shape[0] == slots.shape[0]
        for cache in (*self.k, *self.v):
            moved = cache[slots[:, None], :, src]  # (B, n, H_kv, D) copy
            cache[slots[:, None], :, dst] = moved
