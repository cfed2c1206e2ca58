"""What each section of gpu.py measures; gpu.py runs every one in its own subprocess.

  knee-fixture / knee-llama     latency of one target forward against tokens per forward, C_peak;
  plain-fixture / plain-llama   plain decode tokens/s at each B through the rollout engine, per
                                compile setting, beside the memory-bandwidth bound of that B;
  spec                          speculative vs plain decoding (bench/spec.py);
  concurrency                   adaptive / static / off (bench/concurrency.py), at the knee
                                section's C_peak.

"fixture" is the plan's fixture preset (bench on a GPU), "llama" a random-init Llama built here
(TinyLlama-1.1B shapes on a GPU): random weights decode as fast as trained ones, and a ~1B model
is where a GPU's bandwidth, not its launches, sets the speed. Every section writes its results
file after every measurement, so one cut short by its timeout keeps what it measured.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

COMPILE_SETTINGS = ("off", "auto")
"""EngineConfig.compile values the plain sections measure, in this order (when the engine has
that field): "off" first, so its figures are written before a long compile warm-up can run the
section out of time."""


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the GPU's, or --cpu-smoke's tiny ones (same sections, same code)."""

    name: str
    preset: str  # fixture preset of the target and its draft
    llama: dict  # LlamaConfig fields of the random-init model
    batch_sizes: tuple[int, ...]  # plain decode
    prompt_tokens: int  # plain decode: random prompt ids per sequence
    new_tokens: int  # plain decode: tokens each sequence decodes (EOS ignored)
    repeats: int  # plain decode: timed runs per (B, compile setting) after one warm-up run; the median counts
    copy_mib: int  # buffer the read bandwidth is measured with
    sweep: tuple[int, ...]  # knee: tokens per forward
    knee_repeats: int
    knee_budget_s: float
    spec: dict  # SpecBenchConfig fields (out and preset are set here)
    concurrency: dict  # ConcurrencyBenchConfig fields (out, preset and c_peak are set here)
    threads: int  # torch CPU threads; 0 = one per core
    budgets: dict  # section -> seconds, in run order
    total_s: float  # the whole run, unpacking included: section timeouts keep within it


TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TREE = dict(width=4, depth=6, n_verify=20)  # h100.sh's static tree

# GPU: one device call of at most 8 minutes. On an H100 (benchmarks/results/h100-run-log.txt) the
# bench fixture's eager steps took ~6-10 ms plain and ~25 ms speculative at any B, and a section's
# subprocess spends ~10-15 s importing, initialising CUDA and loading before it measures. Budgets
# are each section's eager estimate with about 2x to spare, the plain ones more: a compiling
# engine compiles a graph per batch bucket (9 up to B = 256) before it serves, unmeasured so far on
# a GPU. The knees go first (no engine, and concurrency reads the fixture's C_peak). A section that
# runs out keeps what it wrote. The 20 s the budgets leave of the total are for the header,
# unpacking and the checks. A knee section profiles twice on a GPU, eager and compiled.
GPU = Plan(
    name="gpu", preset="bench", llama=TINYLLAMA, batch_sizes=(1, 8, 64, 256), prompt_tokens=16, new_tokens=48,
    repeats=3, copy_mib=1024, sweep=(1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724,
                                     1024, 1448, 2048, 2896, 4096),
    knee_repeats=5, knee_budget_s=15,
    # eager engines: a compiling engine compiles its batch buckets each time one is built (two or
    # three per B here), and only plain decode compiles so far
    spec=dict(batch_sizes="1,8,64", max_new_tokens=64, repeats=2, min_sequences=4, sequences_per_slot=2,
              compile="off", **TREE),
    concurrency=dict(batch_sizes="1,8,64", workloads="fixed,grpo-tail", repeats=2, grpo_prompts=8, max_new_tokens=64,
                     sequences_per_slot=2, tail_min_tokens=16, tail_max_tokens=128, compile="off", **TREE),
    threads=0,
    budgets={"knee-fixture": 40, "knee-llama": 50, "plain-fixture": 60, "plain-llama": 100, "spec": 75,
             "concurrency": 105},
    total_s=450,
)

