"""C_peak calibration: how many tokens one target forward can take before its latency starts to
grow linearly with them (the roofline knee, FastGRPO appendix B).

A sweep times real target forwards over token counts T (one sequence verifying T tokens after a
realistic context). Latency is flat while the forward is bound by reading the weights and grows
like c * T once compute dominates; C_peak is where the flat level meets the linear asymptote
(`knee`). The online refinement (online_calibration.py) fits the same model to live steps.
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


def knee(points: list[tuple[int, float]], grid: int = 512) -> float:
    """Tokens T* of the roofline latency(T) = max(t0, t0 * T / T*) fitted to the points.

    points: (tokens, seconds), at least 3 distinct token counts. The fit is least squares in log
    space, where the model is flat at log t0 and then rises with slope 1: for each candidate log T*
    on a grid over the swept range, the best log t0 is the mean residual. The result lies within
    the swept counts: the smallest when every point is already on the slope, the largest when
    latency never left the flat level. Using every point (not just the two largest) keeps the fit
    stable on noisy timings and consistent between a full sweep and the few token counts the
    online refinement sees.
    """
    if len({t for t, _ in points}) < 3:
        raise ValueError("need at least 3 distinct token counts")
    x = torch.tensor([math.log(t) for t, _ in points], dtype=torch.float64)  # (P,)
    y = torch.tensor([math.log(sec) for _, sec in points], dtype=torch.float64)  # (P,)
    b = torch.linspace(float(x.min()), float(x.max()), grid, dtype=torch.float64)  # (G,) candidate log T*
    rise = (x[None, :] - b[:, None]).clamp(min=0)  # (G, P) model above the flat level
    a = (y[None, :] - rise).mean(1, keepdim=True)  # (G, 1) best log t0 per candidate
    sse = ((y[None, :] - a - rise) ** 2).sum(1)  # (G,)
    return float(b[int(sse.argmin())].exp())


@torch.inference_mode()
def profile(runner: ModelRunner, token_counts: list[int], context: int = 128, repeats: int = 5,
            budget_s: float = 60.0) -> list[tuple[int, float]]:
    """Median latency of one target forward over T new tokens after `context` cached tokens."""
    dev = runner.device
    slot = torch.zeros(1, dtype=torch.long, device=dev)
    start = torch.tensor([context], device=dev)
    deadline = time.perf_counter() + budget_s
    out = []
    for T in sorted(token_counts):
        if context + T > runner.cache.max_len:
            break
        tokens = torch.randint(0, runner.vocab_size, (1, T), device=dev)  # (1, T)
        positions = (context + torch.arange(T, device=dev))[None]  # (1, T)
        batch = ForwardBatch(tokens, positions, slot, start)
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
