"""What the fault, load and replica tests share: stubs on a service's channel, polls with a deadline,
a call run in the background, and the readings they take (resident memory, the refused-calls
counter, percentiles)."""
from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file

from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc

T = TypeVar("T")
CALL_TIMEOUT = 30.0  # every gRPC call's deadline: a misbehaving service fails a test, never hangs it
FAST_S = 0.1  # the goal for health checks and GetStatus under load (measured and recorded, not asserted)
# what is asserted of them: they keep answering, each within this (a service that queues them behind
# long work misses it by far; a busy 2-core CI machine does not); speed lives in the figures
RESPONSIVE_S = 1.0
LONG = 240  # new tokens of a "long" sequence: the tiny model's context is 256, the prompt 3 tokens
PROMPT = [1, 2, 3]
SERVING = health_pb2.HealthCheckResponse.SERVING

# ---------------------------------------------------------------------------------------------- helpers

def request(prompts: int, max_new_tokens: int) -> pb.GenerateRequest:
    """`prompts` copies of one prompt, greedy, exactly max_new_tokens each (EOS ignored)."""
    return pb.GenerateRequest(
        prompts=[pb.Prompt(token_ids=pb.TokenIds(ids=PROMPT))] * prompts, num_samples=1,
        sampling=pb.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True),
    )


class Stubs:
    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.rollout = pb_grpc.RolloutServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self) -> pb.StatusReply:
        return self.rollout.GetStatus(pb.GetStatusRequest(), timeout=CALL_TIMEOUT)

    def timed_probes(self) -> tuple[float, float]:
        """(seconds of one health Check, seconds of one GetStatus); each must succeed."""
        t0 = time.perf_counter()
        assert self.health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status == SERVING
        t1 = time.perf_counter()
        self.status()
        return t1 - t0, time.perf_counter() - t1

    def push_probe(self) -> grpc.StatusCode:
        """An UpdateWeights stream without a single message: INVALID_ARGUMENT where a push slot is
        free (nothing is applied), RESOURCE_EXHAUSTED where every push slot is taken."""
        try:
            self.rollout.UpdateWeights(iter(()), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code()
        pytest.fail("an UpdateWeights stream without a header was accepted")


def poll(what: str, check: Callable[[], T], timeout: float = 10.0, interval: float = 0.005) -> T:
    """check()'s first truthy value; fails naming `what` when none came within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s (last: {value!r})")
        time.sleep(interval)


def new_state(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the served checkpoint, perturbed: a full update that changes the checksum."""
    g = torch.Generator().manual_seed(seed)
    return {name: t + 0.01 * torch.randn(t.shape, generator=g, dtype=t.dtype)
            for name, t in load_file(str(model_dir / "model.safetensors")).items()}


def refused_calls(http_address: str, code: str = "RESOURCE_EXHAUSTED") -> float | None:
    """fastgrpo_rollout_refused_calls_total with this code, summed over methods, from /metrics (None:
    the service exports no such counter)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{http_address}/metrics", timeout=CALL_TIMEOUT).read().decode()
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        if family.name == "fastgrpo_rollout_refused_calls":
            found = True
            total += sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels.get("code") == code)
    return total if found else None


def readline(stream, timeout: float) -> str:
    """The next line of a child's stdout ('' at its end), or '' after `timeout` seconds."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def in_background(fn: Callable[[], object]) -> tuple[threading.Thread, dict]:
    """Starts fn() in a thread; the dict gets its result as "value" or what it raised as "error"."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (the caller reports it)
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)
