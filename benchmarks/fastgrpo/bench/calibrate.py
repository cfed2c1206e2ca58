"""`fastgrpo-bench calibrate`: does online refinement find the profiled C_peak from a wrong start?

On the benchmark target: the offline profile's knee first, then for each wrong start (4x too high,
4x too low) a fresh OnlineCalibrator wired to a runner exactly as the server wires it
(`runner.observe_decode_forwards`), driving one sequence whose every step verifies as many tokens as the
calibrator's step C_peak allows (B = 1: N_verify = C_peak). Records the estimate after every step.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from fastgrpo.common.config import help_field


@dataclass(frozen=True)
class CalibrateBenchConfig:
    out: str = help_field("benchmarks/results/calibrate.json", "JSON output path (a PNG is written beside it)")
    preset: str = help_field("bench", "fixture preset of the target")
    steps: int = help_field(200, "decode steps per start")
    factors: str = help_field("4,0.25", "wrong starts as multiples of the profiled C_peak")
    context: int = help_field(128, "cached tokens before each step's new tokens")
    quick: bool = help_field(False, "60 steps per start")


def run(cfg: CalibrateBenchConfig) -> dict:
    from fastgrpo.bench.common import load_target, placement, plot, write_results
    from fastgrpo.fixture import build_fixture
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.speculative.calibration import DEFAULT_SWEEP, one_sequence_batch, profile
    from fastgrpo.rollout.speculative.knee import knee
    from fastgrpo.rollout.speculative.online_calibration import OnlineCalibrator

    torch.set_num_threads(os.cpu_count() or 1)
    fixture = build_fixture(cfg.preset)
    model = load_target(fixture)
    where = placement(model)
    runner = ModelRunner(model, headroom=max(DEFAULT_SWEEP))
    points = profile(runner, DEFAULT_SWEEP, context=cfg.context, budget_s=300)
    profiled = knee(points)
    print(f"profiled C_peak {profiled:.1f} from {points}", flush=True)
    steps = 60 if cfg.quick else cfg.steps
    limit = runner.max_positions - cfg.context
    records, series = [], {}
    for factor in (float(f) for f in cfg.factors.split(",")):
        cal = OnlineCalibrator(profiled * factor, "configured")
        runner = ModelRunner(model, headroom=max(DEFAULT_SWEEP))
        runner.observe_decode_forwards(cal.observe)
        trace = []
        for _ in range(steps):
            T = min(max(1, math.floor(cal.step_c_peak())), limit)
            runner.forward(one_sequence_batch(runner, T, cfg.context))
            trace.append(cal.c_peak)
        within = [abs(c / profiled - 1) <= 0.25 for c in trace]
        settled = next((i + 1 for i in range(steps) if all(within[i:])), None)  # steps until it stays within 25%
        rec = {"start_factor": factor, "start": profiled * factor, "final": trace[-1],
               "final_ratio": trace[-1] / profiled, "steps_to_within_25pct": settled, "updates": cal.updates,
               "trace": trace}
        records.append(rec)
        series[f"start {factor:g}x"] = (list(range(1, steps + 1)), [c / profiled for c in trace])
        print(f"start {factor:g}x ({profiled * factor:.1f}): final {trace[-1]:.1f} ({trace[-1] / profiled:.2f}x), "
              f"within 25% from step {settled}", flush=True)
    path = write_results(cfg.out, "calibrate", records, **where,
                         profiled_c_peak=profiled, profile_points=points, steps=steps,
                         target={"preset": cfg.preset, "parameters": sum(p.numel() for p in model.parameters())})
    plot(path.with_suffix(".png"), f"online C_peak from a wrong start (profiled {profiled:.0f}, {where['device']})",
         "decode step", "C_peak / profiled", series, logx=False, hline=1.0)
    print(f"wrote {path}")
    return {"path": str(path), "records": records}
