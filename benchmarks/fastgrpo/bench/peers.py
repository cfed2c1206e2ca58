"""`fastgrpo-bench peers`: the rollout service against HF transformers on the same model, in one run.

Ours is measured through the gRPC client against a `fastgrpo-rollout serve` process on 127.0.0.1;
HF transformers runs in this process while that server idles; each with `threads` torch threads.
Repeats alternate between the two (and which goes first); the median run counts. Only useful tokens
count, for both: a completion up to and including its EOS (or up to its length budget).

Scenarios, each for every engine variant in ENGINE_VARIANTS:
  b1            one prompt at a time, T = 1: ours vs `model.generate`;
  grpo          Q prompts x G samples at once, T = 1, the fixture's own lengths (they end at EOS,
                within ~16-40 tokens): ours as one Generate vs `generate(num_return_sequences=G)`
                over left-padded prompts, which computes finished rows until the last one ends;
  grpo-tail     the same batch with each sample's length drawn log-uniformly from
                [tail_min_tokens, tail_max_tokens], EOS ignored, the same lengths for both: the long
                tail of reasoning rollouts, whose lengths spread over an order of magnitude (the
                fixture itself ends every answer within ~55 tokens up to T = 1.6). Ours: one
                Generate per sample, all at once; HF: one generate to the longest budget;
  b1-floor      b1's tokens/s against the memory-bandwidth floor: a decode step at B = 1 reads
                every weight once, so it cannot beat read bandwidth / weight bytes (read
                bandwidth: a sum streamed over a buffer on every thread; copy bandwidth, which
                moves each byte twice, is recorded beside it);
  spec-greedy, spec-sampled
                speculative decoding at B = 1 (a server with the fixture's draft and a static tree)
                vs HF assisted generation with the assistant preset's model (same tokenizer), T = 0
                and T = 1.
Peak resident memory (VmHWM) of every server process and of this process close the records.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastgrpo.bench.common import copy_bandwidth, read_bandwidth, vm_bytes
from fastgrpo.common.config import help_field

# Named flag sets of `fastgrpo-rollout serve`: every scenario runs once per variant (one line adds one).
ENGINE_VARIANTS: dict[str, tuple[str, ...]] = {
    "plain": (),  # as served by default: eager, MKL's or oneDNN's linears per row count as tuned (and remembered)
    "compiled": ("--compile", "on"),  # on the CPU: the batch buckets up to 4 (runtime.steps)
    "packed": ("--cpu-linears", "packed"),  # oneDNN's packed linears at every row count, nothing timed
}
# the variants whose speculative server is measured too
SPEC_VARIANTS = ("plain", "compiled", "packed")


@dataclass(frozen=True)
class Goal:
    at_least: float  # ours / reference the issue asks for
    text: str


# issue 17's goals, by scenario (ours against the reference of that scenario)
GOALS = {
    "b1": Goal(1.1, ">= 1.1x HF generate"),
    "grpo": Goal(1.5, ">= 1.5x HF generate"),
    "grpo-tail": Goal(3.0, ">= 3x HF generate"),
    "b1-floor": Goal(1 / 1.5, "within 1.5x of the floor (>= 0.67)"),
    "spec-greedy": Goal(2.0, ">= 2x HF assisted"),
    "spec-sampled": Goal(2.0, ">= 2x HF assisted"),
}


@dataclass(frozen=True)
class PeersBenchConfig:
    out: str = help_field("benchmarks/results/peers-cpu.json", "JSON output path (a .md table and a .png beside it)")
    quick: bool = help_field(False, "1 repeat, 1-2 prompts per scenario, tails of at most 128 tokens: about three minutes once the fixtures are cached")
    preset: str = help_field("bench", "fixture preset of the target")
    assistant_preset: str = help_field("default", "fixture preset of HF's assistant model (must share the target's tokenizer)")
    threads: int = help_field(2, "torch threads of this process (HF) and of each rollout server")
    temperature: float = help_field(1.0, "sampling temperature of b1, grpo, grpo-tail and spec-sampled")
    top_p: float = help_field(1.0, "nucleus mass, both sides (HF's default top_k = 50 is switched off, as the service's is)")
    max_new_tokens: int = help_field(96, "token budget per completion of b1, grpo and the spec scenarios")
    b1_prompts: int = help_field(8, "b1: prompts, one request at a time")
    prompts: int = help_field(8, "grpo, grpo-tail: prompts Q")
    group_size: int = help_field(8, "grpo, grpo-tail: samples G per prompt")
    tail_min_tokens: int = help_field(16, "grpo-tail: shortest completion")
    tail_max_tokens: int = help_field(256, "grpo-tail: longest completion")
    spec_prompts: int = help_field(4, "spec scenarios: prompts, one request at a time")
    spec_width: int = help_field(1, "our static tree width K (the spec bench's CPU default at B = 1)")
    spec_depth: int = help_field(7, "our static tree depth L")
    spec_n_verify: int = help_field(8, "our static tree N_verify")
    spec_verify: str = help_field("rrs", "our verification of sampled sequences: rrs or match")
    copy_mib: int = help_field(256, "buffer read (and copied) to measure memory bandwidth, MiB (at least 256)")
    repeats: int = help_field(3, "alternating runs of ours and HF per scenario; the median counts")
    max_other_cpu: float = help_field(0.1, "a pair of runs during which other processes took more of the CPUs than this share runs again")
    retries: int = help_field(2, "times a disturbed pair runs again at most (the least disturbed attempt counts)")
    seed: int = help_field(0, "sampling seed (run r uses seed + r)")


def effective(cfg: PeersBenchConfig) -> PeersBenchConfig:
    """The configuration a run uses: --quick shrinks every workload."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, b1_prompts=2, prompts=2, spec_prompts=1, repeats=1, retries=min(cfg.retries, 1),
                               tail_max_tokens=min(cfg.tail_max_tokens, 128))


