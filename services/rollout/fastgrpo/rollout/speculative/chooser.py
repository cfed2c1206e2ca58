"""Which way a decode step runs, chosen by measurement: plainly, with the text chains alone, or
with the draft head (and the chains).

The controller sizes a tree from C_peak and the acceptance it has seen, but it does not know what
drafting costs here: on a small model or a host-bound device a draft forward costs about as much as
a target forward, and a tree that is accepted three tokens deep can still emit fewer tokens per
second than plain decoding. So every step that has more than one way open records the tokens it
emitted per second of step time, per way and per batch size (power-of-two bins, a moving average),
and the next step of that size takes the fastest. Each way is tried once per bin before anything is
known (cheapest first: the chains alone, then plain, then the head), and the ways that are behind
are tried again in turn every `explore` steps, as rates move with the policy, the text and the draft.

The choice depends on past steps only, never on the step's own draws, and every way is lossless on
its own (plain decoding trivially; the tree's verification for the others): the emitted tokens keep
the target's distribution whichever way each step takes.
"""
from __future__ import annotations

from collections import Counter
from typing import Literal, Sequence

Way = Literal["text", "plain", "head"]
WAYS: tuple[Way, ...] = ("text", "plain", "head")  # the order in which a new bin tries them


class StepChooser:
    def __init__(self, explore: int = 8, keep: float = 0.8):
        if explore < 2 or not 0.0 <= keep < 1.0:
            raise ValueError(f"need explore >= 2 and 0 <= keep < 1, got {explore}, {keep}")
        self.explore, self.keep = explore, keep
        self.rates: dict[tuple[int, Way], float] = {}  # (batch bin, way) -> tokens per second
        # steps taken each way since start; every key there from the start (other threads read it)
        self.steps: Counter[Way] = Counter(dict.fromkeys(WAYS, 0))
        self._chosen = 0  # choices made, for the exploration turn

    @staticmethod
    def _bin(batch: int) -> int:
        return 1 << (batch.bit_length() - 1)

    def choose(self, batch: int, ways: Sequence[Way]) -> Way:
        """The way this step of `batch` sequences takes, among those open to it."""
        b = self._bin(batch)
        ordered = [w for w in WAYS if w in ways]
        if len(ordered) == 1:
            return ordered[0]
        self._chosen += 1
        unknown = [w for w in ordered if (b, w) not in self.rates]
        if unknown:
            return unknown[0]
        ranked = sorted(ordered, key=lambda w: self.rates[(b, w)], reverse=True)
        turn = self._chosen // self.explore
        if self._chosen % self.explore == 0:  # explore one of those behind, in turn
            return ranked[1 + turn % (len(ranked) - 1)]
        return ranked[0]

    def record(self, batch: int, way: Way, tokens: int, seconds: float) -> None:
        """A step of `batch` sequences went `way` and emitted `tokens` in `seconds`."""
        self.steps[way] += 1
        if seconds <= 0:
            return
        key = (self._bin(batch), way)
        rate = tokens / seconds
        old = self.rates.get(key)
        self.rates[key] = rate if old is None else self.keep * old + (1 - self.keep) * rate
