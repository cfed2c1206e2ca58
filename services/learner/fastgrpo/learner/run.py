"""A whole training run as the command line runs it: evaluate, train with a progress bar, evaluate."""
from __future__ import annotations

import io
import os
import sys
from typing import Callable

from tqdm import tqdm

from fastgrpo.learner.config import LearnerConfig
from fastgrpo.learner.metrics import LearnerMetrics


def format_step(s) -> str:
    return (
        f"step {s.step:3d} | v{s.policy_version}->v{s.new_version} | reward {s.reward_mean:.3f} ± {s.reward_std:.3f} "
        f"| acc {s.accuracy:.3f} | loss {s.loss:+.4f} | kl {s.kl:.4f} | clip {s.clip_fraction:.3f} "
        f"| gen {s.generate_s:.2f}s score {s.score_s:.2f}s train {s.train_s:.2f}s push {s.push_s:.2f}s "
        f"| {s.tokens_per_s:.0f} tok/s"
    )


def run_training(cfg: LearnerConfig, out=sys.stdout, metrics: LearnerMetrics | None = None, learner=None,
                 describe: Callable[..., str] = format_step, progress: bool = True) -> dict:
    """Evaluates, trains cfg.steps steps, evaluates again; returns a summary. Each step is recorded
    in `metrics` (see `fastgrpo.learner.metrics.exported`) and printed as `describe(stats)` says,
    under a progress bar on stderr unless `progress` is off. `learner`: a GRPOLearner built for
    cfg (default: a new one)."""
    import torch

    from fastgrpo.learner.checkpoint import save_checkpoint
    from fastgrpo.learner.loop import GRPOLearner

    metrics = metrics or LearnerMetrics()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    learner = learner or GRPOLearner(cfg)
    if learner.client is not None:  # (under torchrun, rank 0 alone talks to the replicas)
        metrics.track_replicas(learner.client.replica_states)
    metrics.ready.set()
    main = learner.world.is_main  # under torchrun every rank trains; rank 0 alone evaluates and prints
    if not main:
        out, progress = io.StringIO(), False
    start_acc = learner.evaluate() if cfg.eval_size and main else float("nan")
    print(f"test accuracy at start (greedy, {cfg.eval_size} problems): {start_acc:.3f}", file=out, flush=True)
    history = []
    bar = tqdm(range(learner.step_index, cfg.steps), desc="GRPO", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not progress)
    for _ in bar:
        stats = learner.step()
        history.append(stats)
        metrics.record(stats)
        bar.set_postfix(reward=f"{stats.reward_mean:.3f}", acc=f"{stats.accuracy:.3f}", v=stats.new_version)
        tqdm.write(describe(stats), file=out)
        if cfg.output_dir and cfg.save_every and stats.step % cfg.save_every == 0:
            save_checkpoint(learner, cfg.output_dir)
    bar.close()
    if cfg.output_dir:
        path = save_checkpoint(learner, cfg.output_dir)
        print(f"checkpoint: {path}", file=out)
    end_acc = learner.evaluate() if cfg.eval_size and main else float("nan")
    print(f"test accuracy at end (greedy, {cfg.eval_size} problems): {end_acc:.3f}", file=out, flush=True)
    if learner.client is not None:
        learner.client.close()
    return {"start_accuracy": start_acc, "end_accuracy": end_acc, "steps": history}
