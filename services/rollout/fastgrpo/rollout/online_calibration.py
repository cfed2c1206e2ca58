"""Online refinement of C_peak from the decode steps the server runs anyway.

Every decode forward (plain or tree verification) is a point (tokens in the forward, seconds) on
the same latency curve the offline profile sweeps. Points are kept per half-octave bucket of token
counts (a window of recent latencies each, medians against noise), and every `update_every`
observations C_peak is re-estimated with the profile's own knee rule over the bucket medians.

Live steps alone would all sit near tokens = C_peak and could not tell where the knee is, so every
`explore_every`-th step verifies trees sized for 2 x C_peak or C_peak / 2 (alternating): the
flat level shows below, the linear asymptote above. Exploring costs throughput, so once updates
stop moving C_peak (by under 10%) the interval doubles, up to `explore_max`; a move resets it.
A wrong start converges geometrically: from too high every point is on the slope and the knee
lands at the smallest of them, from too low every point is flat and the estimate moves to the
largest; each update moves at most `max_change` times.
"""
from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass

from fastgrpo.common.cli import help_field
from fastgrpo.rollout.calibration import fit_points, knee


@dataclass(frozen=True)
class RefineConfig:
    enabled: bool = help_field(True, "refine C_peak online from measured decode-step latencies")
    explore_every: int = help_field(4, "every n-th adaptive step sizes its trees for 2x or 1/2x C_peak (0 = never explore)")
    explore_max: int = help_field(64, "longest exploration interval once C_peak has settled")
    update_every: int = help_field(16, "observed forwards between C_peak re-estimates")
    window: int = help_field(32, "latencies kept per token-count bucket")
    min_samples: int = help_field(3, "latencies a bucket needs before it counts")
    max_change: float = help_field(2.0, "largest factor C_peak moves by in one update")
    c_min: float = help_field(2.0, "lower bound of C_peak")
    c_max: float = help_field(8192.0, "upper bound of C_peak")


def bucket_of(tokens: int) -> int:
    """Half-octave bucket of a token count: 1, 2, 3 (~2.8), 4, 6 (~5.7), 8, 11, 16, ..."""
    return round(2 * math.log2(tokens))


class OnlineCalibrator:
    """Holds the live C_peak: `step_c_peak` sizes one step's trees, `observe` feeds back its latency.

    Thread-safe: the engine thread steps and observes, servicer threads read `c_peak` and `source`.
    """

    def __init__(self, c_peak: float, source: str, cfg: RefineConfig = RefineConfig()):
        self.cfg = cfg
        self.c_peak = float(c_peak)
        self.source = source
        self.initial = (float(c_peak), source)
        self.updates = 0
        self._buckets: dict[int, deque[tuple[int, float]]] = {}
        self._steps = 0
        self._explored_at = 0
        self._explore_every = cfg.explore_every
        self._explorations = 0
        self._since_update = 0
        self._lock = threading.Lock()

    def step_c_peak(self) -> float:
        """The C_peak one decode step sizes its trees for (called once per step)."""
        if not self.cfg.enabled:
            return self.c_peak
        self._steps += 1
        if not self._explore_every or self._steps - self._explored_at < self._explore_every:
            return self.c_peak
        self._explored_at = self._steps
        self._explorations += 1
        if self._explorations % 2:
            return self.c_peak * 2.0
        # below two tokens a forward says nothing about the knee (see calibration.knee): look higher
        return self.c_peak * (0.5 if self.c_peak >= 4 else 4.0)

    def observe(self, tokens: int, seconds: float) -> None:
        """One decode forward over `tokens` tokens took `seconds`."""
        if not self.cfg.enabled or tokens < 1:
            return
        window = self._buckets.setdefault(bucket_of(tokens), deque(maxlen=self.cfg.window))
        window.append((tokens, seconds))
        self._since_update += 1
        if self._since_update >= self.cfg.update_every:
            self._since_update = 0
            self._update()

    def points(self) -> list[tuple[int, float]]:
        """(median tokens, median seconds) of every bucket with enough samples, by tokens."""
        return sorted(
            (round(statistics.median(t for t, _ in w)), statistics.median(s for _, s in w))
            for w in self._buckets.values() if len(w) >= self.cfg.min_samples
        )

    def _update(self) -> None:
        pts = fit_points(self.points())
        if len(pts) < 3:  # buckets hold distinct token counts: fewer than 3 cannot place a knee
            return
        cfg = self.cfg
        c = min(max(knee(pts), self.c_peak / cfg.max_change, cfg.c_min), self.c_peak * cfg.max_change, cfg.c_max)
        settled = abs(c / self.c_peak - 1) < 0.1
        self._explore_every = (min(2 * self._explore_every, cfg.explore_max) if settled else cfg.explore_every)
        with self._lock:
            self.c_peak, self.source = c, "online"
            self.updates += 1

    def snapshot(self) -> tuple[float, str]:
        with self._lock:
            return self.c_peak, self.source
