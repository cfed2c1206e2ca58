"""C_peak calibration: how many tokens one target forward can take before its latency grows in
proportion to them (the roofline knee, FastGRPO appendix B).

A sweep times real target forwards over token counts T (one sequence verifying T tokens after a
realistic context). Latency is flat while the forward is bound by reading the weights and grows
linearly once compute dominates; C_peak is where the curve's log-log slope over a few octaves
reaches 1/2 (`knee`): exactly the knee of an ideal roofline, the middle of the bend of a smooth
one (knee.py reads it). The online refinement (online_calibration.py) steers to the same point
from live steps.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastgrpo.rollout.runtime.batch import ForwardBatch
from fastgrpo.rollout.runtime.blocks import blocks_for
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.runtime.steps import compiled_forward


@dataclass(frozen=True)
class Calibration:
    c_peak: float
    model: str
    device: str
    dtype: str
    points: list[tuple[int, float]] = field(default_factory=list)  # (tokens per forward, seconds)
    source: str = "profile"
    compiled: bool = False  # timed compiled forwards (--compile): their knee is the compute knee

    def key(self) -> str:
        return calibration_key(self.model, self.device, self.dtype, self.compiled)

    def save(self, path: str | Path) -> None:
        """Writes this calibration into a JSON file of calibrations keyed by model, device and dtype."""
        path = Path(path)
        table = json.loads(path.read_text()) if path.exists() else {}
        table[self.key()] = asdict(self)
        path.write_text(json.dumps(table, indent=1))

    @staticmethod
    def load(path: str | Path, model: str, device: str, dtype: str, compiled: bool = False) -> "Calibration | None":
        path = Path(path)
        if not path.exists():
            return None
        entry = json.loads(path.read_text()).get(calibration_key(model, device, dtype, compiled))
        if entry is None:
            return None
        entry["points"] = [tuple(p) for p in entry["points"]]
        return Calibration(**entry)


def calibration_key(model: str, device: str, dtype: str, compiled: bool = False) -> str:
    return f"{model}|{device}|{dtype}" + ("|compiled" if compiled else "")


def one_sequence_batch(runner: ModelRunner, tokens: int, context: int, blocks: int | None = None) -> ForwardBatch:
    """One sequence verifying `tokens` random tokens after `context` cached ones, in blocks 1, 2, ...
    of the runner's cache (allocated here when it has too few: a profile runs before serving).
    blocks: the table's width, given as the batch's key_blocks (the same for every count of a
    compiled profile); None: what the tokens need, found by the forward."""
    dev = runner.device
    bs = runner.cache.block_size if runner.cache is not None else PROFILE_BLOCK_SIZE
    n = blocks or blocks_for(context + tokens, bs)
    if runner.cache is None or runner.cache.num_blocks < n + 1:
        runner.allocate_cache(n + 1, bs)
    start = torch.tensor([context], device=dev)
    ids = torch.randint(0, runner.vocab_size, (1, tokens), device=dev)  # (1, T)
    positions = (context + torch.arange(tokens, device=dev))[None]  # (1, T)
    return ForwardBatch(ids, positions, torch.arange(1, n + 1, device=dev)[None], start, key_blocks=blocks)


@torch.inference_mode()
def profile(runner: ModelRunner, token_counts: list[int], context: int = 128, repeats: int = 7,
            budget_s: float = 60.0, compiled: bool = False) -> list[tuple[int, float]]:
    """Median latency of one target forward over T new tokens after `context` cached tokens.

    compiled: time the forward as a compiled step runs it (runtime.steps.compiled_forward: one
    graph, T a symbolic size; on CUDA a CUDA graph per T), so that the knee is where compute starts
    to dominate, not where it overtakes Python and kernel launches; round 0 compiles.

    Repeats go round the whole sweep (T = 2, 3, 4, ..., then again) rather than timing each count
    `repeats` times in a row, so a slow spell of the machine lands on every count alike instead of
    bending the curve where it happened. Past `budget_s` no further round starts; the first round
    stops at the count it reached.
    """
    dev = runner.device
    deadline = time.perf_counter() + budget_s
    counts = [T for T in sorted(token_counts) if context + T <= runner.max_positions]
    blocks = None
    if counts:  # the largest first: one cache for every count
        one_sequence_batch(runner, max(counts), context)
        if compiled:
            blocks = blocks_for(context + max(counts), runner.cache.block_size)
    batches = {T: one_sequence_batch(runner, T, context, blocks) for T in counts}
    forward = compiled_forward(runner) if compiled else runner.forward
    times: dict[int, list[float]] = {}
    for r in range(repeats + 1):  # round 0 warms every shape up
        for T in counts:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            forward(batches[T])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times.setdefault(T, []).append(time.perf_counter() - t0)
            if r <= 1 and time.perf_counter() > deadline:
                counts = [c for c in counts if c <= T]
                break
        if r and time.perf_counter() > deadline:
            break
    return [(T, statistics.median(ts)) for T, ts in sorted(times.items())]


PROFILE_BLOCK_SIZE = 16
DEFAULT_SWEEP = [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724, 1024]  # half-octaves