def base_flags(cfg: PeersBenchConfig) -> tuple[str, ...]:
    """`serve` flags of every server: gRPC workers for grpo-tail's Q x G Generate calls at once
    (beyond workers - reserved_workers the service refuses long calls)."""
    return ("--workers", str(cfg.prompts * cfg.group_size + 8))


def spec_flags(cfg: PeersBenchConfig, draft: str | Path) -> tuple[str, ...]:
    """`serve` flags of the speculative servers: the draft, a static tree, and no online draft
    learning (the head stays the one measured)."""
    return ("--draft", str(draft), "--spec-mode", "static", "--spec-width", str(cfg.spec_width),
            "--spec-depth", str(cfg.spec_depth), "--spec-n-verify", str(cfg.spec_n_verify),
            "--spec-verify", cfg.spec_verify, "--no-draft-learning")


# ---------------------------------------------------------------- pure figures
def tail_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """n completion lengths drawn log-uniformly from [lo, hi] (the shape of the concurrency bench's grpo-tail)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)  # (n,)
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u).round().long().tolist()


def useful_lengths(new_tokens: torch.Tensor, eos: int) -> list[int]:
    """Tokens each row of HF's output (R, T) (new tokens only) carries up to and including its first
    EOS; T for a row without one (it ran to the budget). What comes after is padding."""
    R, T = new_tokens.shape
    is_eos = new_tokens == eos  # (R, T)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((R,), T))  # (R,)
    return first.tolist()


def length_stats(lengths: list[int]) -> dict:
    return {"n": len(lengths), "min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
            "mean": sum(lengths) / len(lengths)}


def floor_tokens_per_s(bytes_per_s: float, weight_bytes: int) -> float:
    """The B = 1 decode ceiling: every step reads every weight once."""
    return bytes_per_s / weight_bytes


def comparison(scenario: str, variant: str, system: str, tokens_per_s: float, reference: str,
               reference_tokens_per_s: float, **extra) -> dict:
    """A record: `system`'s tokens/s over the reference's, with the scenario's goal where ours is measured."""
    ratio = tokens_per_s / reference_tokens_per_s
    goal = GOALS.get(scenario) if system == "ours" else None
    return {"scenario": scenario, "variant": variant, "system": system, "tokens_per_s": tokens_per_s,
            "reference": reference, "reference_tokens_per_s": reference_tokens_per_s, "ratio": ratio,
            "goal": goal.text if goal else None, "met": (ratio >= goal.at_least) if goal else None, **extra}


