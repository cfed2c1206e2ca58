"""`fastgrpo-learner`: GRPO training against rollout replicas (`train`), or the self-contained `demo`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from fastgrpo.common.config import add_dataclass_args, from_args
from fastgrpo.learner.config import DemoConfig, LearnerConfig
from fastgrpo.learner.distributed import close_world, world_from_env
from fastgrpo.learner.metrics import exported
from fastgrpo.learner.run import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgrpo-learner", description="fastgrpo GRPO learner")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run GRPO against running rollout replicas")
    add_dataclass_args(train, LearnerConfig)
    demo = sub.add_parser("demo", help="build the fixture and its draft, start a speculative and a plain rollout "
                                       "service process, run GRPO, compare their rollout speed, stop")
    add_dataclass_args(demo, DemoConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "demo":
        from fastgrpo.learner.demo import run_demo

        return run_demo(from_args(DemoConfig, args))
    cfg = from_args(LearnerConfig, args)
    if not cfg.auth_token and os.environ.get("FASTGRPO_AUTH_TOKEN"):
        cfg = dataclasses.replace(cfg, auth_token=os.environ["FASTGRPO_AUTH_TOKEN"])
    if not cfg.model:
        parser.error("train: --model is required")
    if not world_from_env().is_main:  # under torchrun, rank 0 alone serves the HTTP side
        cfg = dataclasses.replace(cfg, http_port=-1)
    with exported(cfg.http_host, cfg.http_port) as metrics:
        run_training(cfg, metrics=metrics)
    close_world()
    return 0


if __name__ == "__main__":
    sys.exit(main())
