"""What one forward of the model runner takes and returns: new tokens of B sequences, where they sit
in the KV cache and what they may attend to; logits and the hidden states that feed lm_head."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardBatch:
    """New tokens of B sequences, Q per sequence (right-padded where sequences have fewer).

    Cache positions below `region_start` are the sequence's settled past: every new token sees
    them. Positions from `region_start` to `starts + Q` form a region (tree nodes already in the
    cache, then the new tokens) in which `region_mask[b, q, r]` says whether new token q sees
    region position r. Default: the region is just the new tokens, causally masked.
    """

    tokens: torch.Tensor  # (B, Q) long
    positions: torch.Tensor  # (B, Q) long, rotary positions (depth-based inside a tree)
    block_table: torch.Tensor  # (B, nb) long, KV-cache blocks of each sequence (padded with the scratch block)
    starts: torch.Tensor  # (B,) long, cache position where the first new token is written
    region_mask: torch.Tensor | None = None  # (B, Q, R) bool; None = causal over the new tokens
    region_start: torch.Tensor | None = None  # (B,) long; None = starts (R = Q)
    # blocks the keys span, known on the host (a compiled step pads it to a bucket); None: read
    # from starts, which waits for the device
    key_blocks: int | None = None

    def __post_init__(self):
        B, Q = self.tokens.shape
        assert self.positions.shape == (B, Q) and self.block_table.shape[0] == B and self.starts.shape == (B,)
        assert self.region_mask is None or self.region_mask.shape[:2] == (B, Q)
        if self.region_start is not None and self.key_blocks is None:  # (the check reads the device)
            assert self.region_mask is not None and bool((self.starts - self.region_start + Q == self.region_mask.shape[2]).all())


@dataclass(frozen=True)
class ForwardOutput:
    logits: torch.Tensor  # (B, Q, V) float32, or (B, V) when logits_at was given
    hidden: torch.Tensor  # (B, Q, H): the final-norm hidden state that feeds lm_head
