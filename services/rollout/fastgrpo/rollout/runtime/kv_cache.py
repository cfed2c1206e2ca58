"""Paged KV cache: a pool of fixed-size blocks per layer, addressed through per-sequence block tables.

Layout per layer: (num_kv_heads, num_blocks, block_size, head_dim), so that each head's pool is one
contiguous key sequence (FlexAttention reads it in place) and a gathered context is contiguous in
(positions, head_dim) per head, as SDPA reads it fastest. Logical position p of a sequence lives in
block `table[p // block_size]` at offset `p % block_size`; which blocks a
sequence owns, and which it shares, is the scheduler's bookkeeping (runtime.blocks.BlockManager).
Block 0 is scratch: block tables are padded with it, so a write past a sequence's blocks (right
padding of a batch, a row's unused tree positions) lands there, and reads of it are masked out.
Writing past a sequence's valid length inside its own blocks is harmless as before: the next write
at those positions overwrites them and nothing reads them until then.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

SCRATCH_BLOCK = 0
ATTENTION_BACKENDS = ("gather", "flex")
# keys and values the gather backend copies at once. Decode at B = 64, 512-token contexts on the
# bench fixture (2-core CPU), tokens/s by this bound: 1 MiB 209, 4 MiB 365, 16 MiB 411, 32 MiB
# 376, unbounded (48 MiB) 357
GATHER_BYTES = 16 * 2**20


def padded_tables(tables: list[list[int]], width: int, device: torch.device | str) -> torch.Tensor:
    """Block tables (lists of block ids) as a (B, width) tensor: cut to width, or padded with the
    scratch block."""
    return torch.tensor([t[:width] + [SCRATCH_BLOCK] * (width - len(t[:width])) for t in tables], dtype=torch.long,
                        device=device)


def token_slots(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat pool index of logical `positions` (B, Q) of the rows of `table` (B, nb): (B, Q) long.
    Positions past a row's table map into the scratch block."""
    nb = table.shape[1]
    block = positions.div(block_size, rounding_mode="floor")  # (B, Q)
    physical = table.gather(1, block.clamp(max=nb - 1))  # (B, Q)
    physical = torch.where(block < nb, physical, torch.full_like(physical, SCRATCH_BLOCK))
    return physical * block_size + positions % block_size


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, backend: str = "gather"):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {backend!r}")
        shape = (num_kv_heads, num_blocks, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.backend = backend
        self._scratch: torch.Tensor | None = None  # (2, n) the eager gathers' keys and values (_gather)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores new keys/values at flat pool slots (B, Q) (token_slots). k/v (B, H_kv, Q, D)."""
        H, D = k.shape[1], k.shape[3]
        where = self._where(slots, H)
        self.k[layer].index_put_(where, k.transpose(0, 1).reshape(H, -1, D))
        self.v[layer].index_put_(where, v.transpose(0, 1).reshape(H, -1, D))

    def _where(self, slots: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advanced indices (head, block, offset) of flat slots, every head: a pool is written in
        place through these, never through a view of it. (A compiled step that writes a pool twice
        through views -- the draft's tree levels, the verify step's settling -- makes inductor copy
        the whole pool instead: 330 ms a step for a 1 GB pool on the CPU here.)"""
        index = slots.reshape(-1)
        bs = self.block_size
        return torch.arange(heads, device=index.device)[:, None], index.div(bs, rounding_mode="floor"), index % bs

    def attend(self, layer: int, q: torch.Tensor, table: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of queries q (B, Hq, Q, D) over the blocks of `table` (B, nb); mask (B, 1, Q, nb *
        block_size) over logical positions. Returns (B, Hq, Q, D)."""
        if self.backend == "flex":
            from fastgrpo.rollout.runtime.flex_attention import flex_paged_attention
            return flex_paged_attention(q, self.k[layer], self.v[layer], table, mask[:, 0], scale)
        B, nb = table.shape
        H, num_blocks, bs, D = self.k[layer].shape
        # rows at a time whose gathered keys and values stay within GATHER_BYTES: a long context is
        # never copied whole, and the copy stays nearer the CPU's caches
        rows = max(1, GATHER_BYTES // (2 * H * nb * bs * D * self.k[layer].element_size()))
        if rows >= B:
            return self._gather_attend(layer, q, table, mask, scale)
        return torch.cat([self._gather_attend(layer, q[i:i + rows], table[i:i + rows], mask[i:i + rows], scale)
                          for i in range(0, B, rows)])

    def _gather_attend(self, layer: int, q: torch.Tensor, table: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
        B, nb = table.shape
        H, num_blocks, bs, D = self.k[layer].shape
        # one copy of the rows' blocks, every head: (H_kv * B * nb) contiguous blocks, which SDPA
        # reads as (B, H_kv, T, D) through strides (index_select over 2-D rows: a plain row copy,
        # several times faster than over (block_size, D) ones)
        index = (torch.arange(H, device=table.device)[:, None] * num_blocks + table.reshape(1, -1)).reshape(-1)
        keys, values = (self._gather(pool.view(H * num_blocks, bs * D), index, i).view(H, B, nb * bs, D).transpose(0, 1)
                        for i, pool in enumerate((self.k[layer], self.v[layer])))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[1] != H)

    def _gather(self, rows: torch.Tensor, index: torch.Tensor, which: int) -> torch.Tensor:
        """rows[index] (n, bs * D). Eager: into scratch buffer `which` (0 keys, 1 values), reused by
        every layer and step: a fresh multi-MB tensor per gather faults its pages in each time
        (B = 64 decode on the bench fixture: 37 ms of a step's gathers, 7 ms into reused buffers)."""
        if torch.compiler.is_compiling() or rows.requires_grad:  # (a pool written with autograd: a test's)
            return rows.index_select(0, index)
        n = index.numel() * rows.shape[1]
        if self._scratch is None or self._scratch.shape[1] < n:
            with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode
                self._scratch = rows.new_empty((2, n))
        return torch.index_select(rows, 0, index, out=self._scratch[which, :n].view(-1, rows.shape[1]))

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copies the tokens at flat slots src -> dst (same shape), every layer. Reads happen before
        writes, so overlapping ranges are safe (used to compact an accepted tree path)."""
        for cache in (*self.k, *self.v):
            H = cache.shape[0]
            cache.index_put_(self._where(dst, H), cache[self._where(src, H)])

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copies whole blocks src[i] -> dst[i], every layer (copy on write of a shared last block)."""
        if not src:
            return
        s = torch.tensor(src, device=self.k[0].device)
        d = torch.tensor(dst, device=self.k[0].device)
        for cache in (*self.k, *self.v):
            cache[:, d] = cache[:, s]


_UNITS = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
CPU_AUTO_CAP = 4 * 2**30


def parse_bytes(text: str) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, '1000' -> 1000 (case does not matter)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (e.g. 1073741824, 512MiB, 2GiB, 4G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def kv_budget_bytes(memory: str, fraction: float, device: torch.device) -> int:
    """The KV cache's byte budget: `memory` as given, or for "auto" `fraction` of the GPU memory free
    now (after the models loaded), or on the CPU a quarter of the available memory, at most 4 GiB."""
    if memory != "auto":
        return parse_bytes(memory)
    if device.type == "cuda":
        if not 0 < fraction <= 1:
            raise ValueError(f"--kv-cache-fraction must be in (0, 1], got {fraction}")
        torch.cuda.empty_cache()  # memory freed (a profile's cache) but still held by the allocator
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return min(CPU_AUTO_CAP, available_memory() // 4)


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (the CPU auto cap where there is none)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * CPU_AUTO_CAP
