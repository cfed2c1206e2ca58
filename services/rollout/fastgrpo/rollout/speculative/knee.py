"""Where a latency curve bends: C_peak from (tokens per forward, seconds) points, as pure math.

The offline profile (calibration.py) and the online refinement (online_calibration.py) both read
the curve with `elasticity`, so the two agree by construction.
"""
from __future__ import annotations

import math


def fit_points(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points `knee` fits: forwards of two tokens or more (see knee)."""
    return [(t, sec) for t, sec in points if t >= 2]


SPAN = 2.5
"""Octaves either side of a token count over which `elasticity` reads the latency curve."""


def elasticity(points: list[tuple[int, float]], at: float, span: float = SPAN) -> float | None:
    """How fast latency grows with tokens around `at`: the slope of log(seconds) against
    log(tokens) (0 while flat, 1 once latency is proportional to tokens), fitted by least squares
    over the points within `span` octaves, each weighted by 1 - distance / span. None when fewer
    than 3 points, or less than one octave, are there.

    A slope over a few octaves, not a ratio of neighbouring points, so one slow count or a kernel's
    taste for some sizes (on a CPU a multiple of 4 tokens runs ~6% faster than its neighbours)
    averages out instead of deciding where the knee is; the tapering weights let a point leave the
    window gradually as `at` moves, so the slope is continuous in `at`.
    """
    sel = []
    for t, sec in fit_points(points):
        d = math.log2(t / at)
        if abs(d) < span:
            sel.append((d, math.log2(sec), 1.0 - abs(d) / span))
    if len(sel) < 3 or max(x for x, _, _ in sel) - min(x for x, _, _ in sel) < 1.0:
        return None
    sw = sum(w for _, _, w in sel)
    mx = sum(w * x for x, _, w in sel) / sw
    my = sum(w * y for _, y, w in sel) / sw
    return sum(w * (x - mx) * (y - my) for x, y, w in sel) / sum(w * (x - mx) ** 2 for x, _, w in sel)


def knee(points: list[tuple[int, float]], span: float = SPAN, grid: int = 64) -> float:
    """C_peak from a sweep of (tokens, seconds): the token count where latency's `elasticity` over
    +-span octaves reaches 1/2.

    On an ideal roofline, latency = max(t0, s * T), the window centred on the knee K = t0 / s is
    half flat (slope 0) and half proportional (slope 1) and fits a slope of exactly 1/2, so this is
    K. On a curve that bends smoothly (a CPU's flat-then-affine latency) it is the middle of the
    bend. The online refinement (online_calibration.py) steers C_peak to the same point from the
    live steps around it, so the two agree by construction.

    Only centres whose window lies inside the sweep are read. When latency is already past the
    bend at the first of them, that centre; when it never gets there, the last (C_peak is at least
    that: sweep further).
    """
    pts = fit_points(points)
    if len(pts) < 3:
        raise ValueError("need at least 3 forwards of 2 or more tokens")
    lo, hi = _readable_centres(pts, span)
    if hi < lo:  # a short sweep: read the middle with whatever window it allows
        lo = hi = (lo + hi) / 2
    prev = None
    for v in [lo] if hi == lo else [lo + (hi - lo) * k / grid for k in range(grid + 1)]:
        e = elasticity(pts, 2.0**v, span)
        if e is None:
            continue
        if e >= 0.5:
            if prev is None:
                return 2.0**v
            pv, pe = prev
            return 2.0 ** (pv + (v - pv) * (0.5 - pe) / (e - pe))
        prev = (v, e)
    if prev is None:
        raise ValueError("the points span less than one octave")
    return 2.0 ** prev[0]


def _readable_centres(pts: list[tuple[int, float]], span: float) -> tuple[float, float]:
    """log2 of the first and last window centres whose +-span octaves lie inside the sweep."""
    return math.log2(min(t for t, _ in pts)) + span, math.log2(max(t for t, _ in pts)) - span


def knee_past_sweep(points: list[tuple[int, float]], c_peak: float, span: float = SPAN) -> bool:
    """Whether `knee` answered with the last centre the sweep can read: latency never bent inside
    it, so the true C_peak is at least that (a small model on a GPU: sweep further)."""
    _, top = _readable_centres(fit_points(points), span)
    return math.log2(c_peak) >= top - 1e-9