def markdown(records: list[dict], notes: list[str]) -> str:
    """The comparison records as a table, the memory records as another, notes above them."""
    lines = [*notes, "", "| scenario | variant | system | tok/s | reference | ref tok/s | ratio | goal | met |",
             "|---|---|---|---:|---|---:|---:|---|---|"]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['scenario']} | {r['variant']} | — | — | — | — | — | {r['skipped']} | — |")
        if "ratio" not in r:
            continue
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['scenario']} | {r['variant']} | {r['system']} | {r['tokens_per_s']:.1f} | {r['reference']} | "
                     f"{r['reference_tokens_per_s']:.1f} | {r['ratio']:.2f}x | {r['goal'] or '—'} | {met} |")
    memory = [r for r in records if r["scenario"] == "memory"]
    if memory:
        lines += ["", "| process | peak resident (VmHWM) |", "|---|---:|"]
        lines += [f"| {r['process']} | {r['vm_hwm_bytes'] / 2**20:.0f} MiB |" for r in memory]
    return "\n".join(lines) + "\n"


def plot_ratios(path: Path, records: list[dict], title: str) -> Path:
    """Bars of ours / reference per scenario and variant, each scenario's goal as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in records if r.get("system") == "ours"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=110)
    for i, v in enumerate(variants):
        mine = [r for r in rows if r["variant"] == v]
        bars = ax.bar([scenarios.index(r["scenario"]) + i * width for r in mine], [r["ratio"] for r in mine], width, label=v)
        ax.bar_label(bars, [f"{r['ratio']:.2f}" for r in mine], fontsize=7)
    for j, s in enumerate(scenarios):
        if s in GOALS:
            ax.hlines(GOALS[s].at_least, j - width / 2, j + width * (len(variants) - 0.5), colors="black",
                      linestyles="--", linewidth=1)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(scenarios))], scenarios, fontsize=8)
    ax.set_yscale("log", base=2)  # ratios from below the floor to many times HF's
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylabel("ours / reference (tokens/s); dashed: goal")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- measurements
def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of the processes `pids`) since boot."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
    # /proc/<pid>/stat after the ")" that closes the name: utime and stime are the 12th and 13th fields
    mine = sum(sum(map(int, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])) for pid in pids)
    return busy / tick, mine / tick


def other_cpu_share(busy_s: float, mine_s: float, wall_s: float, cpus: int) -> float:
    """The share of the machine's CPU time that other processes took during a run."""
    return max(0.0, (busy_s - mine_s) / (wall_s * cpus))


def observed(fn: Callable[[int], dict], pids: list[int]) -> Callable[[int], dict]:
    """fn, its run also saying how much of the CPUs other processes used meanwhile: contention does
    not slow both sides alike (on the 2-core VM one busy process cut HF's B = 1 rate 2-4x, ours
    hardly), so a ratio from a contended run says little."""
    def go(r: int) -> dict:
        busy0, mine0 = cpu_seconds(pids)
        t0 = time.perf_counter()
        out = fn(r)
        wall = time.perf_counter() - t0
        busy1, mine1 = cpu_seconds(pids)
        return {**out, "other_cpu_share": other_cpu_share(busy1 - busy0, mine1 - mine0, wall, os.cpu_count() or 1)}
    return go


def paired(ours: Callable[[int], dict], peer: Callable[[int], dict], repeats: int, max_other: float = 1.0,
           retries: int = 0) -> tuple[list[dict], list[dict]]:
    """Alternating runs of both (run r gets r; the side that goes first alternates too). A pair
    during which other processes took more than `max_other` of the CPUs (the runs'
    "other_cpu_share") runs again, up to `retries` times; the least disturbed attempt counts."""
    a, b = [], []
    for r in range(repeats):
        best: tuple[float, dict, dict] | None = None
        for attempt in range(retries + 1):
            if r % 2 == 0:
                o = ours(r)
                p = peer(r)
            else:
                p = peer(r)
                o = ours(r)
            share = max(o.get("other_cpu_share", 0.0), p.get("other_cpu_share", 0.0))
            if best is None or share < best[0]:
                best = (share, {**o, "attempts": attempt + 1}, {**p, "attempts": attempt + 1})
            if share <= max_other:
                break
        a.append(best[1])
        b.append(best[2])
    return a, b


