"""`fastgrpo-learner`: GRPO training against rollout replicas (`train`), or the self-contained `demo`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from tqdm import tqdm

from fastgrpo.common.cli import add_dataclass_args, from_args
from fastgrpo.learner.config import LearnerConfig
from fastgrpo.learner.metrics import LearnerMetrics, exported


def format_step(s) -> str:
    return (
        f"step {s.step:3d} | v{s.policy_version}->v{s.new_version} | reward {s.reward_mean:.3f} ± {s.reward_std:.3f} "
        f"| acc {s.accuracy:.3f} | loss {s.loss:+.4f} | kl {s.kl:.4f} | clip {s.clip_fraction:.3f} "
        f"| gen {s.generate_s:.2f}s score {s.score_s:.2f}s train {s.train_s:.2f}s push {s.push_s:.2f}s "
        f"| {s.tokens_per_s:.0f} tok/s"
    )


def run_training(cfg: LearnerConfig, out=sys.stdout, metrics: LearnerMetrics | None = None) -> dict:
    """Evaluates, trains cfg.steps steps with a progress bar, evaluates again; returns a summary.
    Each step is recorded in `metrics` (see `fastgrpo.learner.metrics.exported`)."""
    import torch

    from fastgrpo.learner.checkpoint import save_checkpoint
    from fastgrpo.learner.loop import GRPOLearner

    metrics = metrics or LearnerMetrics()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    learner = GRPOLearner(cfg)
    metrics.ready.set()
    start_acc = learner.evaluate() if cfg.eval_size else float("nan")
    print(f"test accuracy at start (greedy, {cfg.eval_size} problems): {start_acc:.3f}", file=out, flush=True)
    history = []
    bar = tqdm(range(learner.step_index, cfg.steps), desc="GRPO", unit="step", file=sys.stderr, dynamic_ncols=True)
    for _ in bar:
        stats = learner.step()
        history.append(stats)
        metrics.record(stats)
        bar.set_postfix(reward=f"{stats.reward_mean:.3f}", acc=f"{stats.accuracy:.3f}", v=stats.new_version)
        tqdm.write(format_step(stats), file=out)
        if cfg.output_dir and cfg.save_every and stats.step % cfg.save_every == 0:
            save_checkpoint(learner, cfg.output_dir)
    bar.close()
    if cfg.output_dir:
        path = save_checkpoint(learner, cfg.output_dir)
        print(f"checkpoint: {path}", file=out)
    end_acc = learner.evaluate() if cfg.eval_size else float("nan")
    print(f"test accuracy at end (greedy, {cfg.eval_size} problems): {end_acc:.3f}", file=out, flush=True)
    learner.client.close()
    return {"start_accuracy": start_acc, "end_accuracy": end_acc, "steps": history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgrpo-learner", description="fastgrpo GRPO learner")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run GRPO against running rollout replicas")
    add_dataclass_args(train, LearnerConfig)
    demo = sub.add_parser("demo", help="build the fixture, start a rollout service process, run GRPO, stop")
    demo.add_argument("--steps", type=int, default=20, help="GRPO steps (default: 20)")
    demo.add_argument("--prompts-per-step", type=int, default=16, help="Q prompts per step (default: 16)")
    demo.add_argument("--group-size", type=int, default=8, help="G completions per prompt (default: 8)")
    demo.add_argument("--eval-size", type=int, default=200, help="test problems evaluated at start and end (default: 200)")
    demo.add_argument("--cache-dir", default=None, help="fixture cache (default: $FASTGRPO_CACHE or ~/.cache/fastgrpo)")
    demo.add_argument("--http-port", type=int, default=-1,
                      help="learner's HTTP side on 127.0.0.1 (/metrics, /healthz, /readyz); 0 picks a free port (default: -1 = off)")
    demo.add_argument("--rollout-http-port", type=int, default=-1,
                      help="rollout service's HTTP side on 127.0.0.1; 0 picks a free port (default: -1 = off)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "demo":
        from fastgrpo.learner.demo import run_demo

        return run_demo(args.steps, args.prompts_per_step, args.group_size, args.eval_size, args.cache_dir,
                        args.http_port, args.rollout_http_port)
    cfg = from_args(LearnerConfig, args)
    if not cfg.auth_token and os.environ.get("FASTGRPO_AUTH_TOKEN"):
        cfg = dataclasses.replace(cfg, auth_token=os.environ["FASTGRPO_AUTH_TOKEN"])
    if not cfg.model:
        parser.error("train: --model is required")
    with exported(cfg.http_host, cfg.http_port) as metrics:
        run_training(cfg, metrics=metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
