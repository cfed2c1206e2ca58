"""Smoke run of clients/examples/grpo_loop.py: a user's own trainer driving a real rollout service."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastgrpo.client import RolloutClient

pytestmark = pytest.mark.system

EXAMPLE = Path(__file__).resolve().parents[1] / "clients" / "examples" / "grpo_loop.py"


def test_grpo_loop_example_trains_the_served_policy(fixture_dir, service_process):
    service = service_process(fixture_dir)
    with RolloutClient(service.address) as client:
        before = client.status()
    cmd = [sys.executable, str(EXAMPLE), "--rollout", service.address, "--model", str(fixture_dir),
           "--steps", "2", "--prompts", "2", "--group", "4", "--max-new-tokens", "48"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["1", "2"]
    with RolloutClient(service.address) as client:
        after = client.status()
    assert after.policy_version == before.policy_version + 2
    assert after.policy_checksum != before.policy_checksum


def test_demo_shows_speculation_against_a_measured_plain_baseline(draft_dir):
    """`make demo`, shortened: the speculative service with the fixture's draft and every source, a
    plain baseline service on the same weights, per-step acceptance and tokens/s of both, a summary;
    step lines never share a line with a progress bar (no carriage returns on stdout)."""
    cmd = [sys.executable, "-m", "fastgrpo.learner.cli", "demo", "--steps", "2", "--prompts-per-step", "2",
           "--group-size", "4", "--train-size", "2", "--eval-size", "4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "\r" not in out
    assert "draft head: " in out and "adaptive trees (C_peak" in out and "sources head,siblings,history" in out
    steps = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in steps] == ["1/2", "2/2"], out
    for line in steps:
        assert " | accept " in line and "(head " in line and " | draft v" in line, line
        assert " tok/s, plain " in line and line.endswith("x)"), line
    assert "rollout over 2 steps: speculative " in out and "x the plain rollout's tokens/s" in out, out
    assert "with the draft head," in out and "test accuracy " in out
