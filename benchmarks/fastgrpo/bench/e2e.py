"""`fastgrpo-bench e2e`: real GRPO steps end to end, per speculation mode -- the figure the paper's
headline (2.35-2.72x per GRPO step, on GPUs) is about.

Four rollout services in this process host the same fixture policy, each with its own GRPO learner
talking to it over gRPC (rewards, group advantages, the clipped surrogate, dense-delta pushes):
  * off:        plain decoding;
  * adaptive:   the fixture's draft head, adaptive trees, online draft learning off;
  * online:     the same, with online draft learning;
  * all:        online, and drafts from the sibling samples' text and the prompt's history.
The learners train on a small prompt set (--train-size), so prompts come back every epoch and
history exists from the second on. Every mode uses the same seeds; the modes take steps in turn
(step 1 of each, then step 2, ...), so a slow spell of a shared machine hits them alike. Sampling
is lossless in every mode, so rewards follow the same distribution; which sample a seed gives
depends on the draft tree, so curves agree in distribution, not token for token.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch

from fastgrpo.common.config import help_field

MODES = ("off", "adaptive", "online", "all")
PHASES = ("generate", "score", "train", "push")


@dataclass(frozen=True)
class E2EBenchConfig:
    out: str = help_field("benchmarks/results/e2e-cpu.json", "JSON output path (a PNG is written beside it)")
    preset: str = help_field("default", "fixture preset of the policy")
    quick: bool = help_field(False, "4 steps of 8 prompts x 8 over 8 problems: about 3-5 minutes")
    steps: int = help_field(12, "GRPO steps per mode")
    prompts_per_step: int = help_field(16, "Q prompts per step")
    group_size: int = help_field(8, "G completions per prompt")
    train_size: int = help_field(32, "problems trained on (the prompt set every epoch goes over)")
    max_new_tokens: int = help_field(64, "tokens per completion at most")
    lr: float = help_field(3e-4, "learner AdamW learning rate")
    c_peak: float = help_field(0.0, "adaptive C_peak of every service; 0 = measure it now with the profiler")
    seed: int = help_field(0, "seed of every learner (prompt order, rollouts)")
    threads: int = help_field(0, "torch CPU threads; 0 = one per core")


def _sources(mode: str) -> str:
    return "head,siblings,history" if mode == "all" else "head"


def run(cfg: E2EBenchConfig) -> dict:
    from fastgrpo.bench.common import load_target, placement, plot, write_results
    from fastgrpo.client import RolloutClient
    from fastgrpo.fixture import build_fixture
    from fastgrpo.fixture.draft import build_draft
    from fastgrpo.learner.config import LearnerConfig
    from fastgrpo.learner.loop import GRPOLearner
    from fastgrpo.rollout.draft_learning.online import DraftLearningConfig
    from fastgrpo.rollout.runtime.model_runner import ModelRunner
    from fastgrpo.rollout.scheduler.engine import EngineConfig
    from fastgrpo.rollout.service.app import build_app
    from fastgrpo.rollout.service.config import ServeConfig
    from fastgrpo.rollout.speculative.calibration import DEFAULT_SWEEP, profile
    from fastgrpo.rollout.speculative.controller import ControllerConfig, SpecConfig
    from fastgrpo.rollout.speculative.knee import knee

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    fixture = build_fixture(cfg.preset)
    draft = build_draft(fixture)
    steps, Q, P = (4, 8, 8) if cfg.quick else (cfg.steps, cfg.prompts_per_step, cfg.train_size)
    c_peak, source = cfg.c_peak, "configured"
    if c_peak <= 0:
        runner = ModelRunner(load_target(fixture), headroom=max(DEFAULT_SWEEP))
        c_peak, source = knee(profile(runner, DEFAULT_SWEEP, budget_s=60)), "profile"
        del runner
        print(f"profiled C_peak {c_peak:.1f}", flush=True)
    apps, learners, clients = {}, {}, {}
    records = []
    try:
        for mode in MODES:
            apps[mode] = build_app(ServeConfig(
                model=str(fixture), port=0, draft="" if mode == "off" else str(draft),
                engine=EngineConfig(max_running=Q * cfg.group_size),
                spec=SpecConfig("adaptive", sources=_sources(mode)), controller=ControllerConfig(c_peak=c_peak),
                draft_learning=DraftLearningConfig(enabled=mode in ("online", "all"))))
            clients[mode] = RolloutClient(f"127.0.0.1:{apps[mode].port}")
            learners[mode] = GRPOLearner(LearnerConfig(
                rollout=f"127.0.0.1:{apps[mode].port}", model=str(fixture), steps=steps, prompts_per_step=Q,
                group_size=cfg.group_size, train_size=P, lr=cfg.lr, max_new_tokens=cfg.max_new_tokens, eval_size=0,
                seed=cfg.seed), clients[mode])
        before = {m: _accepted(clients[m]) for m in MODES}
        for step in range(1, steps + 1):
            for mode in MODES:
                st = learners[mode].step()
                now = _accepted(clients[mode])
                rec = {"mode": mode, "step": st.step, "epoch": 1 + (step - 1) * Q // P,
                       **{f"{p}_s": getattr(st, f"{p}_s") for p in PHASES},
                       "rollout_tokens": st.completion_tokens, "rollout_tokens_per_s": st.tokens_per_s,
                       "acceptance_length": st.acceptance_length,
                       "accepted": {k: now[k] - before[mode][k] for k in now},
                       "reward_mean": st.reward_mean, "accuracy": st.accuracy, "policy_version": st.new_version}
                before[mode] = now
                records.append(rec)
                print(f"step {step:3d} {mode:9s} generate {st.generate_s:6.2f}s score {st.score_s:5.2f}s train "
                      f"{st.train_s:5.2f}s push {st.push_s:5.2f}s  {st.tokens_per_s:6.0f} tok/s  acceptance "
                      f"{st.acceptance_length:.2f}  reward {st.reward_mean:.3f}", flush=True)
    finally:
        for client in clients.values():
            client.close()
        for app in apps.values():
            app.stop(grace=0.5)
    summary = _summary(records)
    for mode, s in summary.items():
        print(f"{mode:9s} rollout {s['generate_s']:7.2f}s (x{s['rollout_speedup_vs_off']:.2f} vs off)  step "
              f"{s['step_s']:7.2f}s (x{s['step_speedup_vs_off']:.2f})  acceptance {s['acceptance_length']:.2f}  "
              f"reward {s['reward_mean']:.3f}", flush=True)
    path = write_results(cfg.out, "e2e", records, summary=summary, c_peak=c_peak, c_peak_source=source,
                         **placement(learners["off"].model),
                         config={**cfg.__dict__, "steps": steps, "prompts_per_step": Q, "train_size": P})
    plot(path.with_suffix(".png"), f"GRPO {Q} x {cfg.group_size}: rollout seconds per step ({path.stem})", "GRPO step",
         "generate seconds", {m: ([r["step"] for r in records if r["mode"] == m],
                                  [r["generate_s"] for r in records if r["mode"] == m]) for m in MODES},
         logx=False, hline=None)
    print(f"wrote {path}")
    return {"path": str(path), "records": records, "summary": summary}


def _accepted(client) -> dict[str, int]:
    spec = client.status().speculation
    return {"head": spec.accepted_head, "siblings": spec.accepted_siblings, "history": spec.accepted_history}


def _summary(records: list[dict]) -> dict[str, dict]:
    """Per mode: seconds per step by phase (means), rollout tokens/s (total tokens / total
    generate seconds), acceptance, accepted tokens by source, mean reward; and the ratios of
    off's rollout and step seconds to the mode's."""
    out = {}
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        s = {f"{p}_s": statistics.mean(r[f"{p}_s"] for r in rs) for p in PHASES}
        s["step_s"] = sum(s[f"{p}_s"] for p in PHASES)
        s["rollout_tokens_per_s"] = sum(r["rollout_tokens"] for r in rs) / sum(r["generate_s"] for r in rs)
        s["acceptance_length"] = statistics.mean(r["acceptance_length"] for r in rs)
        s["accepted"] = {k: sum(r["accepted"][k] for r in rs) for k in ("head", "siblings", "history")}
        s["reward_mean"] = statistics.mean(r["reward_mean"] for r in rs)
        s["accuracy"] = statistics.mean(r["accuracy"] for r in rs)
        out[mode] = s
    for s in out.values():
        s["rollout_speedup_vs_off"] = out["off"]["generate_s"] / s["generate_s"]
        s["step_speedup_vs_off"] = out["off"]["step_s"] / s["step_s"]
    return out
