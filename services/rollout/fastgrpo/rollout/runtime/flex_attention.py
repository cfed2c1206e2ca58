"""Paged attention on FlexAttention: queries read keys/values in place from a paged KV pool.

Each head's pool, (num_blocks, block_size, D) of the cache's (Hkv, num_blocks, block_size, D), is
one key sequence of num_blocks * block_size positions; the G = Hq / Hkv query heads of a KV head are folded into the query axis (row q * G + g).
The BlockMask, built with tensor ops from the block table and the logical mask, lists per tile of
query rows the physical blocks to read: fully visible ones as full blocks, partly visible ones with
a mask_mod reading visibility bits by physical key position (such a block belongs to one row).
The mask_mod reads only static-shaped tensors: dynamic ones can make torch's CPU flex template emit
C++ that does not compile (it renames symbols by plain text replacement, hitting longer names).
"""
from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config
from torch.nn.attention.flex_attention import BlockMask, flex_attention

Q_TILE = 64  # query rows per flex Q tile (larger tiles measured no faster on CPU)
MAX_ROWS = 1024  # query rows (queries x G) per flex call; more run in chunks
_WORDS = MAX_ROWS // 64  # int64 words of visibility bits per key position

_flex = torch.compile(flex_attention, dynamic=True)


def paged_block_mask(
    block_table: torch.Tensor, mask: torch.Tensor, num_blocks: int, block_size: int, group: int = 1,
) -> BlockMask:
    """BlockMask over the pool seen as one key sequence of num_blocks * block_size positions, for
    query rows q * group + g (every g of query q sees what q sees).

    block_table (B, nb) long physical block ids; mask (B, Q, nb * block_size) bool over logical
    positions, Q * group <= MAX_ROWS. A table entry with no visible position (padding) is not read.
    """
    B, nb = block_table.shape
    R = mask.shape[1] * group  # query rows
    assert R <= MAX_ROWS, R
    device = mask.device
    nq = -(-R // Q_TILE)
    row = torch.arange(R, device=device)  # (R,)
    blocks = mask.view(B, -1, nb, block_size)  # (B, Q, nb, block_size)
    per_row = blocks.sum(-1, dtype=torch.int32).repeat_interleave(group, 1)  # (B, R, nb) visible keys
    seen = per_row.new_zeros(B, nq, nb).index_add_(1, row // Q_TILE, per_row)  # (B, nq, nb) per tile
    tile_rows = (R - torch.arange(nq, device=device) * Q_TILE).clamp(max=Q_TILE)  # (nq,)
    full = seen == (tile_rows * block_size).to(torch.int32)[:, None]  # (B, nq, nb)
    partial = (seen > 0) & ~full  # (B, nq, nb)
    width = max(num_blocks, nb)  # flex wants index tables as wide as the key sequence has blocks

    def block_lists(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, nq) counts and (B, 1, nq, width) int32 physical ids, the selected ones first."""
        order = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True)  # (B, nq, nb)
        ids = torch.zeros(B, 1, nq, width, dtype=torch.int32, device=device)
        ids[:, 0, :, :nb] = block_table[:, None, :].expand(B, nq, nb).gather(-1, order)
        return selected.sum(-1, dtype=torch.int32)[:, None], ids

    kv_num, kv_ids = block_lists(partial)
    full_num, full_ids = block_lists(full)

    # visibility bits of every key position of the partly visible blocks: bit i of word w says
    # whether row 64 w + i sees it. Other positions are never looked up: left unwritten.
    pb, pj = partial.any(1).nonzero(as_tuple=True)  # (P,) row and logical block of each
    row_bits = blocks[pb, :, pj].repeat_interleave(group, 1).to(torch.int64) << (row % 64)[:, None]  # (P, R, bs)
    words = row_bits.new_zeros(len(pb), -(-R // 64), block_size)  # (P, words, bs)
    words.index_add_(1, row // 64, row_bits)  # distinct bits: the sum is an OR
    bits = torch.empty(num_blocks, block_size, _WORDS, dtype=torch.int64, device=device)
    bits[block_table[pb, pj], :, :words.shape[1]] = words.transpose(1, 2)
    bits = bits.view(num_blocks * block_size, _WORDS)  # (N, _WORDS)
    torch._dynamo.mark_static(bits)  # pool-sized, like the width of the index tables
    for t in (kv_ids, full_ids):
        torch._dynamo.mark_static(t, -1)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (bits[kv_idx, q_idx // 64] >> (q_idx % 64)) & 1 != 0

    return BlockMask.from_kv_blocks(
        kv_num, kv_ids, full_num, full_ids, BLOCK_SIZE=(Q_TILE, block_size), mask_mod=mask_mod,
        seq_lengths=(R, num_blocks * block_size), compute_q_blocks=False,
    )


def flex_paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of q (B, Hq, Q, D) over the blocks of block_table (B, nb) in k_pool/v_pool
    (Hkv, num_blocks, block_size, D); mask (B, Q, nb * block_size) bool over logical positions.
    Returns (B, Hq, Q, D). A block may be partly visible to one row only (listed once): a block
    shared between rows, or listed twice, must be fully visible (or not at all) to each of them."""
    B, Hq, Q, D = q.shape
    Hkv, num_blocks, block_size, _ = k_pool.shape
    G = Hq // Hkv
    chunk = MAX_ROWS // G  # queries per flex call
    if Q > chunk:
        return torch.cat([
            flex_paged_attention(q[:, :, i:i + chunk], k_pool, v_pool, block_table, mask[:, i:i + chunk], scale)
            for i in range(0, Q, chunk)
        ], dim=2)
    block_mask = paged_block_mask(block_table, mask, num_blocks, block_size, G)
    # (B, Hkv, Q * G, D), row q * G + g; always a fresh contiguous tensor, as its strides (and
    # whether it is a view) are part of the compiled graph's guards
    rows = q.new_empty(B, Hkv, Q * G, D)
    rows.view(B, Hkv, Q, G, D).copy_(q.view(B, Hkv, G, Q, D).transpose(2, 3))
    assert k_pool.is_contiguous() and v_pool.is_contiguous()
    # (B, Hkv, N, D) views of the pool with stride 0 over B (also at B = 1): no copy, and a key batch
    # equal to the query batch, so flex does not branch on broadcasting
    shape, strides = (B, Hkv, num_blocks * block_size, D), (0, num_blocks * block_size * D, D, 1)
    k, v = k_pool.as_strided(shape, strides), v_pool.as_strided(shape, strides)
    for t in (k, v):
        torch._dynamo.mark_static(t, 2)
    # size-oblivious: B and the row count do not specialize at 1; no duck sizing: sizes that happen
    # to coincide (a row's key length and the pool's block count) stay independent
    with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):
        out = _flex(rows, k, v, block_mask=block_mask, scale=scale)  # (B, Hkv, Q * G, D)
    return out.view(B, Hkv, Q, G, D).transpose(2, 3).reshape(B, Hq, Q, D)
