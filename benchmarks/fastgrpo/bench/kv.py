"""`fastgrpo-bench kv`: the paged KV cache on the bench fixture, every figure from one run.

1. Shared prompts, at GRPO shape (Q prompts x G samples): prefill seconds (a request of one new
   token: prefill and the first sample) and the KV bytes held at the peak of a generation, with
   prompt sharing on and off (`--no-prefix-sharing`), alternating repeats. Beside them, what one
   copy of each prompt plus the completions would take. Twice: with the task's own prompts (a few
   dozen tokens), and with few-shot prompts (solved problems before the question) of several
   hundred, the length where a prompt's keys and values outweigh its samples' completions.
2. Plain decode at B sequences with contexts filling the model's window: decode tokens/s of the
   steps after the prefill, for each attention backend, and for the dense one-slot-per-sequence
   cache this replaced, run from that commit's source tree (a git worktree) in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastgrpo.common.config import help_field

BEFORE = "5d99b7f"  # the last commit with one dense KV slot per sequence


@dataclass(frozen=True)
class KVBenchConfig:
    out: str = help_field("benchmarks/results/kv-cpu.json", "JSON output path")
    preset: str = help_field("bench", "fixture preset of the target")
    prompts: int = help_field(8, "prompts Q of the GRPO batch")
    group_size: int = help_field(8, "samples G per prompt")
    max_new_tokens: int = help_field(64, "tokens per sample in the KV-bytes run")
    few_shot_tokens: int = help_field(384, "length of the few-shot prompts (0 skips them)")
    repeats: int = help_field(5, "timed prefills per mode, alternating; the median counts")
    decode_batch: int = help_field(64, "sequences B of the decode measurement")
    decode_tokens: int = help_field(32, "tokens each of them decodes (its prompt fills the window up to them)")
    decode_repeats: int = help_field(3, "decode runs per variant, alternating; the median counts")
    backends: str = help_field("gather,flex", "attention backends measured for decode (comma-separated)")
    before: str = help_field(BEFORE, "commit of the dense per-slot cache to compare decode with ('' skips it)")
    quick: bool = help_field(False, "1 repeat each, B = 16: about two minutes once the fixture is cached")


def _task_prompts(tok, n: int) -> list[list[int]]:
    from fastgrpo.learner.tasks import format_prompt, synthetic_math

    return [tok(format_prompt(p.question))["input_ids"] for p in synthetic_math(seed=0).test[:n]]


def _few_shot_prompts(tok, n: int, tokens: int) -> list[list[int]]:
    """n prompts of about `tokens` tokens: solved problems (question, answer) before each question."""
    from fastgrpo.learner.tasks import format_prompt, synthetic_math

    task = synthetic_math(seed=0)
    out = []
    for i, problem in enumerate(task.test[:n]):
        shots, k = [], 0
        while True:
            solved = task.train[(i * 97 + k) % len(task.train)]
            shot = f"{format_prompt(solved.question)}{solved.solution}\n"
            if len(tok("".join(shots) + shot + format_prompt(problem.question))["input_ids"]) > tokens:
                break
            shots.append(shot)
            k += 1
        out.append(tok("".join(shots) + format_prompt(problem.question))["input_ids"])
    return out


def sharing(model, eos, prompts: list[list[int]], cfg: KVBenchConfig) -> dict:
    """Prefill seconds and peak KV bytes of Q prompts x G samples with prompt sharing on and off."""
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
    from fastgrpo.rollout.scheduler.requests import GenerationRequest
    from fastgrpo.wire.records import Sampling

    from fastgrpo.rollout.scheduler.observer import EngineObserver

    class PeakBlocks(EngineObserver):
        """The most KV blocks in use after any step of `engine` (set once it exists)."""

        def __init__(self):
            self.engine: Engine | None = None
            self.peak = 0

        def step_done(self, report) -> None:
            self.peak = max(self.peak, self.engine.blocks.stats().used)

    G = cfg.group_size
    batch = len(prompts) * G
    out = {}
    engines, peaks = {}, {}
    for shared in (True, False):
        peaks[shared] = PeakBlocks()
        config = EngineConfig(max_running=batch, max_prefill_tokens=sum(map(len, prompts)) * G, prefix_sharing=shared)
        engines[shared] = peaks[shared].engine = Engine(ModelRunner(model), eos, config, observers=[peaks[shared]])

    def one(engine, max_new_tokens: int) -> tuple[float, list]:
        engine.run_exclusive(engine.blocks.forget_prefixes)  # each run prefills from nothing cached
        req = GenerationRequest("kv", tuple(map(tuple, prompts)), G,
                                Sampling(temperature=1.0, max_new_tokens=max_new_tokens, seed=0, ignore_eos=True))
        t0 = time.perf_counter()
        done = list(engine.submit(req))
        return time.perf_counter() - t0, done

    try:
        for engine in engines.values():
            one(engine, 1)  # warm-up
        seconds = {True: [], False: []}
        for _ in range(1 if cfg.quick else cfg.repeats):
            for shared, engine in engines.items():
                seconds[shared].append(one(engine, 1)[0])
        for shared, engine in engines.items():
            peaks[shared].peak = 0
            _, done = one(engine, cfg.max_new_tokens)
            per_block = engine.kv_bytes_per_block
            per_token = per_block / engine.blocks.block_size
            completions = sum(len(c.token_ids) for c in done)
            out["shared" if shared else "unshared"] = {
                "prefill_seconds": sorted(seconds[shared])[len(seconds[shared]) // 2],
                "prefill_seconds_runs": seconds[shared],
                "peak_kv_blocks": peaks[shared].peak,
                "peak_kv_bytes": peaks[shared].peak * per_block,
                "kv_bytes_per_token": per_token,
            }
        prompt_tokens = sum(map(len, prompts))
        out["ideal_kv_bytes_one_prompt_copy"] = (prompt_tokens + completions) * per_token
        out["ideal_kv_bytes_every_sample_its_prompt"] = (prompt_tokens * G + completions) * per_token
        out["prompt_tokens"] = prompt_tokens
        out["completion_tokens"] = completions
        out["prefill_ratio"] = out["shared"]["prefill_seconds"] / out["unshared"]["prefill_seconds"]
        out["kv_bytes_ratio"] = out["shared"]["peak_kv_bytes"] / out["unshared"]["peak_kv_bytes"]
    finally:
        for engine in engines.values():
            engine.shutdown()
    return out


def decode_rate(model_dir: str, batch: int, new_tokens: int, repeats: int, backend: str | None) -> dict:
    """Decode tokens/s of `batch` sequences whose prompts fill the model's window up to `new_tokens`
    more; the prefill step is left out. Runs on this tree's engine, or (backend None) on a tree from
    before the paged cache, whose runner takes one slot per sequence."""
    import inspect

    import torch

    from fastgrpo.bench.common import load_target
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
    from fastgrpo.rollout.scheduler.observer import EngineObserver
    from fastgrpo.rollout.scheduler.requests import GenerationRequest
    from fastgrpo.wire.records import Sampling

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_target(model_dir)
    prompt_len = model.config.max_position_embeddings - new_tokens
    config = dict(max_running=batch, max_prefill_tokens=batch * prompt_len)
    if "num_slots" in inspect.signature(ModelRunner).parameters:  # the dense cache
        runner = ModelRunner(model, batch)
    else:
        runner = ModelRunner(model)
        config["attention_backend"] = backend
    steps: list = []

    class Steps(EngineObserver):
        def step_done(self, report):
            steps.append(report)

    engine = Engine(runner, (model.config.eos_token_id,), EngineConfig(**config), observers=[Steps()])
    gen = torch.Generator().manual_seed(0)
    runs = []
    try:
        for r in range(repeats + 1):  # run 0 warms up
            prompts = tuple(tuple(torch.randint(3, model.config.vocab_size, (prompt_len,), generator=gen).tolist())
                            for _ in range(batch))
            steps.clear()
            req = GenerationRequest("decode", prompts, 1, Sampling(temperature=0.0, max_new_tokens=new_tokens,
                                                                   ignore_eos=True))
            list(engine.submit(req))
            decode = [s for s in steps if s.batch_size == batch and not s.first_token_seconds]
            if r:
                runs.append({"tokens": sum(s.decode_tokens for s in decode), "seconds": sum(s.seconds for s in decode),
                             "steps": len(decode)})
    finally:
        engine.shutdown()
    rates = [x["tokens"] / x["seconds"] for x in runs]
    return {"tokens_per_s": sorted(rates)[len(rates) // 2], "tokens_per_s_runs": rates,
            "context": model.config.max_position_embeddings, "prompt_tokens": prompt_len, "steps": runs[0]["steps"]}


def _tree_roots(root: Path) -> list[str]:
    return [str(root / p) for p in ("services/rollout", "services/learner", "common/python", "proto/python",
                                    "clients/python", "fixture", "benchmarks")]


def decode_rate_before(commit: str, model_dir: str, batch: int, new_tokens: int, repeats: int) -> dict:
    """decode_rate on the source tree of `commit` (a temporary git worktree), in a subprocess whose
    imports come from that tree only: the dense cache measured in the same run as the paged one."""
    repo = Path(__file__).resolve().parents[3]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-f", str(tree), commit],
                       check=True, capture_output=True)
        try:
            script = (
                "import sys, json\n"
                "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
                f"sys.path[:0] = {_tree_roots(tree)!r} + [{str(Path(__file__).parent)!r}]\n"
                "import kv\n"
                f"print(json.dumps(kv.decode_rate({model_dir!r}, {batch}, {new_tokens}, {repeats}, None)))\n"
            )
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
            return json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)


def run(cfg: KVBenchConfig) -> dict:
    import torch
    from transformers import AutoTokenizer

    from fastgrpo.bench.common import load_target, placement, write_results
    from fastgrpo.fixture import build_fixture

    torch.set_num_threads(os.cpu_count() or 1)
    fixture = build_fixture(cfg.preset)
    model = load_target(fixture)
    tok = AutoTokenizer.from_pretrained(str(fixture))
    prompts = _task_prompts(tok, cfg.prompts)
    extra = {**placement(model), "target": {"preset": cfg.preset, "dir": str(fixture),
                                            "layers": model.config.num_hidden_layers},
             "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    records = []
    prompt_sets = {"task": prompts}
    if cfg.few_shot_tokens:
        prompt_sets["few-shot"] = _few_shot_prompts(tok, cfg.prompts, cfg.few_shot_tokens)
    for name, ps in prompt_sets.items():
        share = sharing(model, (tok.eos_token_id,), ps, cfg)
        records.append({"part": "sharing", "prompt_set": name, "prompts": len(ps), "group_size": cfg.group_size,
                        **share})
        print(f"{name} prompts ({share['prompt_tokens'] / len(ps):.0f} tokens) x G={cfg.group_size}: prefill "
              f"{share['shared']['prefill_seconds']:.3f}s shared vs {share['unshared']['prefill_seconds']:.3f}s unshared "
              f"({share['prefill_ratio']:.2f}x); peak KV {share['shared']['peak_kv_bytes'] / 2**20:.1f} MiB vs "
              f"{share['unshared']['peak_kv_bytes'] / 2**20:.1f} MiB (one prompt copy per group + completions: "
              f"{share['ideal_kv_bytes_one_prompt_copy'] / 2**20:.1f} MiB)", flush=True)
        path = write_results(cfg.out, "kv", records, **extra)
    B = 16 if cfg.quick else cfg.decode_batch
    repeats = 1 if cfg.quick else cfg.decode_repeats
    variants = [(b, None) for b in cfg.backends.split(",") if b] + ([("dense (before)", cfg.before)] if cfg.before else [])
    for name, commit in variants:
        if commit is None:
            rate = decode_rate(str(fixture), B, cfg.decode_tokens, repeats, name)
        else:
            rate = decode_rate_before(commit, str(fixture), B, cfg.decode_tokens, repeats)
        records.append({"part": "decode", "variant": name, "commit": commit, "batch_size": B, **rate})
        print(f"decode B={B} context {rate['context']}: {name:15s} {rate['tokens_per_s']:8.1f} tok/s", flush=True)
        path = write_results(cfg.out, "kv", records, **extra)
    print(f"-> {path}", flush=True)
    return {"records": records}