CPU_SMOKE = Plan(
    name="cpu-smoke", preset="default",
    llama=dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256),
    batch_sizes=(1, 8), prompt_tokens=8, new_tokens=6, repeats=1, copy_mib=32,
    sweep=(2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64), knee_repeats=2, knee_budget_s=20,
    spec=dict(batch_sizes="1,8", max_new_tokens=12, repeats=1, min_sequences=2, sequences_per_slot=1,
              width=2, depth=3, n_verify=6, compile="off"),
    concurrency=dict(batch_sizes="1,8", workloads="fixed,grpo-tail", repeats=1, grpo_prompts=2, max_new_tokens=12,
                     sequences_per_slot=1, tail_min_tokens=4, tail_max_tokens=12, width=2, depth=3, n_verify=6,
                     compile="off"),
    # one thread: on a shared 2-core machine two-thread OpenMP regions stall behind other processes
    # (a 4-layer forward measured at 600 ms instead of 2), and these figures mean nothing anyway
    threads=1,
    budgets={"knee-fixture": 15, "knee-llama": 15, "plain-fixture": 15, "plain-llama": 15, "spec": 20,
             "concurrency": 25},
    total_s=115,
)


def card() -> str:
    """The device the sections run on, by name: the GPU's, else the CPU's."""
    from fastgrpo.bench.common import machine

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else machine()["cpu"]


def results_path(out: Path, suite: str, slug: str) -> Path:
    return out / f"{suite}-{slug}.json"


class ResultsFile:
    """One suite's results file, shared by the sections of this run that write to it (gpu.py
    clears the folder's files first): what an earlier section wrote is kept before this one's."""

    def __init__(self, path: Path, suite: str):
        self.path, self.suite = path, suite
        try:
            self.before = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or cut off mid-write by an earlier section's timeout
            self.before = {}

    def save(self, records: list[dict], models: dict, **extra) -> None:
        """Writes the earlier sections' records and these (after every measurement)."""
        from fastgrpo.bench.common import write_results

        write_results(self.path, self.suite, self.before.get("records", []) + records, card=card(),
                      models={**self.before.get("models", {}), **models}, **extra)


def fixture_dirs(preset: str) -> tuple[Path, Path]:
    """The cached fixture of `preset` and its draft; a clear error, never a training run, when
    either is missing (a cache miss would train for minutes on a CPU, half an hour for bench)."""
    from fastgrpo.fixture import cache_root, fixture_name, get_recipe
    from fastgrpo.fixture.build import is_complete
    from fastgrpo.fixture.draft import cached_draft, draft_dir

    fixture = cache_root() / fixture_name(preset, get_recipe(preset))
    if not is_complete(fixture):
        raise SystemExit(f"no complete {preset} fixture at {fixture}: build it (`fastgrpo-fixture draft --preset "
                         f"{preset}`), or on a GPU machine stash its pieces (benchmarks/device/pack_fixture.py)")
    draft = cached_draft(fixture)
    if draft is None:
        raise SystemExit(f"the {preset} fixture's draft {draft_dir(fixture)} is not built: "
                         f"`fastgrpo-fixture draft --preset {preset}`")
    return fixture, draft


