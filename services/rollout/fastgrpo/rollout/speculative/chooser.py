"""Which way a decode step runs, chosen by measurement: plainly, with the text chains alone, or
with the draft head (and the chains).

The controller sizes a tree from C_peak and the acceptance it has seen, but it does not know what
drafting costs here: on a small model or a host-bound device a draft forward costs about as much as
a target forward, and a tree that is accepted three tokens deep can still emit fewer tokens per
second than plain decoding. So every step that has more than one way open records the tokens it
emitted per second of step time and per sequence, per way and per batch size (power-of-two bins, a
moving average), and the next step of that size takes the fastest. The first bin tries each way
once (cheapest first: the chains alone, then plain, then the head); later bins start from the rates
of the nearest bin that knows them (rates and step times alike, so a borrowed way is retried as its
cost says: a cheap one soon, and a bad borrow cannot keep a bin on a slow way). A way that is
behind is tried again from time to time, as rates move with the policy, the text and the draft --
the more a try costs, the more rarely, so that those tries cost a few percent of the time, all ways
together. A try's cost is the time it loses against the leader for the tokens it emits, counted in
the leader's steps: a head step that lasts 3.4 plain steps and emits tokens at 0.8 of plain's rate
loses 0.7 of a plain step (on a small model or a host-bound device a head step can cost several
plain steps: tried as often as the others, it would eat what the choice saves). Each interval is
stretched by a factor drawn in [0.5, 1.5) at every measurement: GRPO steps are alike, and a fixed
interval locks onto their period, trying a way at the same point of every step (the sources bench,
whose rounds are alike, saw one mode try plain decoding in 19 of 20 measured runs and another in
none).

A bin spans B to 2B - 1 sequences, and as a GRPO batch drains a way may be measured at the top of a
bin and another at its bottom. Where trees run, a step's time barely moves with the batch size
(they run where C_peak / B >= 2, below the latency knee), so its tokens grow with the rows while its
seconds do not: in tokens per second, a way measured near 2B looks nearly twice as fast as one
measured near B (bench fixture, in-process, 4 x 8: plain decoding, measured near B = 15, led the
head in 14 of the 41 steps at B = 8-15 at 145 tokens/s against the head's 249). Per sequence, the
two compare as they would at the same size.

Rates are kept apart by a regime the caller names, for steps whose ways are worth different things
in kind: the engine's is whether most rows have their prompt's earlier completions to draft from
(with them, chains alone ran at 1.41x plain at B = 8 on the CPU here; without, at 0.97x), so the
second epoch of a prompt set does not inherit what the chains were worth in the first. Only the
chains' way differs in kind: a plain step is the same step in every regime, and a head step
differs by the chains it takes in where they are worth it, so a bin new to a regime starts with
the head's and plain's figures of the same batch size in another regime (taken as they are, each
replaced by its first measurement here) and tries the chains' way alone. Borrowing the head's
rate from another batch size instead would scale it by what the chains are worth there, which
moves with the tree's size (bench fixture, with history: chains alone ran at 0.94x the head's
rate at B = 16 and 0.49x at B = 4).

The choice depends on past steps only, never on the step's own draws, and every way is lossless on
its own (plain decoding trivially; the tree's verification for the others): the emitted tokens keep
the target's distribution whichever way each step takes.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Hashable, Literal, Sequence

from fastgrpo.wire.records import WayRate

Way = Literal["text", "plain", "head"]
WAYS: tuple[Way, ...] = ("text", "plain", "head")  # the order in which a new bin tries them
SHARED: tuple[Way, ...] = ("plain", "head")  # ways a bin new to a regime takes from another regime
# a bin: (regime, power-of-two batch size); the regime, the caller's, tells apart steps whose ways
# differ in kind (the engine's: whether most rows have the prompt's earlier completions)
Bin = tuple[Hashable, int]


class StepChooser:
    def __init__(self, explore: int = 8, max_explore: int = 256, budget: float = 0.03, keep: float = 0.8,
                 seed: int | None = None):
        if not 2 <= explore <= max_explore or not 0.0 < budget < 1.0 or not 0.0 <= keep < 1.0:
            raise ValueError(f"need 2 <= explore <= max_explore, 0 < budget < 1 and 0 <= keep < 1, got {explore}, "
                             f"{max_explore}, {budget}, {keep}")
        self.explore, self.max_explore, self.budget, self.keep = explore, max_explore, budget, keep
        self.rates: dict[tuple[Bin, Way], float] = {}  # (bin, way) -> tokens per second per sequence
        self.seconds: dict[tuple[Bin, Way], float] = {}  # (bin, way) -> seconds a step (borrowed ones too)
        # steps taken each way since start; every key there from the start (other threads read it)
        self.steps: Counter[Way] = Counter(dict.fromkeys(WAYS, 0))
        self._choices: dict[Bin, int] = {}  # bin -> choices made there
        self._tried: dict[tuple[Bin, Way], int] = {}  # (bin, way) -> the bin's choice count when last measured
        self._every: dict[tuple[Bin, Way], int] = {}  # (bin, way) -> choices between tries of a way behind
        # (bin, way) -> the factor, drawn at each measurement in [0.5, 1.5), on the interval to its next try
        self._jitter: dict[tuple[Bin, Way], float] = {}
        self._rng = random.Random(seed)  # (the draws of the steps are not this: a choice never depends on them)
        self._borrowed: set[tuple[Bin, Way]] = set()  # figures taken from another bin, not measured here yet
        self._shared: set[tuple[Bin, Way]] = set()  # figures taken from another regime, not measured here yet
        # (bin, way) -> tokens emitted per token estimated (a moving average), where steps said their estimate
        self.yields: dict[tuple[Bin, Way], float] = {}

    @staticmethod
    def _bin(batch: int, regime: Hashable = None) -> Bin:
        return regime, 1 << (batch.bit_length() - 1)

    def choose(self, batch: int, ways: Sequence[Way], regime: Hashable = None) -> Way:
        """The way this step of `batch` sequences takes, among those open to it. A bin's first
        choice takes the rates of the nearest bin that knows every way (the ratios between ways
        change slowly with the batch size) or, where none does, tries each way in turn; then the
        fastest, except that a way behind is tried again once enough choices of this bin have
        passed since it was last measured: as many as keep the extra time of those tries within
        `budget` of the time (a way whose tries each lose one leader's step every 1 / budget
        choices), at least `explore`, at most `max_explore`, times the jitter drawn when it was
        measured; a borrowed way alike, by its borrowed figures. Before any of that, the SHARED
        ways take the figures of the same batch size in another regime where one has them; other
        bins of another regime are never borrowed from."""
        b = self._bin(batch, regime)
        ordered = [w for w in WAYS if w in ways]
        if len(ordered) == 1:
            return ordered[0]
        n = self._choices[b] = self._choices.get(b, 0) + 1
        unknown = [w for w in ordered if (b, w) not in self.rates]
        if unknown and self._share(b, unknown, n):
            unknown = [w for w in ordered if (b, w) not in self.rates]
        if unknown and not self._borrow(b, unknown, ordered, n):
            return unknown[0]
        best = self.leader(batch, ordered, regime)
        due = [w for w in ordered
               if w != best and n - self._tried[(b, w)] >= self._every[(b, w)] * self._jitter[(b, w)]]
        return min(due, key=lambda w: self._tried[(b, w)]) if due else best

    def leader(self, batch: int, ways: Sequence[Way], regime: Hashable = None) -> Way | None:
        """The fastest of `ways` measured at this batch size; None while one is unknown there."""
        b = self._bin(batch, regime)
        if any((b, w) not in self.rates for w in ways):
            return None
        return max(ways, key=lambda w: self.rates[(b, w)])

    def table(self) -> list[WayRate]:
        """Every (regime, bin, way) the chooser holds figures for, sorted: what the next step of
        that size compares (GetStatus shows it, so that whoever wonders why a service decodes
        plainly at some batch size reads the rates it chose by). Another thread may read it while
        the engine's records: each dict is copied whole first (one C call under the GIL)."""
        rates, seconds = dict(self.rates), dict(self.seconds)
        unmeasured = set(self._borrowed) | set(self._shared)
        return sorted((WayRate(bool(b[0]), b[1], w, rate, seconds.get((b, w), 0.0), (b, w) not in unmeasured)
                       for (b, w), rate in rates.items()),
                      key=lambda r: (r.with_history, r.batch_size, WAYS.index(r.way)))

    def refine(self, batch: int, estimates: dict[Way, float], regime: Hashable = None) -> Way:
        """The way among `estimates` (the tokens each would emit this step, by the estimates its
        tree is built from) expected to emit the most tokens per second: each estimate times
        what that way has emitted per token estimated at this batch size (1 until measured),
        over its step time. For a leader between ways worth far more on some steps than on
        others: with history, the chains alone beat the head on steps whose chains are long and
        confident (bench fixture, B = 8-15: those steps emitted 37 tokens against the head
        steps' 30, the other chains-alone steps 23). The estimates read the text written so
        far, never the step's draws."""
        b = self._bin(batch, regime)
        return max(estimates, key=lambda w: self.yields.get((b, w), 1.0) * estimates[w] / self.seconds[(b, w)])

    def record(self, batch: int, way: Way, tokens: int, seconds: float, regime: Hashable = None,
               estimate: float | None = None) -> None:
        """A step of `batch` sequences went `way` and emitted `tokens` in `seconds` (against
        `estimate` tokens, where the step was refined): its rate is tokens / seconds / batch."""
        self.steps[way] += 1
        b = self._bin(batch, regime)
        key = (b, way)
        if estimate:
            old_y = self.yields.get(key)
            y = tokens / estimate
            self.yields[key] = y if old_y is None else self.keep * old_y + (1 - self.keep) * y
        if seconds <= 0:
            return
        rate = tokens / seconds / batch
        old = self.rates.get(key)
        old_s = self.seconds.get(key)
        if key in self._shared:  # the first measurement here replaces the other regime's figures
            self._shared.discard(key)
            old = old_s = None
        elif key in self._borrowed:  # the first measurement here: it sets the scale of the bin's borrowed figures
            self._borrowed.discard(key)
            for other in [k for k in self._borrowed if k[0] == b]:
                self.rates[other] *= rate / old
                self.seconds[other] *= seconds / old_s
            old = old_s = None
        self.rates[key] = rate if old is None else self.keep * old + (1 - self.keep) * rate
        self.seconds[key] = seconds if old_s is None else self.keep * old_s + (1 - self.keep) * seconds
        self._mark(key, self._choices.get(b, 0))
        self._retime(b)

    def _retime(self, b: Bin) -> None:
        """Every known way of bin b gets its interval again: it follows the rates, the best one's too."""
        for w in WAYS:
            if (b, w) in self.rates:
                self._every[(b, w)] = self._interval(b, w)

    def _mark(self, key: tuple[Bin, Way], n: int) -> None:
        """A way measured (or given figures) at the bin's n-th choice: its next try is due a jittered
        interval on."""
        self._tried[key] = n
        self._jitter[key] = 0.5 + self._rng.random()

    def _interval(self, b: Bin, way: Way) -> int:
        """Choices between two tries of `way` in bin b. A try of `way` takes s_w seconds and emits
        rate_w * s_w tokens, which the leader would emit in s_w * rate_w / rate_best: it loses
        s_w * (1 - rate_w / rate_best), that is (s_w / s_best) * (1 - rate_w / rate_best) of the
        leader's steps (borrowed figures count as measured: a borrowed way that costs little is
        measured soon, and a bad borrow cannot keep a bin on a slow way). The ways behind share
        the budget, each an equal part: with history the chains' way and plain decoding are both
        behind the head, and a whole budget each let them cost twice the budget (bench fixture,
        with history, B = 16: 27 of 90 steps were tries)."""
        known = [w for w in WAYS if (b, w) in self.rates]
        leader = max(known, key=lambda w: self.rates[(b, w)])
        best, rate = self.rates[(b, leader)], self.rates[(b, way)]
        lost = self.seconds[(b, way)] / self.seconds[(b, leader)] * (1.0 - rate / best)
        share = self.budget / max(1, len(known) - 1)
        return min(self.max_explore, max(self.explore, math.ceil(lost / share)))

    def _share(self, b: Bin, unknown: list[Way], n: int) -> bool:
        """Gives bin b's unknown SHARED ways the figures of the same batch size in another regime
        (the first regime to have measured it there); False where none has any."""
        took = False
        for w in unknown:
            if w not in SHARED:
                continue
            others = [k for k in self._tried if k[1] == w and k[0][1] == b[1] and k[0][0] != b[0]
                      and k not in self._shared and k not in self._borrowed]
            if not others:
                continue
            src = others[0][0]
            self.rates[(b, w)], self.seconds[(b, w)] = self.rates[(src, w)], self.seconds[(src, w)]
            self._mark((b, w), n)
            self._shared.add((b, w))
            took = True
        if took:
            self._retime(b)
        return took

    def _borrow(self, b: Bin, unknown: list[Way], ways: list[Way], n: int) -> bool:
        """Gives bin b's unknown ways the rates and step times of the nearest bin that knows all
        of `ways` (scaled by the ways b knows; the first of them measured here rescales the others,
        since rates and step times move with the batch size while the ratios between
        ways move slowly); False where no bin does."""
        known = sorted({k for k, _ in self.rates if k[0] == b[0] and all((k, w) in self.rates for w in ways)},
                       key=lambda k: abs(math.log2(k[1] / b[1])))
        if not known:
            return False
        src = known[0]
        mine = [w for w in ways if w not in unknown]
        scale = (sum(self.rates[(b, w)] for w in mine) / sum(self.rates[(src, w)] for w in mine)) if mine else 1.0
        s_scale = (sum(self.seconds[(b, w)] for w in mine) / sum(self.seconds[(src, w)] for w in mine)) if mine else 1.0
        for w in unknown:
            self.rates[(b, w)] = self.rates[(src, w)] * scale
            self.seconds[(b, w)] = self.seconds[(src, w)] * s_scale
            self._mark((b, w), n)
            self._borrowed.add((b, w))
        self._retime(b)
        return True
