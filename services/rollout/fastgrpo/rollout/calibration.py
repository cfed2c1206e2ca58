"""C_peak calibration: how many tokens one target forward can take before its latency starts to
grow linearly with them (the roofline knee, FastGRPO appendix B).

A sweep times real target forwards over token counts T (one sequence verifying T tokens after a
realistic context). Latency is flat while the forward is bound by reading the weights and grows
linearly once compute dominates; C_peak is the hinge between the two (`knee`). The online refinement (online_calibration.py) fits the same model to live steps.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastgrpo.rollout.engine.model_runner import ForwardBatch, ModelRunner


@dataclass(frozen=True)
class Calibration:
    c_peak: float
    model: str
    device: str
    dtype: str
    points: list[tuple[int, float]] = field(default_factory=list)  # (tokens per forward, seconds)
    source: str = "profile"

    def key(self) -> str:
        return calibration_key(self.model, self.device, self.dtype)

    def save(self, path: str | Path) -> None:
        """Writes this calibration into a JSON file of calibrations keyed by model, device and dtype."""
        path = Path(path)
        table = json.loads(path.read_text()) if path.exists() else {}
        table[self.key()] = asdict(self)
        path.write_text(json.dumps(table, indent=1))

    @staticmethod
    def load(path: str | Path, model: str, device: str, dtype: str) -> "Calibration | None":
        path = Path(path)
        if not path.exists():
            return None
        entry = json.loads(path.read_text()).get(calibration_key(model, device, dtype))
        if entry is None:
            return None
        entry["points"] = [tuple(p) for p in entry["points"]]
        return Calibration(**entry)


def calibration_key(model: str, device: str, dtype: str) -> str:
    return f"{model}|{device}|{dtype}"


def fit_points(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points `knee` fits: forwards of two tokens or more (see knee)."""
    return [(t, sec) for t, sec in points if t >= 2]


def knee(points: list[tuple[int, float]], grid: int = 512, noise: float = 0.03, flat_rise: float = 0.15,
         outlier: float = 0.15) -> float:
    """Tokens T* where latency leaves its flat level: the hinge of latency(T) = t0 + s * max(0, T - T*)
    fitted to the points.

    points: (tokens, seconds), at least 3 distinct token counts. For each candidate T* on a log grid
    over the swept range, t0 and s >= 0 are a weighted least-squares fit (weights 1/latency, so
    every point counts by its relative error) and the best candidate wins. A free intercept on the
    rising part fits a GPU's roofline max(t0, s T) exactly and a CPU's flat-then-affine curve too,
    so the answer does not depend on how far past the knee a sweep (or the online refinement)
    happens to look. Simpler explanations win first: when a straight line over the whole range
    rises by less than `flat_rise` of its start, latency never left the flat level (the largest
    count); when that line fits within the timing noise (`noise`, relative, per point), every point
    is already past the knee (the smallest count). A hinge is placed inside the range only when
    the points need one.

    With 5 or more points, the point the fit explains worst is dropped and the fit redone when it is
    off by more than `outlier` (relative): one odd count must not move the hinge (on a 2-core CPU a
    one-token forward takes a matrix-vector path a third faster than two tokens, which no hinge
    describes). For the same reason one-token forwards are left out altogether: every speculative
    step verifies at least two tokens per sequence.
    """
    points = fit_points(points)
    if len({t for t, _ in points}) < 3:
        raise ValueError("need at least 3 distinct token counts of 2 or more")
    T = torch.tensor([float(t) for t, _ in points], dtype=torch.float64)  # (P,)
    y = torch.tensor([sec for _, sec in points], dtype=torch.float64)  # (P,)
    w = 1.0 / y  # (P,) relative-error weights
    c = torch.logspace(math.log10(float(T.min())), math.log10(float(T.max())), grid, dtype=torch.float64)  # (G,)
    h = (T[None, :] - c[:, None]).clamp(min=0)  # (G, P) tokens past the candidate hinge
    # weighted least squares of y ~ t0 + s h per candidate: 2x2 normal equations
    sw, sh, shh = (w * w).sum(), (w * w * h).sum(1), (w * w * h * h).sum(1)  # (), (G,), (G,)
    sy, shy = (w * w * y).sum(), (w * w * h * y).sum(1)
    det = (sw * shh - sh * sh).clamp(min=1e-30)
    slope = ((sw * shy - sh * sy) / det).clamp(min=0)  # (G,) a falling latency is noise: flat
    t0 = (sy - slope * sh) / sw  # (G,) best level given the slope
    sse = ((w * (y[None, :] - t0[:, None] - slope[:, None] * h)) ** 2).sum(1)  # (G,)
    best = int(sse.argmin())
    resid = (w * (y - t0[best] - slope[best] * h[best])).abs()  # (P,) relative misfit
    worst = int(resid.argmax())
    if len(points) >= 5 and float(resid[worst]) > outlier:
        return knee(points[:worst] + points[worst + 1 :], grid, noise, flat_rise, outlier)
    # candidate 0 puts the hinge at the smallest count: one straight line over every point
    if float(slope[0] * h[0].max()) < flat_rise * float(t0[0]):
        return float(T.max())
    if float(sse[0]) <= float(sse[best]) + len(points) * noise**2:  # what noise alone could add
        return float(T.min())
    return float(c[best])


def one_sequence_batch(runner: ModelRunner, tokens: int, context: int) -> ForwardBatch:
    """One sequence (slot 0) verifying `tokens` random tokens after `context` cached ones."""
    dev = runner.device
    start = torch.tensor([context], device=dev)
    ids = torch.randint(0, runner.vocab_size, (1, tokens), device=dev)  # (1, T)
    positions = (context + torch.arange(tokens, device=dev))[None]  # (1, T)
    return ForwardBatch(ids, positions, torch.zeros(1, dtype=torch.long, device=dev), start)


@torch.inference_mode()
def profile(runner: ModelRunner, token_counts: list[int], context: int = 128, repeats: int = 5,
            budget_s: float = 60.0) -> list[tuple[int, float]]:
    """Median latency of one target forward over T new tokens after `context` cached tokens."""
    dev = runner.device
    deadline = time.perf_counter() + budget_s
    out = []
    for T in sorted(token_counts):
        if context + T > runner.cache.max_len:
            break
        batch = one_sequence_batch(runner, T, context)
        runner.forward(batch)  # warm-up
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.forward(batch)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out.append((T, statistics.median(times)))
        if time.perf_counter() > deadline:
            break
    return out


DEFAULT_SWEEP = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
