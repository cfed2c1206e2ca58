"""`fastgrpo-bench concurrency`: speculation modes (adaptive, static, off) across batch sizes.

Each mode gets its own engine over the same model and draft; the three run the same workload at
once, taking turns step by step (bench/lockstep.py), so they are timed on the same machine state and
tokens/s counts each mode's own steps. Two workloads:
  * fixed: B cache slots kept full by a queue of several times B prompts;
  * grpo: Q prompts x G = 8 samples submitted at once, whose completions end at different lengths,
    so concurrency decays from Q*G (a GRPO generation phase). The fixture's completions all stop
    within ~16-40 tokens, so this phase barely has a tail;
  * grpo-tail: the same batch with each sample's length drawn log-uniformly from
    [tail_min_tokens, tail_max_tokens] (EOS ignored): concurrency decays steadily to a tail of a few
    sequences, the shape of GRPO rollouts on reasoning tasks, whose lengths spread over an order of
    magnitude.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass

import torch

from fastgrpo.common.config import help_field

MODES = ("off", "static", "adaptive")


@dataclass(frozen=True)
class ConcurrencyBenchConfig:
    out: str = help_field("benchmarks/results/concurrency.json", "JSON output path (a PNG is written beside it)")
    batch_sizes: str = help_field("1,2,4,8,16,32,64,128,256", "fixed-B sweep")
    quick: bool = help_field(False, "B in {1, 8, 64}, a small GRPO batch and tails of at most 64 tokens: a few minutes")
    preset: str = help_field("bench", "fixture preset of the target")
    c_peak: float = help_field(0.0, "adaptive C_peak; 0 = measure it now with the profiler")
    temperature: float = help_field(1.0, "sampling temperature")
    max_new_tokens: int = help_field(96, "tokens per sequence at most")
    sequences_per_slot: int = help_field(2, "fixed workload: sequences queued per slot")
    grpo_prompts: int = help_field(16, "grpo workloads: Q prompts (x G = 8 samples)")
    tail_min_tokens: int = help_field(16, "grpo-tail workload: shortest completion")
    tail_max_tokens: int = help_field(256, "grpo-tail workload: longest completion")
    workloads: str = help_field("fixed,grpo,grpo-tail", "workloads to run")
    width: int = help_field(4, "static tree width K")
    depth: int = help_field(6, "static tree depth L")
    n_verify: int = help_field(20, "static tree N_verify")
    repeats: int = help_field(3, "paired rounds per workload (all modes in lockstep); speedup is the median of the rounds' ratios to off (quick: 1)")
    seed: int = help_field(0, "sampling seed")
    threads: int = help_field(0, "torch CPU threads; 0 = one per core (on a shared 2-core VM identical work in lockstep "
                                 "differs by +-1 % per round with 1 thread, +-3-7 % with 2)")
    compile: str = help_field("auto", "--compile of every engine (auto / on / off; see fastgrpo-rollout --help)")


def run(cfg: ConcurrencyBenchConfig) -> dict:
    from transformers import AutoTokenizer

    from fastgrpo.bench.common import load_target, median_run, placement, plot, write_results
    from fastgrpo.bench.lockstep import lockstep_generation
    from fastgrpo.bench.spec import timed_generation
    from fastgrpo.fixture import build_fixture
    from fastgrpo.fixture.draft import build_draft
    from fastgrpo.learner.tasks import format_prompt, synthetic_math
    from fastgrpo.rollout.speculative.calibration import DEFAULT_SWEEP, profile
    from fastgrpo.rollout.speculative.knee import knee, knee_past_sweep
    from fastgrpo.rollout.speculative.controller import ControllerConfig, SpecController
    from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.scheduler.requests import GenerationRequest
    from fastgrpo.wire.records import Sampling
    from fastgrpo.rollout.speculative.draft_head import DraftHead
    from fastgrpo.rollout.speculative.draft_runner import Drafter
    from fastgrpo.rollout.speculative.tree import TreeShape

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    fixture = build_fixture(cfg.preset)
    model = load_target(fixture)
    tok = AutoTokenizer.from_pretrained(str(fixture))
    head = DraftHead.load(build_draft(fixture), model)
    c_peak, source, points = cfg.c_peak, "configured", []
    if c_peak <= 0:
        runner = ModelRunner(model, headroom=max(DEFAULT_SWEEP))
        points = profile(runner, DEFAULT_SWEEP, budget_s=120)
        c_peak, source = knee(points), "profile"
        del runner
        print(f"profiled C_peak {c_peak:.1f} from {[(t, round(sec * 1e3, 3)) for t, sec in points]} (tokens, ms)"
              + (" -- latency never bent within the sweep: C_peak is at least that" if knee_past_sweep(points, c_peak) else ""),
              flush=True)
    controller = SpecController("adaptive", ControllerConfig(c_peak=c_peak), TreeShape(cfg.width, cfg.depth, cfg.n_verify))
    batch_sizes = [1, 8, 64] if cfg.quick else [int(b) for b in cfg.batch_sizes.split(",")]
    problems = synthetic_math(seed=0).test
    prompts_all = [tok(format_prompt(p.question))["input_ids"] for p in problems]
    eos = (tok.eos_token_id,)
    records = []
    tail_max = min(cfg.tail_max_tokens, 64) if cfg.quick else cfg.tail_max_tokens
    extra = {**placement(model), "c_peak": c_peak, "c_peak_source": source, "profile_points": points,
             "c_peak_past_sweep": bool(points) and knee_past_sweep(points, c_peak),
             "static_tree": [cfg.width, cfg.depth, cfg.n_verify],
             "target": {"preset": cfg.preset, "parameters": sum(p.numel() for p in model.parameters())},
             "sampling": {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens},
             "grpo_tail_tokens": [cfg.tail_min_tokens, tail_max]}

    def save():
        """Writes the records so far (after every measurement: a run cut short keeps what it measured)."""
        path = write_results(cfg.out, "concurrency", records, **extra)
        fixed = [r for r in records if r["workload"] == "fixed"]
        if fixed:
            plot(path.with_suffix(".png"), f"speculation modes vs batch size (C_peak {c_peak:.0f}, "
                 f"{extra['target']['parameters'] / 1e6:.0f}M target, {extra['device']})",
                 "batch size B", "tokens/s relative to off",
                 {m: ([r["batch_size"] for r in fixed if r["mode"] == m], [r["speedup_vs_off"] for r in fixed if r["mode"] == m])
                  for m in ("adaptive", "static")})
        return path

    def engines_for(slots: int) -> dict[str, Engine]:
        """One engine per mode, run in lockstep (bench/lockstep.py), each warmed up alone."""
        engines = {}
        for mode in MODES:
            runner = ModelRunner(model, headroom=controller.max_nodes())
            drafter = Drafter(head)
            engines[mode] = Engine(runner, eos, EngineConfig(max_running=slots, compile=cfg.compile), drafter, controller)
            timed_generation(engines[mode], prompts_all[:2], 1, cfg.temperature, 16, cfg.seed, mode)
        return engines

    def measure(requests, workload, batch_size):
        engines = engines_for(batch_size)
        try:
            rounds = [lockstep_generation(engines, requests, first=r)
                      for r in range(1 if cfg.quick else cfg.repeats)]
        finally:
            for engine in engines.values():
                engine.shutdown()
        for mode in MODES:
            runs = [r[mode] for r in rounds]
            ratios = [(r[mode]["tokens"] / r[mode]["seconds"]) / (r["off"]["tokens"] / r["off"]["seconds"]) for r in rounds]
            median = median_run(runs)
            rec = {"workload": workload, "batch_size": batch_size, "mode": mode,
                   "tokens_per_s": median["tokens"] / median["seconds"],
                   "speedup_vs_off": statistics.median(ratios), "speedup_per_round": ratios,
                   "acceptance_length": median["acceptance_length"], "tokens": median["tokens"],
                   "seconds": median["seconds"]}
            records.append(rec)
            print(f"{workload:5s} B={batch_size:4d} {mode:8s} {rec['tokens_per_s']:8.1f} tok/s  x{rec['speedup_vs_off']:.3f} vs off  "
                  f"(rounds {' '.join(f'{x:.3f}' for x in ratios)})  acceptance {rec['acceptance_length']:.2f}", flush=True)
        save()

    def same_requests(prompts, n):
        sampling = Sampling(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        return lambda mode: [GenerationRequest("bench", tuple(tuple(p) for p in prompts), n, sampling, mode)]

    def tail_requests(prompts, n):
        # one request per sample, its length drawn once (the same for every mode and round)
        g = torch.Generator().manual_seed(cfg.seed)
        lo, hi = math.log(cfg.tail_min_tokens), math.log(tail_max)
        lengths = torch.exp(lo + (hi - lo) * torch.rand(len(prompts) * n, generator=g)).round().long().tolist()
        jobs = [(tuple(p), cfg.seed + 1000 * q + i, lengths[q * n + i]) for q, p in enumerate(prompts) for i in range(n)]
        return lambda mode: [GenerationRequest("bench", (p,), 1, Sampling(
            temperature=cfg.temperature, max_new_tokens=length, seed=seed, ignore_eos=True), mode) for p, seed, length in jobs]

    workloads = cfg.workloads.split(",")
    if "fixed" in workloads:
        for B in batch_sizes:
            measure(same_requests(prompts_all[: max(2, cfg.sequences_per_slot * B)], 1), "fixed", B)
    Q = 4 if cfg.quick else cfg.grpo_prompts
    if "grpo" in workloads:
        measure(same_requests(prompts_all[100 : 100 + Q], 8), "grpo", Q * 8)
    if "grpo-tail" in workloads:
        measure(tail_requests(prompts_all[100 : 100 + Q], 8), "grpo-tail", Q * 8)
    path = save()
    print(f"wrote {path}")
    return {"path": str(path), "records": records}
