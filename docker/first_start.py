"""The containers' first start, while the fixture policy (and its draft) trains into the cache volume.

`first_start.py plan build|draft` prints what this start will train for `fastgrpo-fixture build` (the
policy) or `fastgrpo-fixture draft` (the policy and its draft head) and about how long it takes, as
one line, or nothing when the cache has it all (the entry points log that line).
`first_start.py serve PORT MESSAGE` stands in for the service's HTTP side meanwhile: /readyz answers
503 with MESSAGE in the body the service itself gives while it starts, /healthz 200, so that a probe
or a user with curl learns why the service is not up yet. The entry point stops it before the
service binds the port.
"""
from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PRESET = "default"  # the fixture preset the entry points build


def plan(fixture_command: str) -> str:
    """'first start: building ...' naming what is not cached yet with its estimate, or ''."""
    # imported here, not above: `serve` must answer at once, without importing torch first
    from fastgrpo.fixture.build import cache_root
    from fastgrpo.fixture.draft import training_ahead

    ahead = training_ahead(PRESET, draft=fixture_command == "draft")
    if not ahead:
        return ""
    return (f"first start: building {' and '.join(ahead)} into {cache_root()}; it trains on the CPU, "
            "once, and later starts reuse it")


def placeholder(message: str) -> type[BaseHTTPRequestHandler]:
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/readyz":
                # the shape of fastgrpo.common.http's /readyz body while a service starts
                self._reply(503, {"ready": False, "stage": message,
                                  "stage_seconds": round(time.monotonic() - started, 3), "stages_done": {}})
            elif self.path == "/healthz":
                self._reply(200, {"status": "ok"})
            else:
                self._reply(404, {"detail": "Not Found"})

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            pass  # a probe every few seconds would bury the build's own progress lines

    return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="first_start.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="print what the first start trains, or nothing").add_argument(
        "fixture_command", choices=["build", "draft"], help="the fastgrpo-fixture command the entry point runs")
    s = sub.add_parser("serve", help="answer /readyz with 503 and MESSAGE until stopped")
    s.add_argument("port", type=int)
    s.add_argument("message")
    args = p.parse_args(argv)
    if args.command == "plan":
        print(plan(args.fixture_command))
    else:
        ThreadingHTTPServer(("0.0.0.0", args.port), placeholder(args.message)).serve_forever()


if __name__ == "__main__":
    main()
