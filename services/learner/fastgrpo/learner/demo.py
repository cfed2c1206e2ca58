"""`make demo`: the whole loop on one machine with the embedded defaults.

Builds (or reuses) the fixture policy, starts the rollout service as its own process on 127.0.0.1,
runs GRPO through it, prints start and end test accuracy, and stops the service. The fixture builder
and the rollout service run as their own commands (`fastgrpo-fixture build`, `fastgrpo-rollout
serve`), so the learner imports neither: they must be installed beside it, as `make demo` does.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from fastgrpo.learner.config import LearnerConfig


def run_demo(steps: int, prompts_per_step: int, group_size: int, eval_size: int, cache_dir: str | None,
             http_port: int = -1, rollout_http_port: int = -1) -> int:
    """http_port, rollout_http_port: the HTTP sides of the learner and of the rollout service (-1 = off)."""
    from fastgrpo.client.local import ServiceProcess
    from fastgrpo.learner.run import run_training
    from fastgrpo.learner.metrics import exported

    t0 = time.perf_counter()
    model_dir = fixture_dir("default", cache_dir)
    print(f"fixture policy: {model_dir}", flush=True)
    # two cores: the service and the learner take turns (generation, then training), each may use both
    threads = max(1, os.cpu_count() or 1)
    with ServiceProcess(model_dir, "--max-running", str(prompts_per_step * group_size), threads=threads,
                        http_port=rollout_http_port if rollout_http_port >= 0 else None) as service:
        print(f"rollout service: pid {service.proc.pid} at {service.address}", flush=True)
        if service.http_address:
            print(f"rollout service: http on {service.http_address}", flush=True)
        cfg = LearnerConfig(
            rollout=service.address,
            model=str(model_dir),
            steps=steps,
            prompts_per_step=prompts_per_step,
            group_size=group_size,
            eval_size=eval_size,
            http_port=http_port,
        )
        with exported(cfg.http_host, cfg.http_port) as metrics:
            summary = run_training(cfg, metrics=metrics)
    start, end = summary["start_accuracy"], summary["end_accuracy"]
    verdict = "improved" if end > start else "did not improve"
    print(f"demo done in {time.perf_counter() - t0:.0f}s: test accuracy {start:.3f} -> {end:.3f} ({verdict})", flush=True)
    return 0


def fixture_dir(preset: str, cache_dir: str | None) -> str:
    """The fixture policy's directory from `fastgrpo-fixture build` (progress goes to stderr; the
    directory is its last line of output)."""
    cmd = [sys.executable, "-m", "fastgrpo.fixture.cli", "build", "--preset", preset]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(run_demo(20, 16, 8, 200, None))
