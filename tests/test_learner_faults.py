"""The learner and the rollout service, each killed mid-run: no step is lost and nothing diverges.

  * The learner, killed (SIGKILL) after its first checkpoint and restarted with --resume, ends its
    third step with exactly the weights of a run that was never interrupted (same seed).
  * The rollout service, killed and started again on its port between two steps, comes back with
    its start-up weights; the learner notices, pushes its own in full and carries on: three steps,
    and the served weights are the learner's.
Both run without a draft: speculative sampling is exact in distribution, not bit for bit across
drafts, and this is a bit-for-bit comparison.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.client import RolloutClient
from fastgrpo.client.local import ServiceProcess
from fastgrpo.learner.config import LearnerConfig
from fastgrpo.learner.loop import GRPOLearner
from fastgrpo.learner.push import served_names_state
from fastgrpo.wire.tensors import state_checksum, unique_state
from probes import in_background

pytestmark = pytest.mark.system

STEP_FLAGS = ["--steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "24",
              "--eval-size", "0", "--micro-batch", "16", "--lr", "2e-4", "--seed", "3", "--save-every", "1"]


def _learner(address: str, model_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastgrpo.learner.cli", "train", "--rollout", address, "--model", str(model_dir),
           "--output-dir", str(out), *STEP_FLAGS, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"step-{step}" / "model" / "model.safetensors"))


def test_a_killed_learner_resumes_to_the_weights_of_an_uninterrupted_run(fixture_dir, tmp_path):
    with ServiceProcess(fixture_dir, "--max-running", "16", threads=1) as service:
        _finish(_learner(service.address, fixture_dir, tmp_path / "straight"))
    with ServiceProcess(fixture_dir, "--max-running", "16", threads=1) as service:
        out = tmp_path / "killed"
        first = _learner(service.address, fixture_dir, out)
        deadline = time.monotonic() + 300
        while not ((out / "latest").exists() and (out / "latest").read_text().strip() == "step-1"):
            assert first.poll() is None and time.monotonic() < deadline, "the learner ended before its first checkpoint"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # somewhere in step 2: its work is lost, the checkpoint stays
        first.wait(timeout=30)
        resumed = _finish(_learner(service.address, fixture_dir, out, "--resume"))
        assert "step   2" in resumed and "step   3" in resumed and "step   1" not in resumed
        with RolloutClient(service.address) as client:
            served = client.status().policy_checksum
    straight, killed = _weights(tmp_path / "straight", 3), _weights(out, 3)
    assert straight.keys() == killed.keys()
    moved = [n for n in straight if not torch.equal(straight[n], killed[n])]
    assert not moved, f"{len(moved)} tensors differ from the uninterrupted run, e.g. {moved[:3]}"
    assert served == state_checksum(unique_state(killed))  # and the service serves them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_learner_rides_out_a_restart_of_the_rollout_service(fixture_dir, caplog):
    port = _free_port()
    args = ("--max-running", "16")
    service = ServiceProcess(fixture_dir, *args, port=port, threads=1)
    cfg = LearnerConfig(rollout=f"127.0.0.1:{port}", model=str(fixture_dir), steps=3, prompts_per_step=4,
                        group_size=4, max_new_tokens=24, eval_size=0, micro_batch=16, lr=2e-4, timeout=120)
    learner = GRPOLearner(cfg)
    restarted = []
    try:
        stats = [learner.step()]
        service.proc.send_signal(signal.SIGKILL)  # gone between step 1 and step 2, its weights with it
        service.proc.wait(timeout=30)
        with caplog.at_level(logging.WARNING, logger="fastgrpo.learner"):
            step, outcome = in_background(learner.step)
            step.join(timeout=1.0)
            assert step.is_alive(), f"step 2 did not wait for the service: {outcome}"
            restarted.append(ServiceProcess(fixture_dir, *args, port=port, threads=1))
            step.join(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        stats.append(outcome["value"])
        assert any("pushing the learner's weights in full" in r.message for r in caplog.records)
        stats.append(learner.step())
        assert [s.step for s in stats] == [1, 2, 3]
        assert all(s.dropped_stale == 0 for s in stats)  # every step trained on rollouts of its own weights
        with RolloutClient(f"127.0.0.1:{port}") as client:
            served = client.status()
        assert (served.policy_checksum, served.policy_version) == (learner.pusher.mirror.checksum,
                                                                    learner.pusher.mirror.version)
        assert served.policy_checksum == state_checksum(served_names_state(learner.model, lora=False))
    finally:
        learner.client.close()
        for s in [service, *restarted]:
            s.stop()
