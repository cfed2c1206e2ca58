"""Bounded buffer of captured (target feature, next token) sequences for online draft learning.

Every finished sequence contributes all of its pairs — also the ones a learner will later drop for
zero advantage: the draft learns the policy's distribution, not the reward. The buffer is bounded
in bytes; the oldest sequences are dropped first, and what was dropped is counted.
"""
from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass

from fastgrpo.rollout.speculative.pairs import FeatureSequence


@dataclass(frozen=True)
class BufferStats:
    sequences: int
    bytes: int
    added_sequences: int
    added_pairs: int
    dropped_sequences: int
    dropped_bytes: int


class CaptureBuffer:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: deque[tuple[int, FeatureSequence]] = deque()  # (serial, sequence), oldest first
        self._bytes = 0
        self._serial = 0
        self._added_pairs = 0
        self._dropped = 0
        self._dropped_bytes = 0
        self._lock = threading.Lock()

    def add(self, seq: FeatureSequence) -> None:
        size = seq.nbytes()
        with self._lock:
            self._items.append((self._serial, seq))
            self._serial += 1
            self._added_pairs += len(seq.tokens)
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                _, old = self._items.popleft()
                self._bytes -= old.nbytes()
                self._dropped += 1
                self._dropped_bytes += old.nbytes()

    def since(self, serial: int) -> list[FeatureSequence]:
        """Sequences added at or after `serial` that are still held (oldest first)."""
        with self._lock:
            return [s for n, s in self._items if n >= serial]

    def sample(self, n: int, rng: random.Random) -> list[FeatureSequence]:
        with self._lock:
            items = [s for _, s in self._items]
        return rng.sample(items, min(n, len(items)))

    @property
    def serial(self) -> int:
        """Serial number the next added sequence will get."""
        return self._serial

    def stats(self) -> BufferStats:
        with self._lock:
            return BufferStats(len(self._items), self._bytes, self._serial, self._added_pairs, self._dropped,
                               self._dropped_bytes)
