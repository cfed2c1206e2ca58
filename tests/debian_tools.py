"""Debian packages the tests run (Prometheus, promtool, docker-compose), installed when missing.

CI runs `make test` in a fresh clone, possibly on a fresh machine: a test that needs a tool installs
it with apt-get, and fails with the reason when it cannot, rather than skipping.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


@contextlib.contextmanager
def _no_daemon_starts():
    """Debian's documented switch (exit 101) that keeps package scripts from starting the packaged
    daemon, e.g. a system Prometheus on :9090; the tests start their own on a free port."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# written by fastgrpo's tests while they install packages\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink()


def ensure_commands(package: str, *commands: str) -> None:
    """Installs the Debian `package` unless every one of `commands` is on PATH already."""
    if all(shutil.which(c) for c in commands):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(f"{' and '.join(commands)} missing and cannot be installed here: "
                    f"run `apt-get install --no-install-recommends {package}` as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=300"]
    with _no_daemon_starts():
        steps = [apt + ["update"], apt + ["install", "-y", "--no-install-recommends", package]]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        pytest.fail(f"installed {package}, but {missing} are still not on PATH")
