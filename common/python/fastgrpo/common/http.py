"""The HTTP side of a service: /metrics for Prometheus, /healthz (the process is alive), /readyz (it
can do its work: model loaded, calibrated, in sync).

FastAPI on uvicorn in a background thread, on a port of its own: a scrape or a probe never waits
for a gRPC worker, and the probes answer while the model is still loading.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Startup:
    """What a starting service is doing, for /readyz's body: the stage it is in, and how long each
    finished stage took (a first start that profiles or compiles for minutes says so)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stage, self._since = "starting", time.monotonic()
        self._seconds: dict[str, float] = {}
        self._ready = False

    def begin(self, stage: str) -> None:
        with self._lock:
            self._close()
            self._stage, self._since = stage, time.monotonic()

    def ready(self) -> None:
        with self._lock:
            self._close()
            self._stage, self._ready = "serving", True

    def _close(self) -> None:
        if not self._ready:
            self._seconds[self._stage] = round(time.monotonic() - self._since, 3)

    def is_ready(self) -> bool:
        return self._ready

    def body(self) -> dict:
        with self._lock:
            running = {} if self._ready else {"stage_seconds": round(time.monotonic() - self._since, 3)}
            return {"stage": self._stage, **running, "stages_done": dict(self._seconds)}


def make_app(registry: CollectorRegistry, ready: Callable[[], bool], status: Callable[[], dict] | None = None) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ok = ready()
        return JSONResponse({"ready": ok, **(status() if status else {})}, status_code=200 if ok else 503)

    return app


class HttpSide:
    """A running HTTP side on host:port (port 0 picks a free one; `.port` is the bound one)."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool], host: str, port: int,
                 start_timeout: float = 10.0, status: Callable[[], dict] | None = None):
        """status: more of /readyz's body (Startup.body)."""
        # binding here, not in uvicorn, so that the caller learns a picked port before any request
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.host, self.port = host, sock.getsockname()[1]
        config = uvicorn.Config(make_app(registry, ready, status), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"http-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"the HTTP side did not start on {host}:{self.port}")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
