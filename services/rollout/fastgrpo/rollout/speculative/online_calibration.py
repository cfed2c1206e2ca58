"""Online refinement of C_peak from the decode steps the server runs anyway.

Every decode forward (plain or tree verification) is a point (tokens in the forward, seconds) on
the same latency curve the offline profile sweeps. Points are kept per half-octave bucket of token
counts (a window of recent latencies each, medians against noise). Every `update_every`
observations the curve's elasticity around C_peak is read from the bucket medians
(calibration.elasticity, the rule the profile's knee uses) and C_peak moves towards where it is
1/2: down when latency already grows faster, up when it is still flatter.

Live steps alone would all sit near tokens = C_peak and could not tell the slope, so every
`explore_every`-th step verifies trees sized for C_peak x 2^u or C_peak / 2^u (alternating, u
spread over 1/2 to 2 octaves). Exploring costs throughput, so once updates stop moving C_peak (by
under 10%) the interval doubles, up to `explore_max`; a move resets it. A wrong start converges
geometrically: each update moves at most `max_change` times, and buckets from earlier positions
keep counting, so the estimate gathers its own sweep on the way.

alpha (tree depth L = log2(N_verify / alpha), small for a draft that stays right deep into a
sequence) is refined from acceptance by depth: a verify step whose accepted path reaches the
deepest node of its tree was cut short by the depth. When more than twice `alpha_saturation` of the
steps are, trees get one level deeper (alpha / 2); under half of it, the deepest level is rarely
used and one level shallower (alpha x 2) saves its draft forward. The calibrator keeps that as a
shift in levels from the configured alpha (SpecController.alpha applies it).
"""
from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from dataclasses import dataclass

from fastgrpo.common.config import help_field
from fastgrpo.rollout.speculative.knee import elasticity


@dataclass(frozen=True)
class OnlineCalibrationConfig:
    """Online refinement of C_peak and alpha from the decode steps served (flags --c-peak-*)."""

    enabled: bool = help_field(True, "adaptive: refine C_peak online from the latencies of the decode steps served, and alpha from how deep accepted paths reach (GetStatus shows both beside their start values)", flag="c-peak-refine")
    explore_every: int = help_field(2, "every n-th adaptive step sizes its trees for C_peak x 2^u or / 2^u, u in [1/2, 2], to see both sides of the knee (0 = never explore)")
    explore_max: int = help_field(64, "longest exploration interval once C_peak has settled")
    update_every: int = help_field(16, "observed forwards between C_peak re-estimates")
    window: int = help_field(32, "latencies kept per token-count bucket")
    min_samples: int = help_field(3, "latencies a bucket needs before it counts")
    max_change: float = help_field(2.0, "largest factor C_peak moves by in one update")
    gain: float = help_field(1.0, "octaves C_peak moves per unit of elasticity error (a quarter of a Newton step on a roofline: stale, noisy buckets make bolder steps overshoot)")
    floor: float = help_field(2.0, "lower bound of the refined C_peak")
    ceiling: float = help_field(8192.0, "upper bound of the refined C_peak")
    alpha_saturation: float = help_field(0.25, "target share of adaptive verify steps that accept a whole tree path to its deepest node: above twice that alpha halves (one level deeper), under half it doubles")
    alpha_every: int = help_field(64, "sequence verify steps between alpha re-estimates")
    alpha_levels: int = help_field(4, "most tree levels the refined alpha moves depth from the configured alpha, either way")


def bucket_of(tokens: int) -> int:
    """Half-octave bucket of a token count: 1, 2, 3 (~2.8), 4, 6 (~5.7), 8, 11, 16, ..."""
    return round(2 * math.log2(tokens))


def refined_depth_shift(shift: int, saturated: int, steps: int, cfg: OnlineCalibrationConfig) -> int:
    """Levels deeper than the configured alpha gives (alpha / 2^shift) after `steps` verify steps of
    which `saturated` accepted their tree's deepest node: one more or one fewer outside
    [1/2, 2] x the target share, within +-alpha_levels."""
    share = saturated / steps
    if share > 2 * cfg.alpha_saturation:
        shift += 1
    elif share < cfg.alpha_saturation / 2:
        shift -= 1
    return min(max(shift, -cfg.alpha_levels), cfg.alpha_levels)


