"""C_peak calibration: how many tokens one target forward can take before its latency starts to
grow linearly with them (the roofline knee, FastGRPO appendix B).

A sweep times real target forwards over token counts T (one sequence verifying T tokens after a
realistic context). Latency is flat while the forward is bound by reading the weights and grows
like c * T once compute dominates; C_peak is where the flat level meets the linear asymptote.
"""
from __future__ import annotations

import json
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


def knee(points: list[tuple[int, float]]) -> float:
    """Tokens where the flat latency level meets the linear asymptote of the largest token counts.

    points: (tokens, seconds), at least 3 distinct token counts. Flat level = the lowest latency among
    the smaller half of the counts (robust to a slow first call); asymptote = the line through the
    two largest counts.
    """
    pts = sorted(points)
    if len(pts) < 3:
        raise ValueError("need at least 3 points")
    t0 = min(sec for _, sec in pts[: max(1, len(pts) // 2)])
    (ta, la), (tb, lb) = pts[-2], pts[-1]
    slope = (lb - la) / (tb - ta)
    if slope <= 0:  # never left the flat regime: the knee is past the sweep
        return float(tb)
    return max(float(pts[0][0]), ta + (t0 - la) / slope)


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
