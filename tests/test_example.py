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
