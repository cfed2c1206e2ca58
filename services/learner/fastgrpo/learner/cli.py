"""`fastgrpo-learner`: GRPO training against rollout replicas (`train`), or the self-contained `demo`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from fastgrpo.common.config import add_dataclass_args, from_args
from fastgrpo.learner.config import LearnerConfig
from fastgrpo.learner.metrics import exported
from fastgrpo.learner.run import run_training


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
