"""`fastgrpo-rollout`: the rollout service's command line."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

from fastgrpo.common.cli import add_dataclass_args, from_args
from fastgrpo.rollout.server import ServeConfig, build_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgrpo-rollout", description="fastgrpo rollout service (gRPC)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="load a model and serve RolloutService over gRPC")
    add_dataclass_args(serve, ServeConfig)
    serve.add_argument("--log-level", default="INFO", help="logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = from_args(ServeConfig, args)
    if not cfg.auth_token and os.environ.get("FASTGRPO_AUTH_TOKEN"):
        cfg = dataclasses.replace(cfg, auth_token=os.environ["FASTGRPO_AUTH_TOKEN"])
    app = build_app(cfg)
    # one machine-readable line, so scripts that pass --port 0 learn the port
    print(f"fastgrpo-rollout: serving on {cfg.host}:{app.port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
