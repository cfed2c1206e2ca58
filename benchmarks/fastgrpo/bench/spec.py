"""`fastgrpo-bench spec`: speculative vs plain decoding on the same engine, per batch size.

For each B the engine runs with B cache slots and a queue of several times B task prompts, so the
batch stays full until the tail; both modes decode the same prompts with the same seeds. Tokens/s
counts every generated token over the wall time of the whole batch (prefill included).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fastgrpo.common.config import help_field


@dataclass(frozen=True)
class SpecBenchConfig:
    out: str = help_field("benchmarks/results/spec.json", "JSON output path (a PNG is written beside it)")
    batch_sizes: str = help_field("1,2,4,8,16,32,64", "comma-separated batch sizes B (KV-cache slots)")
    quick: bool = help_field(False, "B = 1 only with a few sequences: about a minute once the fixture is cached")
    preset: str = help_field("bench", "fixture preset of the target (bench: >= 12 layers, >= 50M parameters)")
    temperature: float = help_field(1.0, "sampling temperature (0 = greedy)")
    top_p: float = help_field(1.0, "nucleus sampling mass (GRPO papers use 0.95)")
    max_new_tokens: int = help_field(96, "tokens per sequence at most")
    sequences_per_slot: int = help_field(3, "sequences queued per slot (keeps the batch full)")
    min_sequences: int = help_field(6, "sequences per batch size at least")
    # the CPU-sized default: one drawn child per level, 7 deep (2-core CPU sweep at B = 1: wider
    # trees verify more tokens than a compute-bound CPU forward affords for what they add)
    width: int = help_field(1, "tree width K")
    depth: int = help_field(7, "tree depth L")
    n_verify: int = help_field(8, "tree nodes verified per sequence (root included)")
    verify: str = help_field("rrs", "verification of sampled sequences: rrs (children drawn from the draft) or match (top-K, sample-matching)")
    repeats: int = help_field(3, "runs of plain and speculative decoding per B, interleaved; the median counts (quick: 1)")
    seed: int = help_field(0, "sampling seed")
    compile: str = help_field("auto", "--compile of every engine (auto / on / off; see fastgrpo-rollout --help)")


def timed_generation(engine, prompts, num_samples: int, temperature: float, max_new_tokens: int, seed: int,
                     spec_mode: str | None = None, top_p: float = 1.0) -> dict:
    """Runs one request through the engine; tokens, wall seconds and speculation counts."""
    from fastgrpo.rollout.scheduler.requests import GenerationRequest
    from fastgrpo.wire.records import Sampling

    req = GenerationRequest("bench", tuple(tuple(p) for p in prompts), num_samples,
                            Sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed),
                            spec_mode)
    return timed_requests(engine, [req])


def timed_requests(engine, requests) -> dict:
    """Submits the requests at once and waits for all; what `timed_generation` returns."""
    t0 = time.perf_counter()
    handles = [engine.submit(req) for req in requests]
    results = [r for h in handles for r in h]
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in results)
    steps = sum(r.spec.verify_steps for r in results)
    # each verify step emits its accepted draft tokens plus one token drawn from the target
    emitted_by_verify = sum(r.spec.accepted_tokens + r.spec.verify_steps for r in results)
    return {"tokens": tokens, "seconds": seconds, "verify_steps": steps,
            "acceptance_length": emitted_by_verify / steps if steps else 0.0,
            "drafted": sum(r.spec.drafted_tokens for r in results), "accepted": sum(r.spec.accepted_tokens for r in results)}


def run(cfg: SpecBenchConfig) -> dict:
    import os

    from transformers import AutoTokenizer

    from fastgrpo.bench.common import load_target, median_run, placement, plot, write_results
    from fastgrpo.fixture import build_fixture
    from fastgrpo.fixture.draft import build_draft
    from fastgrpo.learner.tasks import format_prompt, synthetic_math
    from fastgrpo.rollout.speculative.controller import SpecController
    from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.speculative.draft_head import DraftHead
    from fastgrpo.rollout.speculative.draft_runner import Drafter
    from fastgrpo.rollout.speculative.tree import TreeShape

    torch.set_num_threads(os.cpu_count() or 1)
    fixture = build_fixture(cfg.preset)
    draft_dir = build_draft(fixture)
    model = load_target(fixture)
    where = placement(model)
    tok = AutoTokenizer.from_pretrained(str(fixture))
    head = DraftHead.load(draft_dir, model)
    shape = TreeShape(cfg.width, cfg.depth, cfg.n_verify)
    batch_sizes = [1] if cfg.quick else [int(b) for b in cfg.batch_sizes.split(",")]
    problems = synthetic_math(seed=0).test
    eos = (tok.eos_token_id,)
    records = []
    extra = {
        **where,
        "target": {"preset": cfg.preset, "dir": str(fixture),
                   "parameters": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers},
        "draft": {"dir": str(draft_dir), "parameters": sum(p.numel() for p in head.parameters())},
        "tree": {"width": shape.width, "depth": shape.depth, "n_verify": shape.n_verify, "verify": cfg.verify},
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
    }
    for B in batch_sizes:
        n = 2 if cfg.quick else max(cfg.min_sequences, cfg.sequences_per_slot * B)
        prompts = [tok(format_prompt(p.question))["input_ids"] for p in problems[:n]]
        warm = prompts[: min(B, 2)]
        plain = Engine(ModelRunner(model), eos, EngineConfig(max_running=B, compile=cfg.compile))
        controller = SpecController("static", static_tree=shape, verify=cfg.verify)
        runner = ModelRunner(model, headroom=controller.max_nodes())
        spec = Engine(runner, eos, EngineConfig(max_running=B, compile=cfg.compile), Drafter(head), controller)
        try:
            for engine in (plain, spec):
                timed_generation(engine, warm, 1, cfg.temperature, cfg.max_new_tokens, cfg.seed)  # warm-up: allocator, kernels
            # interleaved repeats: a slow spell of a shared machine hits both modes alike
            runs = {"plain": [], "spec": []}
            for _ in range(1 if cfg.quick else cfg.repeats):
                runs["plain"].append(timed_generation(plain, prompts, 1, cfg.temperature, cfg.max_new_tokens, cfg.seed, top_p=cfg.top_p))
                runs["spec"].append(timed_generation(spec, prompts, 1, cfg.temperature, cfg.max_new_tokens, cfg.seed, top_p=cfg.top_p))
            p, s = median_run(runs["plain"]), median_run(runs["spec"])
        finally:
            plain.shutdown()
            spec.shutdown()
        rec = {
            "batch_size": B,
            "sequences": n,
            "tokens_per_s_plain": p["tokens"] / p["seconds"],
            "tokens_per_s_spec": s["tokens"] / s["seconds"],
            "speedup": (s["tokens"] / s["seconds"]) / (p["tokens"] / p["seconds"]),
            "acceptance_length": s["acceptance_length"],
            "tokens_plain": p["tokens"],
            "tokens_spec": s["tokens"],
            "seconds_plain": p["seconds"],
            "seconds_spec": s["seconds"],
            "drafted": s["drafted"],
            "accepted": s["accepted"],
            "tokens_per_s_plain_runs": [r["tokens"] / r["seconds"] for r in runs["plain"]],
            "tokens_per_s_spec_runs": [r["tokens"] / r["seconds"] for r in runs["spec"]],
        }
        records.append(rec)
        print(f"B={B:3d}  plain {rec['tokens_per_s_plain']:8.1f} tok/s  spec {rec['tokens_per_s_spec']:8.1f} tok/s  "
              f"speedup {rec['speedup']:.2f}x  acceptance length {rec['acceptance_length']:.2f}", flush=True)
        path = write_results(cfg.out, "spec", records, **extra)  # every B: a run cut short keeps what it measured
    if len(records) > 1:
        plot(path.with_suffix(".png"), f"speculative vs plain decoding ({extra['target']['parameters'] / 1e6:.0f}M target, {where['device']})",
             "batch size B", "speedup (tokens/s spec / plain)",
             {"speedup": ([r["batch_size"] for r in records], [r["speedup"] for r in records])})
    print(f"wrote {path}")
    return {"path": str(path), "records": records}
