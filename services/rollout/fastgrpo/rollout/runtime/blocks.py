"""Which KV-cache blocks are free, who holds each, and which hold a known prompt prefix.

Bookkeeping only: the tensors live in runtime.kv_cache.PagedKVCache (and the draft's cache, which
uses the same block ids). A block is held by reference count. A full block of prompt tokens can be
registered under the digest of every token up to its end (a chain of sha256 over the block's tokens
and its parent's digest, as vLLM's prefix caching keys them), so that a later sequence with the same
prefix shares it instead of computing it again. A registered block nobody holds stays cached until
its memory is needed (least recently released first); an unregistered one goes straight back to
the free list. `forget_prefixes` drops every registration (weights changed: old keys are stale).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from fastgrpo.rollout.runtime.kv_cache import SCRATCH_BLOCK


@dataclass(frozen=True)
class BlockStats:
    total: int  # usable blocks (the scratch block not counted)
    used: int  # held by at least one sequence
    cached: int  # held by none, kept for their prefix until the memory is needed
    free: int  # neither


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (one is scratch); got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # block 0 is scratch, never handed out
        self._cached: OrderedDict[int, None] = OrderedDict()  # unheld registered blocks, oldest first
        self._by_digest: dict[bytes, int] = {}
        self._digest_of: dict[int, bytes] = {}

    @property
    def available(self) -> int:
        """Blocks an allocation can take now: free ones, then cached ones (evicted)."""
        return len(self._free) + len(self._cached)

    def stats(self) -> BlockStats:
        total = self.num_blocks - 1
        return BlockStats(total, total - self.available, len(self._cached), len(self._free))

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, each held once. The caller checks `available` first."""
        if n > self.available:
            raise MemoryError(f"{n} KV blocks asked for, {self.available} available")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently released cached prefix block
                block, _ = self._cached.popitem(last=False)
                del self._by_digest[self._digest_of.pop(block)]
            self._refs[block] = 1
            out.append(block)
        return out

    def hold(self, block: int) -> None:
        """One more holder of an allocated or cached block."""
        if self._refs[block] == 0:
            del self._cached[block]
        self._refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            assert block != SCRATCH_BLOCK and self._refs[block] > 0, block
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._digest_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def digests(self, tokens: tuple[int, ...], n_blocks: int) -> list[bytes]:
        """Digest of each of the first n_blocks full blocks of `tokens` (each covers its whole prefix)."""
        bs, out, parent = self.block_size, [], b""
        for i in range(n_blocks):
            h = hashlib.sha256(parent)
            h.update(array("l", tokens[i * bs:(i + 1) * bs]).tobytes())
            parent = h.digest()
            out.append(parent)
        return out

    def lookup(self, digests: list[bytes]) -> list[int]:
        """The registered blocks of the longest known prefix among `digests` (not yet held)."""
        out = []
        for d in digests:
            block = self._by_digest.get(d)
            if block is None:
                break
            out.append(block)
        return out

    def register(self, digests: list[bytes], blocks: list[int]) -> None:
        """Registers held blocks under the digests of their contents (ones already known are kept)."""
        for d, block in zip(digests, blocks):
            if d not in self._by_digest and block not in self._digest_of:
                self._by_digest[d] = block
                self._digest_of[block] = d

    def forget_prefixes(self) -> None:
        """Unregisters every block: cached ones become free, held ones are freed when released."""
        self._by_digest.clear()
        self._digest_of.clear()
        self._free.extend(reversed(self._cached))
        self._cached.clear()
