"""`fastgrpo-bench concurrency`: speculation modes (adaptive, static, off) across batch sizes.

One engine serves every run; each request picks its mode, so all modes share the same model,
draft, cache and process. Two workloads:
  * fixed: B cache slots kept full by a queue of several times B prompts;
  * grpo: Q prompts x G = 8 samples submitted at once, whose completions end at different lengths,
    so concurrency decays from Q*G to a tail of a few sequences (a GRPO generation phase).
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch

from fastgrpo.common.cli import help_field

MODES = ("off", "static", "adaptive")


@dataclass(frozen=True)
class ConcurrencyBenchConfig:
    out: str = help_field("benchmarks/results/concurrency.json", "JSON output path (a PNG is written beside it)")
    batch_sizes: str = help_field("1,2,4,8,16,32,64,128,256", "fixed-B sweep")
    quick: bool = help_field(False, "B in {1, 8, 64} and a small GRPO batch: a few minutes")
    preset: str = help_field("bench", "fixture preset of the target")
    c_peak: float = help_field(0.0, "adaptive C_peak; 0 = measure it now with the profiler")
    temperature: float = help_field(1.0, "sampling temperature")
    max_new_tokens: int = help_field(96, "tokens per sequence at most")
    sequences_per_slot: int = help_field(2, "fixed workload: sequences queued per slot")
    grpo_prompts: int = help_field(16, "grpo workload: Q prompts (x G = 8 samples)")
    width: int = help_field(4, "static tree width K")
    depth: int = help_field(6, "static tree depth L")
    n_verify: int = help_field(20, "static tree N_verify")
    repeats: int = help_field(3, "runs of each mode per workload, interleaved in rotating order; speedup is the median of the rounds' ratios to off (quick: 1)")
    seed: int = help_field(0, "sampling seed")


def run(cfg: ConcurrencyBenchConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgrpo.bench.common import median_run, plot, write_results
    from fastgrpo.bench.spec import timed_generation
    from fastgrpo.fixture import build_fixture
    from fastgrpo.fixture.draft import build_draft
    from fastgrpo.learner.tasks import format_prompt, synthetic_math
    from fastgrpo.rollout.calibration import DEFAULT_SWEEP, knee, profile
    from fastgrpo.rollout.controller import ControllerConfig, SpecPolicy
    from fastgrpo.rollout.engine.engine import Engine, EngineConfig
    from fastgrpo.rollout.engine.model_runner import ModelRunner
    from fastgrpo.rollout.speculative.draft import DraftHead
    from fastgrpo.rollout.speculative.drafter import Drafter, TreeShape

    torch.set_num_threads(os.cpu_count() or 1)
    fixture = build_fixture(cfg.preset)
    model = AutoModelForCausalLM.from_pretrained(str(fixture)).eval()
    tok = AutoTokenizer.from_pretrained(str(fixture))
    head = DraftHead.load(build_draft(fixture), model)
    c_peak, source = cfg.c_peak, "configured"
    if c_peak <= 0:
        runner = ModelRunner(model, 1, headroom=max(DEFAULT_SWEEP))
        c_peak, source = knee(profile(runner, DEFAULT_SWEEP, budget_s=120)), "profile"
        del runner
    policy = SpecPolicy("adaptive", ControllerConfig(c_peak=c_peak), TreeShape(cfg.width, cfg.depth, cfg.n_verify))
    batch_sizes = [1, 8, 64] if cfg.quick else [int(b) for b in cfg.batch_sizes.split(",")]
    problems = synthetic_math(seed=0).test
    prompts_all = [tok(format_prompt(p.question))["input_ids"] for p in problems]
    eos = (tok.eos_token_id,)
    records = []

    def engine_for(slots: int) -> Engine:
        runner = ModelRunner(model, slots, headroom=policy.max_nodes())
        drafter = Drafter(head, slots, runner.cache.max_len + policy.draft_headroom())
        return Engine(runner, eos, EngineConfig(max_running=slots), drafter, policy)

    def measure(engine, prompts, n, workload, batch_size):
        # interleaved repeats, the order rotating each round (off, static, adaptive; static, adaptive,
        # off; ...): a slow spell of a shared machine hits every mode alike, and speedup is the median
        # over rounds of each round's own ratio to off, so drift between rounds cancels too
        runs = {mode: [] for mode in MODES}
        for r in range(1 if cfg.quick else cfg.repeats):
            for mode in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
                runs[mode].append(timed_generation(engine, prompts, n, cfg.temperature, cfg.max_new_tokens, cfg.seed, mode))
        tps = {mode: [x["tokens"] / x["seconds"] for x in rs] for mode, rs in runs.items()}
        # the same ratio per CPU second: steal time of a shared host, which moves wall time by
        # +-10% between rounds, does not enter it (a device check reads wall time)
        tpc = {mode: [x["tokens"] / x["cpu_seconds"] for x in rs] for mode, rs in runs.items()}
        for mode, rs in runs.items():
            median = median_run(rs)
            rec = {"workload": workload, "batch_size": batch_size, "mode": mode,
                   "tokens_per_s": median["tokens"] / median["seconds"],
                   "speedup_vs_off": statistics.median(a / b for a, b in zip(tps[mode], tps["off"])),
                   "speedup_per_round": [a / b for a, b in zip(tps[mode], tps["off"])],
                   "cpu_speedup_vs_off": statistics.median(a / b for a, b in zip(tpc[mode], tpc["off"])),
                   "acceptance_length": median["acceptance_length"], "tokens": median["tokens"],
                   "seconds": median["seconds"]}
            records.append(rec)
            print(f"{workload:5s} B={batch_size:4d} {mode:8s} {rec['tokens_per_s']:8.1f} tok/s  x{rec['speedup_vs_off']:.2f} vs off  "
                  f"(per CPU second x{rec['cpu_speedup_vs_off']:.2f})  acceptance {rec['acceptance_length']:.2f}", flush=True)

    for B in batch_sizes:
        engine = engine_for(B)
        try:
            timed_generation(engine, prompts_all[:2], 1, cfg.temperature, 16, cfg.seed, "adaptive")  # warm-up
            measure(engine, prompts_all[: max(2, cfg.sequences_per_slot * B)], 1, "fixed", B)
        finally:
            engine.shutdown()
    Q = 4 if cfg.quick else cfg.grpo_prompts
    engine = engine_for(Q * 8)
    try:
        timed_generation(engine, prompts_all[:2], 1, cfg.temperature, 16, cfg.seed, "adaptive")
        measure(engine, prompts_all[100 : 100 + Q], 8, "grpo", Q * 8)
    finally:
        engine.shutdown()
    extra = {"c_peak": c_peak, "c_peak_source": source, "static_tree": [cfg.width, cfg.depth, cfg.n_verify],
             "target": {"preset": cfg.preset, "parameters": sum(p.numel() for p in model.parameters())},
             "sampling": {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens}}
    path = write_results(cfg.out, "concurrency", records, **extra)
    fixed = [r for r in records if r["workload"] == "fixed"]
    plot(path.with_suffix(".png"), f"speculation modes vs batch size (C_peak {c_peak:.0f}, {extra['target']['parameters'] / 1e6:.0f}M target)",
         "batch size B", "tokens/s relative to off",
         {m: ([r["batch_size"] for r in fixed if r["mode"] == m], [r["speedup_vs_off"] for r in fixed if r["mode"] == m])
          for m in ("adaptive", "static")})
    print(f"wrote {path}")
    return {"path": str(path), "records": records}
