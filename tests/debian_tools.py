"""Debian commands some system tests run (Prometheus, promtool, docker-compose). `make test` installs
them first (scripts/install-test-deps); a test that finds one missing fails and says how to get it."""
from __future__ import annotations

import shutil

import pytest


def require_commands(*commands: str) -> None:
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not on PATH: run scripts/install-test-deps (as root), as `make test` does")