def load_model(plan: Plan, which: str) -> tuple[torch.nn.Module, dict]:
    """The fixture target (load_target: bf16 on a GPU) or the random Llama, in the same dtype."""
    from fastgrpo.bench.common import load_target, placement

    if which == "fixture":
        fixture, _ = fixture_dirs(plan.preset)
        model, name = load_target(fixture), fixture.name
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        config = LlamaConfig(**plan.llama, tie_word_embeddings=False)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as load_target loads the fixture
        with torch.device(device):  # initialised where it runs, not on the host and copied over
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        name = f"random llama {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M"
    info = {"name": name, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
            "weight_bytes_per_step": weight_bytes_per_step(model), **placement(model)}
    return model, info


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: all of them but the input embedding, of which it
    reads only B rows (unless it is tied to lm_head, which reads it whole)."""
    embed = model.get_input_embeddings().weight
    tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def compile_settings() -> list[str | None]:
    """COMPILE_SETTINGS where EngineConfig has a `compile` field; [None] (the engine as it is) before."""
    from fastgrpo.rollout.scheduler.engine import EngineConfig

    return list(COMPILE_SETTINGS) if "compile" in {f.name for f in dataclasses.fields(EngineConfig)} else [None]


def engine_timings(engine) -> dict:
    """Compile / warm-up seconds the engine or its runner exposes: number-valued attributes whose
    names hold "compile" or "warm" (e.g. engine.warmup_seconds; {} on an engine without them)."""
    out = {}
    for owner, obj in (("engine", engine), ("runner", engine.runner)):
        for name in dir(obj):
            if name.startswith("__") or not ("compile" in name or "warm" in name):
                continue
            value = getattr(obj, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{owner}.{name}"] = value
    return out


def plain(plan: Plan, out: Path, slug: str, which: str) -> None:
    """Plain decode tokens/s of B sequences (random prompts, EOS ignored), decode steps only (the
    prefill step is left out), beside the bandwidth bound B x read bandwidth / weight bytes; one
    engine per compile setting, measured over every B, then shut down.

    One KV block holds a sequence's whole context, so a compiled engine meets no block-table
    shape its start-up warm-up did not compile: the timed runs are steady-state steps and the
    compile seconds are recorded apart (engine_build_s, engine_timings)."""
    from fastgrpo.bench.common import read_bandwidth
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
    from fastgrpo.rollout.scheduler.observer import EngineObserver
    from fastgrpo.rollout.scheduler.requests import GenerationRequest
    from fastgrpo.wire.records import Sampling

    class Steps(EngineObserver):
        def __init__(self):
            self.reports = []

        def step_done(self, report):
            self.reports.append(report)

    torch.set_num_threads(plan.threads or os.cpu_count() or 1)
    model, info = load_model(plan, which)
    bandwidth = read_bandwidth(plan.copy_mib * 2**20, 10, next(model.parameters()).device)["bytes_per_s"]
    floor_s = info["weight_bytes_per_step"] / bandwidth  # no decode step reads its weights faster
    print(f"{info['name']}: {info['parameters'] / 1e6:.0f}M parameters, {info['weight_bytes_per_step'] / 1e9:.3f} GB "
          f"read per step; read bandwidth {bandwidth / 1e9:.0f} GB/s -> step floor {floor_s * 1e3:.3f} ms", flush=True)
    results = ResultsFile(results_path(out, "plain", slug), "plain")
    context, B_max = plan.prompt_tokens + plan.new_tokens, max(plan.batch_sizes)
    gen = torch.Generator().manual_seed(0)
    records = []

    def one(engine, steps: Steps, B: int) -> dict:
        prompts = torch.randint(3, model.config.vocab_size, (B, plan.prompt_tokens), generator=gen).tolist()
        req = GenerationRequest("plain", tuple(map(tuple, prompts)), 1,
                                Sampling(temperature=1.0, max_new_tokens=plan.new_tokens, seed=0, ignore_eos=True))
        steps.reports.clear()
        t0 = time.perf_counter()
        list(engine.submit(req))
        decode = [s for s in steps.reports if s.batch_size == B and not s.first_token_seconds]
        return {"tokens": sum(s.decode_tokens for s in decode), "seconds": sum(s.seconds for s in decode),
                "steps": len(decode), "wall_s": time.perf_counter() - t0}

    for setting in compile_settings():
        steps = Steps()
        config = EngineConfig(max_running=B_max, max_prefill_tokens=B_max * plan.prompt_tokens, kv_block_size=context,
                              **({} if setting is None else {"compile": setting}))
        t0 = time.perf_counter()
        engine = Engine(ModelRunner(model, max_len=context), (), config, observers=[steps])
        built_s = time.perf_counter() - t0
        timings = engine_timings(engine)
        print(f"engine compile={setting}: built in {built_s:.1f} s {timings}", flush=True)
        try:
            for B in plan.batch_sizes:
                warm_s = one(engine, steps, B)["wall_s"]  # allocator, kernels; with compile, nothing left to trace
                runs = [one(engine, steps, B) for _ in range(plan.repeats)]
                rates = [r["tokens"] / r["seconds"] for r in runs]
                tps, bound = statistics.median(rates), B / floor_s
                records.append({"model": which, "batch_size": B, "compile": setting, "tokens_per_s": tps,
                                "tokens_per_s_runs": rates, "step_ms": 1e3 * B / tps, "step_floor_ms": 1e3 * floor_s,
                                "tokens_per_s_bandwidth_bound": bound, "fraction_of_bound": tps / bound,
                                "decode_steps": runs[0]["steps"], "warmup_run_s": warm_s, "engine_build_s": built_s,
                                "engine_timings": timings, "read_bandwidth_bytes_per_s": bandwidth})
                print(f"{which:8s} B={B:4d} compile={setting}: {tps:10.1f} tok/s  {1e3 * B / tps:7.2f} ms/step  "
                      f"bound {bound:10.1f} tok/s ({tps / bound:.1%})", flush=True)
                results.save(records, {which: info}, context={"prompt_tokens": plan.prompt_tokens,
                                                              "new_tokens": plan.new_tokens, "kv_block_size": context})
        finally:
            engine.shutdown()


def knee_profile(plan: Plan, out: Path, slug: str, which: str) -> None:
    """C_peak of one model: forward latency over the sweep of tokens per forward (calibration.profile),
    read by knee.knee; eager, and where `serve --compile auto` profiles compiled forwards (CUDA)
    compiled too: the launch-bound knee beside the compute knee."""
    from fastgrpo.bench.common import read_bandwidth
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.runtime.steps import profile_compiled
    from fastgrpo.rollout.speculative.calibration import profile
    from fastgrpo.rollout.speculative.knee import knee, knee_past_sweep

    torch.set_num_threads(plan.threads or os.cpu_count() or 1)
    model, info = load_model(plan, which)
    device = next(model.parameters()).device
    bandwidth = read_bandwidth(plan.copy_mib * 2**20, 10, device)["bytes_per_s"]
    floor_ms = 1e3 * info["weight_bytes_per_step"] / bandwidth
    results, records = ResultsFile(results_path(out, "knee", slug), "knee"), []
    for compiled in (False, True) if profile_compiled("auto", device) else (False,):
        runner = ModelRunner(model, headroom=max(plan.sweep))
        t0 = time.perf_counter()
        points = profile(runner, list(plan.sweep), repeats=plan.knee_repeats, budget_s=plan.knee_budget_s,
                         compiled=compiled)
        c_peak = knee(points)
        past = knee_past_sweep(points, c_peak)
        print(f"{which}{' compiled' if compiled else ''}: C_peak {c_peak:.1f}"
              + (" (latency never bent: at least that)" if past else "")
              + f"; {[(t, round(s * 1e3, 3)) for t, s in points]} (tokens, ms); bandwidth floor {floor_ms:.3f} ms",
              flush=True)
        records.append({"model": which, "compiled": compiled, "c_peak": c_peak, "c_peak_past_sweep": past,
                        "points": points, "profile_seconds": time.perf_counter() - t0, "step_floor_ms": floor_ms,
                        "read_bandwidth_bytes_per_s": bandwidth})
        results.save(records, {which: info})


def spec(plan: Plan, out: Path, slug: str) -> None:
    from fastgrpo.bench.spec import SpecBenchConfig, run

    fixture_dirs(plan.preset)  # bench/spec.py would train a missing one
    run(SpecBenchConfig(out=str(results_path(out, "spec", slug)), preset=plan.preset, **plan.spec))


def concurrency(plan: Plan, out: Path, slug: str) -> None:
    """bench/concurrency.py at the fixture's C_peak from the knee section (it profiles itself when
    that section left none)."""
    from fastgrpo.bench.concurrency import ConcurrencyBenchConfig, run

    fixture_dirs(plan.preset)
    knee_file = results_path(out, "knee", slug)
    records = json.loads(knee_file.read_text())["records"] if knee_file.exists() else []
    # the knee of the forwards the speculative steps run: eager (only plain decode compiles so far)
    c_peak = next((r["c_peak"] for r in records if r["model"] == "fixture" and not r.get("compiled")), 0.0)
    run(ConcurrencyBenchConfig(out=str(results_path(out, "concurrency", slug)), preset=plan.preset, c_peak=c_peak,
                               threads=plan.threads, **plan.concurrency))


SECTIONS = {  # what runs, by name; the plan's budgets say in which order
    "knee-fixture": lambda plan, out, slug: knee_profile(plan, out, slug, "fixture"),
    "knee-llama": lambda plan, out, slug: knee_profile(plan, out, slug, "llama"),
    "plain-fixture": lambda plan, out, slug: plain(plan, out, slug, "fixture"),
    "plain-llama": lambda plan, out, slug: plain(plan, out, slug, "llama"),
    "spec": spec,
    "concurrency": concurrency,
}
SUITE = {"knee-fixture": "knee", "knee-llama": "knee", "plain-fixture": "plain", "plain-llama": "plain",
         "spec": "spec", "concurrency": "concurrency"}  # section -> the results file it writes