def _run(lengths: list[int], seconds: float, **extra) -> dict:
    return {"tokens": sum(lengths), "seconds": seconds, "lengths": lengths, **extra}


def ours_one_at_a_time(client, prompts: list[list[int]], sampling) -> dict:
    """Each prompt its own Generate, one after another (B = 1)."""
    from fastgrpo.client import SpecStats

    lengths, seconds, spec = [], 0.0, []
    for p in prompts:
        t0 = time.perf_counter()
        done = list(client.generate([p], 1, sampling))
        seconds += time.perf_counter() - t0
        lengths += [len(c.token_ids) for c in done]
        spec += [c.spec for c in done]
    return _run(lengths, seconds, acceptance_length=SpecStats.total(spec).acceptance_length)


def ours_group(client, prompts: list[list[int]], group: int, sampling) -> dict:
    """Q prompts x G samples as one Generate."""
    t0 = time.perf_counter()
    done = list(client.generate(prompts, group, sampling))
    return _run([len(c.token_ids) for c in done], time.perf_counter() - t0)


def ours_budgets(address: str, prompts: list[list[int]], group: int, budgets: list[int], sampling) -> dict:
    """Sample i of prompt q with its own length budget (EOS ignored): one Generate per sample, all at once."""
    from fastgrpo.client import AsyncRolloutClient

    async def go():
        async with AsyncRolloutClient(address) as client:
            await client.status()  # connected before the clock starts

            async def one(prompt, s):
                return [c async for c in client.generate([prompt], 1, s)]

            jobs = [(p, dataclasses.replace(sampling, max_new_tokens=budgets[q * group + i], ignore_eos=True,
                                            seed=sampling.seed + 1000 * q + i))
                    for q, p in enumerate(prompts) for i in range(group)]
            t0 = time.perf_counter()
            done = await asyncio.gather(*(one(p, s) for p, s in jobs))
            return time.perf_counter() - t0, [c for d in done for c in d]

    seconds, done = asyncio.run(go())
    return _run([len(c.token_ids) for c in done], seconds)


def hf_sampling(temperature: float, top_p: float) -> dict:
    """HF generate kwargs sampling as the service does (its top_k is off by default)."""
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


@torch.inference_mode()
def hf_one_at_a_time(model, prompts: list[list[int]], max_new_tokens: int, sampling: dict, seed: int,
                     assistant=None) -> dict:
    eos = model.generation_config.eos_token_id
    torch.manual_seed(seed)
    lengths, seconds = [], 0.0
    for p in prompts:
        ids = torch.tensor([p], device=model.device)  # (1, P)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, assistant_model=assistant, **sampling)  # (1, P + T)
        seconds += time.perf_counter() - t0
        lengths += useful_lengths(out[:, ids.shape[1]:].cpu(), eos)
    return _run(lengths, seconds)


@torch.inference_mode()
def hf_group(model, prompts: list[list[int]], group: int, max_new_tokens: int, sampling: dict, seed: int,
             budgets: list[int] | None = None) -> dict:
    """Q left-padded prompts x G samples (num_return_sequences: row q * G + i is sample i of prompt
    q). With `budgets`, row r counts budgets[r] tokens and EOS stops nothing: generate has no
    per-row budget, and a per-row stopping criterion would only mark rows done, which it keeps
    stepping until the longest one ends, exactly as here."""
    cfg = model.generation_config
    P = max(map(len, prompts))
    ids = torch.tensor([[cfg.pad_token_id] * (P - len(p)) + p for p in prompts], device=model.device)  # (Q, P)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=model.device)  # (Q, P)
    kwargs = {"max_new_tokens": max_new_tokens} if budgets is None else {"max_new_tokens": max(budgets), "eos_token_id": None}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, num_return_sequences=group, **kwargs, **sampling)  # (Q * G, P + T)
    seconds = time.perf_counter() - t0
    new = out[:, P:].cpu()  # (Q * G, T)
    if budgets is not None:
        assert new.shape[1] == max(budgets), f"HF stopped after {new.shape[1]} of {max(budgets)} tokens"
        return _run(list(budgets), seconds, steps=new.shape[1])
    return _run(useful_lengths(new, cfg.eos_token_id), seconds, steps=new.shape[1])


