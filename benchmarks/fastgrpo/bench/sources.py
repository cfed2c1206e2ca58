"""`fastgrpo-bench sources`: where drafts come from -- the draft head alone, the sibling samples' text
alone, the prompt's earlier completions alone, all three in one tree -- on GRPO-shaped batches,
against plain decoding.

Every mode gets its own engine over the same model and draft (adaptive trees from one C_peak), and
all run the same epochs in lockstep (bench/lockstep.py): epoch 1 has no history yet, epoch 2 asks
for the same prompts again (as a second GRPO epoch does), so history-using modes draft from epoch
1's completions. Each Q (prompts, x G samples) is a run of its own, so the batch starts at
B = Q x G: adaptive trees are large at small B and speculation stops where C_peak / B < 2. GRPO
batches decay as completions end, so each mode's steps are also binned by their batch size
(powers of two): tokens/s and acceptance length per bin, and the speedup over off per bin.

Before the measured epochs each engine runs alone over other prompts, `warm_rounds` times a new
set of Q prompts twice (the first time without history, the second with): a rollout service
serves many GRPO steps, so its step chooser has long learned what each way is worth at each batch
size, with history and without, when a given step's prompts come. A run of
Q x G here lasts 0.2-2 s, and a cold chooser's first tries of every way in every bin (a head step
costs 3-5 plain ones on this CPU) would be a one-time cost that these short runs magnify.

Each round samples anew (round r, epoch e: seed + 1000 r + e), and a mode's figure pools its rounds
(their tokens over their seconds). Speculation is lossless in distribution, not draw for draw: the
modes draw different completions from one seed, and a run's time hangs on its longest completion,
so rounds that repeated one seed would repeat each mode's luck (one long straggler at B = 1 cost a
mode a fifth of its tokens/s in every round) instead of averaging it out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastgrpo.common.config import help_field

# mode -> --spec-sources (None: speculation off); siblings and history draft from text alone
MODES = {"off": None, "head": "head", "siblings": "siblings", "history": "history", "all": "head,siblings,history"}


@dataclass(frozen=True)
class SourcesBenchConfig:
    out: str = help_field("benchmarks/results/sources-cpu.json", "JSON output path (a PNG is written beside it)")
    preset: str = help_field("default", "fixture preset of the target (default: the task fixture the tests use)")
    quick: bool = help_field(False, "Q = 1 and 4, one round: about a minute")
    prompts: str = help_field("1,2,4,16", "Q prompts per epoch (x G samples), each a run of its own: the batch starts at B = Q x G")
    group_size: int = help_field(8, "G samples per prompt")
    epochs: int = help_field(2, "epochs over the same prompts (history exists from the second on)")
    temperature: float = help_field(1.0, "sampling temperature")
    max_new_tokens: int = help_field(96, "tokens per sequence at most")
    c_peak: float = help_field(0.0, "adaptive C_peak; 0 = measure it now with the profiler")
    repeats: int = help_field(len(MODES), "rounds (fresh engines each: history starts empty; new samples each); figures pool the rounds (quick: 1); the engine stepping first rotates, so a multiple of the five modes gives each the first turn equally often")
    warm_rounds: int = help_field(2, "warm-up rounds each engine runs alone before the measured epochs, each two epochs over Q x G other prompts (without history, then with): a rollout service serves many GRPO steps, and by then its step chooser (--spec-choose) knows what each way is worth at each batch size, with history and without; 0 = a cold chooser, whose first tries of every way in every bin fall on the measured steps")
    seed: int = help_field(0, "sampling seed (round r, epoch e use seed + 1000 r + e: every epoch and round samples anew)")
    threads: int = help_field(0, "torch CPU threads; 0 = one per core")


class StepBins:
    """An engine observer: decode tokens, seconds, verify steps and emitted tokens by batch-size bin."""

    wants_pairs = False

    def __init__(self):
        self.bins: dict[int, list[float]] = {}  # bin -> [tokens, seconds, verify steps, emitted by verify]

    def step_done(self, report) -> None:
        if not report.batch_size:
            return
        b = 1 << (report.batch_size.bit_length() - 1)  # the power of two at or below B
        row = self.bins.setdefault(b, [0.0, 0.0, 0.0, 0.0])
        row[0] += report.decode_tokens
        row[1] += report.seconds
        row[2] += len(report.accept_lengths)
        row[3] += sum(report.accept_lengths)

    def sequence_done(self, result, seconds, pairs) -> None:
        pass

    def request_done(self, request) -> None:
        pass

    def take(self) -> dict[int, list[float]]:
        bins, self.bins = self.bins, {}
        return bins


def run(cfg: SourcesBenchConfig) -> dict:
    from transformers import AutoTokenizer

    from fastgrpo.bench.common import load_target, placement, plot, write_results
    from fastgrpo.fixture import build_fixture
    from fastgrpo.fixture.draft import build_draft
    from fastgrpo.learner.tasks import format_prompt, synthetic_math
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.speculative.calibration import DEFAULT_SWEEP, profile
    from fastgrpo.rollout.speculative.draft_head import DraftHead
    from fastgrpo.rollout.speculative.knee import knee

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    fixture = build_fixture(cfg.preset)
    model = load_target(fixture)
    tok = AutoTokenizer.from_pretrained(str(fixture))
    head = DraftHead.load(build_draft(fixture), model)
    c_peak, source = cfg.c_peak, "configured"
    if c_peak <= 0:
        runner = ModelRunner(model, headroom=max(DEFAULT_SWEEP))
        c_peak, source = knee(profile(runner, DEFAULT_SWEEP, budget_s=60)), "profile"
        del runner
        print(f"profiled C_peak {c_peak:.1f}", flush=True)
    G = cfg.group_size
    task = synthetic_math(seed=0)
    problems, warm = task.test, task.train  # (the warm-up's prompts are none of the measured ones)
    eos = (tok.eos_token_id,)
    records = []
    extra = {**placement(model), "c_peak": c_peak, "c_peak_source": source, "group_size": G,
             "warm_rounds": cfg.warm_rounds,
             "sampling": {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens},
             "target": {"preset": cfg.preset, "parameters": sum(p.numel() for p in model.parameters())}}
    for Q in ([1, 4] if cfg.quick else [int(q) for q in cfg.prompts.split(",")]):
        prompts = [tuple(tok(format_prompt(p.question))["input_ids"]) for p in problems[200: 200 + Q]]
        prompts_warm = [[tuple(tok(format_prompt(p.question))["input_ids"]) for p in warm[k * Q: (k + 1) * Q]]
                        for k in range(max(1, cfg.warm_rounds))]
        records += _measure(cfg, Q, G, prompts, prompts_warm, eos, model, head, c_peak)
        path = write_results(cfg.out, "sources", records, **extra)
    last = [r for r in records if r["epoch"] == cfg.epochs and r["mode"] != "off"]
    plot(path.with_suffix(".png"), f"draft sources, GRPO Q x {G}, epoch {cfg.epochs} ({extra['device']})",
         "batch size at the start, B = Q x G", "tokens/s relative to off",
         {m: ([r["batch_size"] for r in last if r["mode"] == m], [r["speedup_vs_off"] for r in last if r["mode"] == m])
          for m in MODES if m != "off"})
    print(f"wrote {path}")
    return {"path": str(path), "records": records}


def _measure(cfg: SourcesBenchConfig, Q: int, G: int, prompts, prompts_warm, eos, model, head, c_peak) -> list[dict]:
    """Every mode over cfg.epochs epochs of Q prompts x G samples, in lockstep, cfg.repeats rounds."""
    from fastgrpo.bench.lockstep import lockstep_generation
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
    from fastgrpo.rollout.scheduler.requests import GenerationRequest
    from fastgrpo.rollout.speculative.controller import ControllerConfig, SpecConfig, SpecController
    from fastgrpo.rollout.speculative.draft_runner import Drafter
    from fastgrpo.wire.records import Sampling

    slots = Q * G

    def engines() -> tuple[dict[str, Engine], dict[str, StepBins]]:
        out, bins = {}, {}
        for mode, sources in MODES.items():
            spec = SpecConfig(mode="adaptive" if sources else "off", sources=sources or "head")
            controller = SpecController.of(spec, ControllerConfig(c_peak=c_peak))
            bins[mode] = StepBins()
            out[mode] = Engine(ModelRunner(model, headroom=controller.max_nodes()), eos,
                               EngineConfig(max_running=slots), Drafter(head) if spec.head else None, controller,
                               [bins[mode]], spec.text_drafts() if sources else None)
        return out, bins

    def requests(epoch: int, which=prompts, r: int = 0):
        sampling = Sampling(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed + 1000 * r + epoch)
        return lambda mode: [GenerationRequest(f"epoch{epoch}", which, G, sampling)]

    rounds = []  # per round: {(epoch, mode): {...}}
    for r in range(1 if cfg.quick else cfg.repeats):
        engs, bins = engines()
        try:
            for mode, engine in engs.items():  # warm up each alone (first touches; the chooser) on prompts of its own
                for k in range(cfg.warm_rounds):
                    for epoch in (1, 2):
                        for req in requests(100 + 2 * k + epoch, prompts_warm[k])(mode):
                            list(engine.submit(req))
                if not cfg.warm_rounds:
                    list(engine.submit(GenerationRequest("warm-up", prompts_warm[0][:1], 2, Sampling(max_new_tokens=16))))
                bins[mode].take()
            got, before = {}, {m: dict(e.accepted_by_source) for m, e in engs.items()}
            for epoch in range(1, cfg.epochs + 1):
                results = lockstep_generation(engs, requests(epoch, r=r), first=r)
                for mode in MODES:
                    now = dict(engs[mode].accepted_by_source)
                    got[(epoch, mode)] = {**results[mode], "bins": bins[mode].take(),
                                          "by_source": {k: now[k] - before[mode][k] for k in now}}
                    before[mode] = now
        finally:
            for e in engs.values():
                e.shutdown()
        rounds.append(got)
        print(f"round {r + 1}: " + "  ".join(f"e{e} {m} {got[(e, m)]['tokens'] / got[(e, m)]['seconds']:.0f} tok/s"
                                             for e in range(1, cfg.epochs + 1) for m in MODES), flush=True)

    records = []
    for epoch in range(1, cfg.epochs + 1):
        for mode in MODES:
            runs = [g[(epoch, mode)] for g in rounds]
            offs = [g[(epoch, "off")] for g in rounds]
            verify_steps = sum(x["verify_steps"] for x in runs)
            rate = pooled_rate(runs)
            rec = {"prompts": Q, "batch_size": Q * G, "epoch": epoch, "mode": mode, "sources": MODES[mode],
                   "rounds": len(runs), "tokens": sum(x["tokens"] for x in runs),
                   "seconds": sum(x["seconds"] for x in runs),
                   "tokens_per_s": rate,
                   "speedup_vs_off": rate / pooled_rate(offs),
                   "round_speedups": [pooled_rate([x]) / pooled_rate([o]) for x, o in zip(runs, offs)],
                   "acceptance_length": sum(x["acceptance_length"] * x["verify_steps"] for x in runs) / verify_steps
                   if verify_steps else 0.0,
                   "accepted_by_source": {k: sum(x["by_source"][k] for x in runs) for k in ("head", "siblings", "history")},
                   "verify_steps": verify_steps,
                   "by_batch_size": _bins(rounds, epoch, mode)}
            records.append(rec)
            acc = rec["accepted_by_source"]
            print(f"B={Q * G:4d} epoch {epoch} {mode:10s} {rec['tokens_per_s']:7.0f} tok/s  x{rec['speedup_vs_off']:.2f} vs off  "
                  f"acceptance {rec['acceptance_length']:.2f}  accepted head/siblings/history "
                  f"{acc['head']:.0f}/{acc['siblings']:.0f}/{acc['history']:.0f}", flush=True)
    return records


def pooled_rate(runs: list[dict]) -> float:
    """Tokens per second over runs together (their tokens over their seconds)."""
    return sum(x["tokens"] for x in runs) / sum(x["seconds"] for x in runs)


def _bins(rounds, epoch, mode) -> list[dict]:
    """Per batch-size bin over the rounds: tokens/s (summed tokens / summed seconds), acceptance
    length, and the ratio of tokens/s to off's in the same bin."""
    def summed(m):
        total: dict[int, list[float]] = {}
        for g in rounds:
            for b, row in g[(epoch, m)]["bins"].items():
                acc = total.setdefault(b, [0.0] * 4)
                for i, v in enumerate(row):
                    acc[i] += v
        return total

    mine, off = summed(mode), summed("off")
    out = []
    for b in sorted(mine):
        tokens, seconds, steps, emitted = mine[b]
        rate = tokens / seconds if seconds else 0.0
        base = off.get(b)
        base_rate = base[0] / base[1] if base and base[1] else 0.0
        out.append({"batch_size": b, "tokens_per_s": rate, "acceptance_length": emitted / steps if steps else 0.0,
                    "speedup_vs_off": rate / base_rate if base_rate else None, "steps_seconds": seconds})
    return out
