"""Linears on the CPU through oneDNN's packed weight layout.

MKL's float32 GEMM is slow at the row counts decoding runs at: on the 2-core CPU here the bench
fixture's seven projections per layer take, by rows 1 / 4 / 8 / 16 / 64, 18 / 26 / 28 / 32 / 71 ms a
forward through `F.linear`, and 10 / 8 / 10 / 14 / 41 ms through oneDNN with the weight reordered
into its blocked layout once (`mkldnn._reorder_linear_weight`). The reordered copy is a second copy
of the weights (the served one stays: weight updates, checksums and the draft's training read it).

Which is faster depends on the CPU and the row count: on an Intel Xeon here MKL took 9.8 / 10.8 / 16.6
/ 20.5 / 39.3 ms and oneDNN 14.9 / 15.5 / 15.7 / 17.1 / 40.8 ms for the bench fixture's linears at rows
1 / 2 / 4 / 8 / 64 (MKL's matrix-vector product is fast there, and slow on AMD). So `tune` times
both on a model's own linears once (up to 64 MiB of them), per power-of-two row count up to 64 (more
rows take 64's answer), and `project` (runtime.layers)
takes the faster (`packed_rows`); until a model is tuned, the packed op. The two ops round
differently, and a choice made by timing may differ between two starts, which would cost
bit-for-bit reproducible restarts: so the engine (`serve --cpu-linears tuned`, the default) has the
choice remembered under the cache, per CPU, torch version, thread count and linear shapes
(`choice_path`), and times only where none is remembered (about a second); `--cpu-linears packed`
takes the packed op at every row count without timing anything.

A packed copy is keyed on its weight and that weight's version counter, so any in-place change of
the weight (a WeightStore commit, the online draft learner's swap, an optimizer step) repacks it on
the next call: nothing has to remember to invalidate it. Writes through `.data` bypass the counter;
nothing in the service writes served weights that way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
import weakref
from collections import Counter
from pathlib import Path

import torch

from fastgrpo.common.cache import cache_root, locked
from fastgrpo.common.host import cpu_model

log = logging.getLogger(__name__)

ONEDNN = torch.backends.mkldnn.is_available()  # (read once: a compiled graph cannot call it)
# id(weight) -> (weakref to the weight, its version when packed, the packed copy)
_PACKED: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def packable(weight: torch.Tensor) -> bool:
    """Whether linears over `weight` can run packed here: float32 on a CPU with oneDNN, no autograd
    (the packed op has no backward; the draft's training takes the plain path)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and ONEDNN)


# power-of-two row count -> whether the packed op is the faster there (tune); rows past the largest
# tuned count take its answer, and before any tuning every row count takes the packed op
_PACKED_ROWS: dict[int, bool] = {}
TUNE_ROWS = (1, 2, 4, 8, 16, 32, 64)  # every power of two up to the largest: packed_rows finds each
# weights a tuning pass streams: past the CPU's caches, as a step's are, yet bounded whatever the
# model's size (a 7B model's forward at 64 rows would take seconds per pass)
TUNE_BYTES = 64 * 2**20


def packed_rows(rows: int) -> bool:
    """Whether an eager linear over `rows` rows takes the packed op (else F.linear, MKL's)."""
    if not _PACKED_ROWS:
        return True
    return _PACKED_ROWS[min(1 << max(0, rows - 1).bit_length(), TUNE_ROWS[-1])]


@torch.inference_mode()
def tune(linears: list[torch.nn.Linear], repeats: int = 3, remember: Path | None = None) -> float:
    """Records for `packed_rows` which of F.linear and the packed op is the faster over `linears`,
    per row count of TUNE_ROWS; returns the seconds it took. With `remember` (a JSON file, e.g.
    choice_path's), a choice made before on this machine for these shapes is read from it, and a
    new one is written to it (under a file lock: concurrent starts time once and agree), so a
    restart takes the same ops and reproduces its logits bit for bit. Without linears that can run
    packed here, every row count takes the packed op again."""
    linears = [m for m in linears if packable(m.weight)]
    if not linears:
        _PACKED_ROWS.clear()
        return 0.0
    t0 = time.perf_counter()
    if remember is None:
        choice = _timed_choice(linears, repeats)
    else:
        remember.parent.mkdir(parents=True, exist_ok=True)
        with locked(remember.with_name(remember.name + ".lock"), log.info):
            choice = _read_choice(remember)
            if choice is None:
                choice = _timed_choice(linears, repeats)
                tmp = remember.with_name(f".{remember.name}.{os.getpid()}")
                tmp.write_text(json.dumps({str(r): c for r, c in choice.items()}))
                os.replace(tmp, remember)  # (atomic: a reader sees a whole choice or none)
            else:
                log.info("eager linears: the choice remembered in %s", remember)
    _PACKED_ROWS.clear()
    _PACKED_ROWS.update(choice)
    seconds = time.perf_counter() - t0
    log.info("eager linears: the packed op at rows %s, F.linear at rows %s (%.1f s)",
             [r for r, c in choice.items() if c], [r for r, c in choice.items() if not c], seconds)
    return seconds


def choice_path(linears: list[torch.nn.Linear], root: Path | None = None) -> Path:
    """Where tune remembers its choice for these linears on this machine: keyed by the CPU, torch,
    the thread count and the linears' shapes (what the timing depends on), under the cache."""
    shapes = Counter((m.in_features, m.out_features, m.bias is not None, str(m.weight.dtype)) for m in linears)
    key = json.dumps({"machine": platform.machine(), "cpu": cpu_model(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "shapes": sorted(shapes.items()), "rows": TUNE_ROWS, "bytes": TUNE_BYTES})
    return (root or cache_root()) / "linears" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _read_choice(path: Path) -> dict[int, bool] | None:
    """A remembered choice: every row count of TUNE_ROWS to a bool; None if missing or unreadable
    (then it is timed again and rewritten)."""
    try:
        raw = json.loads(path.read_text())
        choice = {r: raw[str(r)] for r in TUNE_ROWS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return choice if all(isinstance(c, bool) for c in choice.values()) else None


def _timed_choice(linears: list[torch.nn.Linear], repeats: int) -> dict[int, bool]:
    """Times F.linear and the packed op over `linears` (the first of them up to TUNE_BYTES of
    weights, so that they stream from memory as a step's do), at each of TUNE_ROWS rows, the best
    of `repeats`: whether the packed op is the faster, per row count."""
    total = 0
    for n, m in enumerate(linears):
        total += m.weight.numel() * m.weight.element_size()
        if total >= TUNE_BYTES:
            linears = linears[: n + 1]
            break
    inputs = {m.in_features for m in linears}
    choice = {}
    for rows in TUNE_ROWS:
        xs = {n: torch.randn(rows, n, dtype=linears[0].weight.dtype) for n in inputs}
        best = {}
        for name, fn in (("packed", lambda m, x: linear_packed(x, m.weight, m.bias)),
                         ("linear", lambda m, x: torch.nn.functional.linear(x, m.weight, m.bias))):
            for m in linears:  # (the packed copies are made, and every path run once, before timing)
                fn(m, xs[m.in_features])
            took = []
            for _ in range(repeats):
                t = time.perf_counter()
                for m in linears:
                    fn(m, xs[m.in_features])
                took.append(time.perf_counter() - t)
            best[name] = min(took)
        choice[rows] = best["packed"] <= best["linear"]
        log.debug("linears at %d rows: packed %.2f ms, F.linear %.2f ms", rows, best["packed"] * 1e3, best["linear"] * 1e3)
    return choice


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of `weight` (out, in), current with its version counter."""
    key = id(weight)
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        # the entry goes with its weight (a later weight may reuse the id only after this one died)
        _PACKED[key] = (weakref.ref(weight, lambda _, k=key: _PACKED.pop(k, None)), weight._version, packed)
        return packed
    return entry[2]


def linear_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, x (..., in) -> (..., out), through the packed weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")


# A compiled graph cannot take the packed (opaque) tensor as an input, so it calls this op with the
# served weight, and the op looks the packed copy up at run time.
@torch.library.custom_op("fastgrpo::linear_packed", mutates_args=())
def linear_packed_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return linear_packed(x, weight, bias)


@linear_packed_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