def check_assistant(target, assistant, target_tok, assistant_tok, preset: str) -> None:
    """HF assisted generation hands token ids from one model to the other: same vocabulary or nothing."""
    if target.config.vocab_size != assistant.config.vocab_size or target_tok.get_vocab() != assistant_tok.get_vocab():
        raise SystemExit(f"fastgrpo-bench peers: the assistant preset {preset!r} does not share the target's "
                         f"tokenizer (vocab {assistant.config.vocab_size} vs {target.config.vocab_size}): "
                         f"HF assisted generation needs the same token ids; pick another --assistant-preset")



def _tps(run: dict) -> float:
    return run["tokens"] / run["seconds"]


def _summary(run: dict) -> dict:
    """A run as the JSON keeps it: its figures and its length distribution, not every length."""
    return {**{k: v for k, v in run.items() if k != "lengths"}, "tokens_per_s": _tps(run), "lengths": length_stats(run["lengths"])}


def run(cfg: PeersBenchConfig) -> dict:
    import transformers
    from transformers import AutoTokenizer

    from fastgrpo.bench.common import commit, load_target, machine, median_run, placement, write_results
    from fastgrpo.bench.kv import _task_prompts
    from fastgrpo.client import RolloutClient, Sampling
    from fastgrpo.client.local import ServiceProcess
    from fastgrpo.fixture import build_fixture
    from fastgrpo.fixture.draft import build_draft, training_ahead

    cfg = effective(cfg)
    torch.set_num_threads(cfg.threads)
    transformers.logging.set_verbosity_error()  # generate()'s advice on flags it was given on purpose
    transformers.utils.logging.disable_progress_bar()
    ahead = training_ahead(cfg.preset, draft=True) + training_ahead(cfg.assistant_preset, draft=False)
    if ahead:
        print(f"fastgrpo-bench peers: first run: training {'; then '.join(ahead)} before measuring anything. "
              "Progress follows on stderr; later runs take them from the cache.", file=sys.stderr, flush=True)
    fixture = build_fixture(cfg.preset)
    draft = build_draft(fixture)
    assistant_dir = build_fixture(cfg.assistant_preset)
    model, assistant = load_target(fixture), load_target(assistant_dir)
    tok = AutoTokenizer.from_pretrained(str(fixture))
    check_assistant(model, assistant, tok, AutoTokenizer.from_pretrained(str(assistant_dir)), cfg.assistant_preset)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompts = _task_prompts(tok, max(cfg.b1_prompts, cfg.prompts, cfg.spec_prompts))
    grpo_prompts = prompts[: cfg.prompts]
    budgets = tail_lengths(cfg.prompts * cfg.group_size, cfg.tail_min_tokens, cfg.tail_max_tokens, cfg.seed)
    server_flags, spec = base_flags(cfg), spec_flags(cfg, draft)
    extra = {**placement(model), "config": dataclasses.asdict(cfg), "transformers": transformers.__version__,
             "target": {"preset": cfg.preset, "dir": str(fixture), "parameters": sum(p.numel() for p in model.parameters()),
                        "weight_bytes": weight_bytes},
             "assistant": {"preset": cfg.assistant_preset, "dir": str(assistant_dir),
                           "parameters": sum(p.numel() for p in assistant.parameters())},
             "draft": str(draft), "server_flags": list(server_flags), "spec_flags": list(spec),
             "variants": {k: list(v) for k, v in ENGINE_VARIANTS.items()}, "tail_budgets": length_stats(budgets)}
    records: list[dict] = []
    out = Path(cfg.out)
    sha, cpu = commit(), machine()["cpu"]

    def save() -> None:
        """JSON, table and plot after every record: a run cut short keeps what it measured."""
        write_results(out, "peers", records, **extra)
        notes = [f"# fastgrpo-bench peers ({extra['target']['parameters'] / 1e6:.0f}M target, {extra['device']} "
                 f"{extra['dtype']}, {cfg.threads} torch threads per process)", "",
                 f"commit {sha}, {cpu}, transformers {transformers.__version__}; "
                 f"{'quick, ' if cfg.quick else ''}{cfg.repeats} alternating repeat(s), median counts.",
                 f"grpo: {cfg.prompts} prompts x {cfg.group_size} samples, T {cfg.temperature}, top_p {cfg.top_p}, "
                 f"at most {cfg.max_new_tokens} tokens; grpo-tail: lengths log-uniform in "
                 f"[{cfg.tail_min_tokens}, {cfg.tail_max_tokens}] (min/median/max {min(budgets)}/"
                 f"{statistics.median(budgets)}/{max(budgets)}), EOS ignored; spec: tree K={cfg.spec_width} "
                 f"L={cfg.spec_depth} N_verify={cfg.spec_n_verify} ({cfg.spec_verify}) vs HF assisted by the "
                 f"{cfg.assistant_preset} fixture ({extra['assistant']['parameters'] / 1e6:.1f}M)."]
        if "bandwidth" in extra:
            notes.append(f"read bandwidth {extra['bandwidth']['bytes_per_s'] / 1e9:.2f} GB/s (copy "
                         f"{extra['copy_bandwidth']['bytes_per_s'] / 1e9:.2f} GB/s), target weights "
                         f"{weight_bytes / 1e6:.0f} MB: floor {extra['floor_tokens_per_s']:.1f} tok/s at B = 1.")
        shares = [r["other_cpu_share"] for r in records if "other_cpu_share" in r]
        if shares:
            notes.append(f"Other processes took up to {max(shares):.0%} of the CPUs during a timed run (~0 % on a quiet "
                         "machine; contention slows HF far more than ours, so ratios from a busy machine overstate ours).")
        out.with_suffix(".md").write_text(markdown(records, notes))
        if any(r.get("system") == "ours" for r in records):
            plot_ratios(out.with_suffix(".png"), records, f"rollout service vs HF transformers "
                        f"({extra['target']['parameters'] / 1e6:.0f}M target, {extra['device']})")

    def compare(scenario: str, variant: str, server, ours_fn, peer_fn, reference: str) -> tuple[dict, dict]:
        pids = [os.getpid(), server.proc.pid]
        ours_runs, peer_runs = paired(observed(ours_fn, pids), observed(peer_fn, pids), cfg.repeats, cfg.max_other_cpu,
                                      cfg.retries)
        o, p = median_run(ours_runs), median_run(peer_runs)
        rec = comparison(scenario, variant, "ours", _tps(o), reference, _tps(p),
                         lengths={"ours": length_stats(o["lengths"]), "reference": length_stats(p["lengths"])},
                         ours_runs=[_summary(r) for r in ours_runs], reference_runs=[_summary(r) for r in peer_runs],
                         other_cpu_share=max(r["other_cpu_share"] for r in ours_runs + peer_runs))
        if o.get("acceptance_length"):
            rec["acceptance_length"] = o["acceptance_length"]
        records.append(rec)
        print(f"{scenario:12s} {variant:8s} ours {rec['tokens_per_s']:7.1f} tok/s  {reference} "
              f"{rec['reference_tokens_per_s']:7.1f} tok/s  {rec['ratio']:.2f}x  (goal {rec['goal']}: "
              f"{'met' if rec['met'] else 'not met'}); lengths ours {rec['lengths']['ours']['min']}/"
              f"{rec['lengths']['ours']['median']}/{rec['lengths']['ours']['max']}, {reference} "
              f"{rec['lengths']['reference']['min']}/{rec['lengths']['reference']['median']}/"
              f"{rec['lengths']['reference']['max']}; other processes' CPU share up to {rec['other_cpu_share']:.0%}", flush=True)
        save()
        return o, p

    def server_memory(svc, what: str) -> None:
        records.append({"scenario": "memory", "process": what, "vm_hwm_bytes": vm_bytes(svc.proc.pid, "VmHWM")})
        save()

    def sampling(temperature: float, r: int, max_new_tokens: int | None = None):
        return Sampling(temperature=temperature, top_p=cfg.top_p, max_new_tokens=max_new_tokens or cfg.max_new_tokens,
                        seed=cfg.seed + r)

    hf_t = hf_sampling(cfg.temperature, cfg.top_p)
    b1: dict[str, tuple[dict, dict]] = {}
    for variant, flags in ENGINE_VARIANTS.items():
        with ServiceProcess(fixture, *server_flags, *flags, threads=cfg.threads) as svc, RolloutClient(svc.address) as client:
            client.wait_ready()
            ours_one_at_a_time(client, prompts[:1], sampling(cfg.temperature, 0, 16))  # warm-up
            hf_one_at_a_time(model, prompts[:1], 16, hf_t, cfg.seed)
            b1[variant] = compare(
                "b1", variant, svc, lambda r: ours_one_at_a_time(client, prompts[: cfg.b1_prompts], sampling(cfg.temperature, r)),
                lambda r: hf_one_at_a_time(model, prompts[: cfg.b1_prompts], cfg.max_new_tokens, hf_t, cfg.seed + r),
                "HF generate")
            compare("grpo", variant, svc, lambda r: ours_group(client, grpo_prompts, cfg.group_size, sampling(cfg.temperature, r)),
                    lambda r: hf_group(model, grpo_prompts, cfg.group_size, cfg.max_new_tokens, hf_t, cfg.seed + r),
                    "HF generate")
            compare("grpo-tail", variant, svc,
                    lambda r: ours_budgets(svc.address, grpo_prompts, cfg.group_size, budgets, sampling(cfg.temperature, r)),
                    lambda r: hf_group(model, grpo_prompts, cfg.group_size, 0, hf_t, cfg.seed + r, budgets),
                    "HF generate")
            server_memory(svc, f"rollout server ({variant})")
        if variant not in SPEC_VARIANTS:
            continue
        with ServiceProcess(fixture, *server_flags, *flags, *spec, threads=cfg.threads) as svc, \
                RolloutClient(svc.address) as client:
            client.wait_ready()
            for temperature in (0.0, cfg.temperature):  # warm-up (a compiled server: its sampled graphs)
                ours_one_at_a_time(client, prompts[:1], sampling(temperature, 0, 16))
            hf_one_at_a_time(model, prompts[:1], 16, hf_sampling(0.0, 1.0), cfg.seed, assistant)
            for scenario, temperature in (("spec-greedy", 0.0), ("spec-sampled", cfg.temperature)):
                hf_kw = hf_sampling(temperature, cfg.top_p)
                try:
                    hf_one_at_a_time(model, prompts[:1], 4, hf_kw, cfg.seed, assistant)
                except (ValueError, NotImplementedError) as exc:  # a transformers without sampled assisted generation
                    records.append({"scenario": scenario, "variant": variant, "skipped": f"HF assisted: {exc}"})
                    continue
                compare(scenario, variant, svc,
                        lambda r: ours_one_at_a_time(client, prompts[: cfg.spec_prompts], sampling(temperature, r)),
                        lambda r: hf_one_at_a_time(model, prompts[: cfg.spec_prompts], cfg.max_new_tokens, hf_kw,
                                                   cfg.seed + r, assistant),
                        "HF assisted")
            server_memory(svc, f"rollout server ({variant}, speculative)")
    # this process before the bandwidth buffers: HF's models, its generations and the client
    records.append({"scenario": "memory", "process": "bench process (HF transformers + client)", "vm_hwm_bytes": vm_bytes("self", "VmHWM")})
    extra["bandwidth"] = read_bandwidth(max(256, cfg.copy_mib) * 2**20, 10, model.device)
    extra["copy_bandwidth"] = copy_bandwidth(max(256, cfg.copy_mib) * 2**20, 10, model.device)
    extra["floor_tokens_per_s"] = floor = floor_tokens_per_s(extra["bandwidth"]["bytes_per_s"], weight_bytes)
    for variant, (o, p) in b1.items():
        for system, run_ in (("ours", o), ("HF generate", p)):
            rec = comparison("b1-floor", variant, system, _tps(run_), "bandwidth floor", floor)
            records.append(rec)
            print(f"b1-floor     {variant:8s} {system} {rec['tokens_per_s']:7.1f} tok/s  floor {floor:7.1f} tok/s  "
                  f"{rec['ratio']:.2f} of it", flush=True)
    save()
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}", flush=True)
    return {"path": str(out), "records": records}