class OnlineCalibrator:
    """Holds the live C_peak: `step_c_peak` sizes one step's trees, `observe` feeds back its latency;
    and the depth shift of alpha, fed by `observe_acceptance`.

    Thread-safe: the engine thread steps and observes, servicer threads read `c_peak` and `source`.
    """

    def __init__(self, c_peak: float, source: str, cfg: OnlineCalibrationConfig = OnlineCalibrationConfig()):
        self.cfg = cfg
        self.c_peak = float(c_peak)
        self.source = source
        self.initial = (float(c_peak), source)
        self.updates = 0
        self.depth_shift = 0  # adaptive trees use alpha / 2^depth_shift
        self.alpha_updates = 0
        self._verified = 0  # sequence verify steps since the last alpha update
        self._saturated = 0  # ... whose accepted path reached the deepest node of the tree
        self._buckets: dict[int, deque[tuple[int, float]]] = {}
        self._steps = 0
        self._explored_at = 0
        self._explore_every = cfg.explore_every
        self._explorations = 0
        self.probing = False  # whether the latest step_c_peak sized a step's trees off the estimate, to explore
        self._since_update = 0
        self._lock = threading.Lock()

    def step_c_peak(self) -> float:
        """The C_peak one decode step sizes its trees for (called once per step)."""
        self.probing = False
        if not self.cfg.enabled:
            return self.c_peak
        self._steps += 1
        if not self._explore_every or self._steps - self._explored_at < self._explore_every:
            return self.c_peak
        self.probing = True
        self._explored_at = self._steps
        self._explorations += 1
        # 2^(+-u), u spread over [0.5, 2] by the golden-ratio sequence: the points land on many token
        # counts around the estimate, so a kernel's preference for some sizes (on a CPU a multiple of
        # 4 tokens runs ~6% faster than its neighbours) averages out instead of bending the fit
        u = 0.5 + 1.5 * ((self._explorations * 0.6180339887) % 1.0)
        up = self.c_peak * 2.0**u
        down = self.c_peak / 2.0**u
        # below two tokens a forward says nothing about the knee (see calibration.knee): look higher
        return up if self._explorations % 2 or down < 2 else down

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

    def observe_acceptance(self, depths: list[int], accepted: list[int]) -> None:
        """One adaptive verify step: per sequence, the depth of its tree's deepest node and the
        draft tokens it accepted."""
        if not self.cfg.enabled:
            return
        self._verified += len(depths)
        self._saturated += sum(a >= d for d, a in zip(depths, accepted))
        if self._verified >= self.cfg.alpha_every:
            shift = refined_depth_shift(self.depth_shift, self._saturated, self._verified, self.cfg)
            self._verified = self._saturated = 0
            self.alpha_updates += shift != self.depth_shift
            self.depth_shift = shift

    def points(self) -> list[tuple[int, float]]:
        """(median tokens, median seconds) of every bucket with enough samples, by tokens."""
        return sorted(
            (round(statistics.median(t for t, _ in w)), statistics.median(s for _, s in w))
            for w in self._buckets.values() if len(w) >= self.cfg.min_samples
        )

    def _update(self) -> None:
        e = elasticity(self.points(), self.c_peak)
        if e is None:  # not yet 3 token counts over an octave around C_peak
            return
        cfg = self.cfg
        # past the bend (e > 1/2) the knee is lower, before it higher: a damped Newton step in octaves
        step = min(max(-cfg.gain * (e - 0.5), -math.log2(cfg.max_change)), math.log2(cfg.max_change))
        c = min(max(self.c_peak * 2.0**step, cfg.floor), cfg.ceiling)
        settled = abs(c / self.c_peak - 1) < 0.1
        self._explore_every = (min(2 * self._explore_every, cfg.explore_max) if settled else cfg.explore_every)
        with self._lock:
            self.c_peak, self.source = c, "online"
            self.updates += 1

    def snapshot(self) -> tuple[float, str]:
        with self._lock:
            return self.c_peak, self.source
