"""`fastgrpo-bench e2e`: real GRPO steps end to end, per speculation mode -- the figure the paper's
headline (2.35-2.72x per GRPO step, on GPUs) is about.

Four rollout services in this process host the same fixture policy:
  * off:        plain decoding;
  * adaptive:   the fixture's draft head, adaptive trees, online draft learning off;
  * online:     the same, with online draft learning;
  * all:        online, and drafts from the sibling samples' text and the prompt's history.
One GRPO learner (rewards, group advantages, the clipped surrogate, dense-delta pushes) drives all
four over gRPC: every step, each service generates the step's rollouts (the same prompts and
sampling seed), timed one after the other in an order that rotates from step to step; the learner
trains on off's and pushes the update to all four. So every mode generates from the same policy at
every step. Four learners, one per mode, had drifted apart within a few steps (each trained on its
own samples, which are exact draws of the policy but not the same draws once trees change which
noise a token uses): their completions' lengths, and with them the generate times being compared,
differed by up to 2x at the same step (bench fixture, 2 x 8), and their reward curves could not be
compared either. Now each mode's reward is that of its own rollouts of the same policy: lossless
modes agree in distribution.

Before each mode generates, the bench waits until no service computes anything: the online modes
train their drafts between requests, and in one process such a round ran beside the next mode's
generate (with the online modes present, the adaptive mode's plain-only steps took 8 % longer than
off's; without them the two were level). Separate services on separate devices do not contend so;
each step's draft-training seconds are reported per mode (draft_train_s) instead, beside the
learner's training, which they overlap on a real node.

The learner trains on a small prompt set (--train-size), so prompts come back every epoch and
history exists from the second on. A mode's step time is its own generate and scoring plus the
shared training and one service's share of the push.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

from fastgrpo.common.config import help_field

MODES = ("off", "adaptive", "online", "all")
PHASES = ("generate", "score", "train", "push")


@dataclass(frozen=True)
class E2EBenchConfig:
    out: str = help_field("benchmarks/results/e2e-cpu.json", "JSON output path (a PNG is written beside it)")
    preset: str = help_field("default", "fixture preset of the policy")
    quick: bool = help_field(False, "4 steps of 8 prompts x 8 over 8 problems: about a minute once fixtures are cached")
    steps: int = help_field(12, "GRPO steps per mode")
    prompts_per_step: int = help_field(16, "Q prompts per step")
    group_size: int = help_field(8, "G completions per prompt")
    train_size: int = help_field(32, "problems trained on (the prompt set every epoch goes over)")
    max_new_tokens: int = help_field(64, "tokens per completion at most")
    lr: float = help_field(3e-4, "learner AdamW learning rate")
    c_peak: float = help_field(0.0, "adaptive C_peak of every service; 0 = measure it now with the profiler")
    draft_time_fraction: float = help_field(0.05, "the online modes' --draft-time-fraction: their draft-training rounds' share of the serving time (0 = unbounded: train whenever the service is idle)")
    seed: int = help_field(0, "seed of the learner (prompt order, rollouts)")
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
    apps, clients = {}, {}
    records = []
    learner = None
    try:
        for mode in MODES:
            apps[mode] = build_app(ServeConfig(
                model=str(fixture), port=0, draft="" if mode == "off" else str(draft),
                engine=EngineConfig(max_running=Q * cfg.group_size),
                spec=SpecConfig("adaptive", sources=_sources(mode)), controller=ControllerConfig(c_peak=c_peak),
                draft_learning=DraftLearningConfig(enabled=mode in ("online", "all"),
                                                   time_fraction=cfg.draft_time_fraction)))
            clients[mode] = RolloutClient(f"127.0.0.1:{apps[mode].port}")
        addresses = [f"127.0.0.1:{apps[m].port}" for m in MODES]
        learner = GRPOLearner(LearnerConfig(
            rollout=",".join(addresses), model=str(fixture), steps=steps, prompts_per_step=Q,
            group_size=cfg.group_size, train_size=P, lr=cfg.lr, max_new_tokens=cfg.max_new_tokens, eval_size=0,
            seed=cfg.seed), RolloutClient(addresses))
        rollouts = _Rollouts(learner, clients, apps)
        for step in range(1, steps + 1):
            st = learner.step()  # (its _generate is rollouts': every mode generates, off's batch is trained on)
            for mode in MODES:
                r = rollouts.last[mode]
                rec = {"mode": mode, "step": st.step, "epoch": 1 + (step - 1) * Q // P, "generate_s": r["generate_s"],
                       "score_s": r["score_s"], "train_s": st.train_s, "push_s": st.push_s / len(MODES),
                       "rollout_tokens": r["tokens"], "rollout_tokens_per_s": r["tokens"] / r["generate_s"],
                       "acceptance_length": r["acceptance_length"], "accepted": r["accepted"],
                       "reward_mean": r["reward_mean"], "accuracy": r["accuracy"], "policy_version": st.new_version,
                       "order": r["order"], "draft_train_s": r["draft_train_s"]}
                records.append(rec)
                print(f"step {step:3d} {mode:9s} generate {rec['generate_s']:6.2f}s score {rec['score_s']:5.2f}s train "
                      f"{rec['train_s']:5.2f}s push {rec['push_s']:5.2f}s  {rec['rollout_tokens_per_s']:6.0f} tok/s  "
                      f"acceptance {rec['acceptance_length']:.2f}  reward {rec['reward_mean']:.3f}", flush=True)
    finally:
        if learner is not None and learner.client is not None:
            learner.client.close()
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
                         **placement(learner.model), trained_on="off",
                         config={**cfg.__dict__, "steps": steps, "prompts_per_step": Q, "train_size": P})
    plot(path.with_suffix(".png"), f"GRPO {Q} x {cfg.group_size}: rollout seconds per step ({path.stem})", "GRPO step",
         "generate seconds", {m: ([r["step"] for r in records if r["mode"] == m],
                                  [r["generate_s"] for r in records if r["mode"] == m]) for m in MODES},
         logx=False, hline=None)
    print(f"wrote {path}")
    return {"path": str(path), "records": records, "summary": summary}


class _Rollouts:
    """Stands in for the learner's _generate: each mode's service generates the step's rollouts in
    turn (the order rotating by one mode a step, so that none always goes first after a push), each
    timed, scored and counted apart; the learner gets off's batch to train on."""

    def __init__(self, learner, clients: dict, apps: dict):
        self.learner, self.clients, self.apps = learner, clients, apps
        self.last: dict[str, dict] = {}
        self.trained = {m: self._draft_seconds(m) for m in apps}
        self.before = {m: _accepted(c) for m, c in clients.items()}
        self.problems = []
        self.turn = 0
        take = learner._next_problems

        def next_problems(n: int):  # (the step's problems, to score every mode's rollouts against)
            self.problems = take(n)
            return self.problems

        learner._next_problems = next_problems
        learner._generate = self.generate

    def generate(self, prompts: list[list[int]], G: int, sampling):
        learner = self.learner
        learner._ensure_served()  # (what the learner's own _generate does first)
        order = MODES[self.turn % len(MODES):] + MODES[:self.turn % len(MODES)]
        self.turn += 1
        batches = {}
        for mode in order:
            self._quiet()
            t0 = time.perf_counter()
            batch = self.clients[mode].generate_batch(prompts, G, sampling, timeout=learner.cfg.timeout)
            generate_s = time.perf_counter() - t0
            if any(c.policy_version != learner.pusher.version for c in batch.flat()):
                raise RuntimeError(f"{mode}: rollouts from another policy version than the learner's")
            t1 = time.perf_counter()
            done = batch.flat()
            rewards, correct = learner.score(done, [p for p in self.problems for _ in range(G)])
            score_s = time.perf_counter() - t1
            now = _accepted(self.clients[mode])
            self.last[mode] = {"generate_s": generate_s, "score_s": score_s, "tokens": sum(len(c.token_ids) for c in done),
                               "acceptance_length": batch.spec().acceptance_length,
                               "accepted": {k: now[k] - self.before[mode][k] for k in now},
                               "reward_mean": float(rewards.mean()) if done else 0.0,
                               "accuracy": sum(correct) / max(len(done), 1),
                               "order": order.index(mode)}
            self.before[mode] = now
            batches[mode] = batch
        for mode in MODES:  # (the rounds the previous step's requests scheduled: trained by now)
            seconds = self._draft_seconds(mode)
            self.last[mode]["draft_train_s"], self.trained[mode] = seconds - self.trained[mode], seconds
        return batches["off"]

    def _draft_seconds(self, mode: str) -> float:
        learner = self.apps[mode].servicer.draft_learner
        return learner.seconds if learner is not None else 0.0

    def _quiet(self, timeout: float = 600.0) -> None:
        """Waits until no service has a request or background work (a draft-training round) left,
        then until each engine has finished the piece it may be in (an op runs between pieces)."""
        engines = [a.engine for a in self.apps.values()]
        deadline = time.monotonic() + timeout
        def busy(e) -> bool:
            snap = e.snapshot()
            return snap["running"] > 0 or snap["queued"] > 0 or any(w.has_work() for w in e.background)

        while any(busy(e) for e in engines):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the services were still busy after {timeout:.0f} s")
            time.sleep(0.005)
        for e in engines:
            e.run_exclusive(lambda: None, timeout=timeout)


def _accepted(client) -> dict[str, int]:
    spec = client.status().speculation
    return {"head": spec.accepted_head, "siblings": spec.accepted_siblings, "history": spec.accepted_history}


def _summary(records: list[dict]) -> dict[str, dict]:
    """Per mode: seconds per step by phase (means), the draft's training seconds per step (the
    online modes), rollout tokens/s (total tokens / total generate seconds), acceptance, accepted
    tokens by source, mean reward; and the ratios of off's rollout and step seconds to the mode's."""
    out = {}
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        s = {f"{p}_s": statistics.mean(r[f"{p}_s"] for r in rs) for p in PHASES}
        s["step_s"] = sum(s[f"{p}_s"] for p in PHASES)
        s["draft_train_s"] = statistics.mean(r["draft_train_s"] for r in rs)  # (beside the step, not in it)
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
