"""A rollout service on this machine, as its own OS process: `fastgrpo-rollout serve` started on
127.0.0.1 with the Python running this code (the demo, tests and notebooks use it). The service's
code must be installed in the same environment; nothing of it is imported here."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path


class ServiceProcess:
    """Starts the rollout service on 127.0.0.1 and waits for its 'serving on HOST:PORT' line
    (and, with http_port, its 'http on HOST:PORT' line: `http_address`)."""

    def __init__(self, model_dir: str | Path, *extra: str, port: int = 0, host: str = "127.0.0.1",
                 log_level: str = "WARNING", threads: int | None = None, http_port: int | None = None):
        cmd = [sys.executable, "-m", "fastgrpo.rollout", "serve", "--model", str(model_dir),
               "--host", host, "--port", str(port), "--log-level", log_level, *extra]
        if http_port is not None:
            cmd += ["--http-port", str(http_port)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        line = self.proc.stdout.readline()
        if "serving on" not in line:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"rollout service did not start: {line!r}\n{''.join(self.stderr_lines[-30:])}")
        self.address = line.strip().rsplit(" ", 1)[-1]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.http_address = self.proc.stdout.readline().strip().rsplit(" ", 1)[-1] if http_port is not None else None

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServiceProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
