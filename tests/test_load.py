"""256 concurrent clients against a rollout service in its own process: admission stays bounded,
nothing is lost, every refusal is counted, memory stays bounded, health checks and GetStatus keep
answering. The figures go to benchmarks/results/load-cpu.json (when the service code under test is
this repository's; run against another worktree's code they go to the test's tmp_path).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

import fastgrpo.rollout
from fastgrpo.bench.common import vm_bytes, write_results
from fastgrpo.client import NO_RETRY, AsyncRolloutClient, RetryPolicy, RolloutError, Sampling
from probes import (CALL_TIMEOUT, FAST_S, PROMPT, RESPONSIVE_S, SERVING, ms, percentile, poll, readline,
                    refused_calls)

pytestmark = pytest.mark.system

CODE_ROOT = Path(fastgrpo.rollout.__file__).resolve().parents[4]  # the repository whose service is under test
REPO = Path(__file__).resolve().parents[1]

LOAD_CLIENTS = 256
LOAD_ROUND_S = 3.0  # waves of LOAD_CLIENTS concurrent Generates follow each other for this long (one round)
PROBE_EVERY_S = 0.05
RSS_BOUND = 2 * 1024**3
RSS_GROWTH_BOUND = 512 * 1024**2


async def _load_round(address: str, retry: RetryPolicy) -> dict:
    """Waves of LOAD_CLIENTS concurrent tasks, each its own short Generate (1 prompt x 1 sample, 16
    tokens), one wave after another for LOAD_ROUND_S, while a probe task times a health Check and a
    GetStatus every ~50 ms. Every call ends as a completion, a RESOURCE_EXHAUSTED, or is lost."""
    sampling = Sampling(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    completed: list[float] = []
    rejected: list[tuple[float, str]] = []
    lost: list[str] = []
    probe_s: dict[str, list[float]] = {"health": [], "status": []}
    probe_errors: list[str] = []
    async with AsyncRolloutClient(address, retry=retry, timeout=CALL_TIMEOUT) as client, \
            AsyncRolloutClient(address, retry=NO_RETRY, timeout=5) as probe:
        await probe.status()
        stop = asyncio.Event()

        async def prober():
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    reply = await probe.replicas[0].health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert reply.status == SERVING
                    probe_s["health"].append(time.perf_counter() - t)
                except grpc.RpcError as exc:
                    probe_errors.append(f"Health.Check: {exc.code().name}: {exc.details()}")
                t = time.perf_counter()
                try:
                    await probe.status(timeout=5)
                    probe_s["status"].append(time.perf_counter() - t)
                except RolloutError as exc:
                    probe_errors.append(str(exc))
                try:
                    await asyncio.wait_for(stop.wait(), PROBE_EVERY_S)
                except asyncio.TimeoutError:
                    pass

        async def one_call():
            t = time.perf_counter()
            try:
                got = await asyncio.wait_for(_collect(client.generate([PROMPT], 1, sampling)), CALL_TIMEOUT + 5)
            except RolloutError as exc:
                if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    rejected.append((time.perf_counter() - t, exc.details))
                else:
                    lost.append(str(exc))
                return
            except BaseException as exc:  # a hang (wait_for's timeout) or anything else: lost
                lost.append(repr(exc))
                return
            if len(got) == 1 and len(got[0].token_ids) == sampling.max_new_tokens:
                completed.append(time.perf_counter() - t)
            else:
                lost.append(f"wrong reply: {got}")

        probing = asyncio.create_task(prober())
        started = time.perf_counter()
        until, waves = time.monotonic() + LOAD_ROUND_S, 0
        while time.monotonic() < until:
            await asyncio.gather(*(one_call() for _ in range(LOAD_CLIENTS)))
            waves += 1
        wall = time.perf_counter() - started
        stop.set()
        await probing
    return {"wall_s": wall, "waves": waves, "completed": completed, "rejected": rejected, "lost": lost,
            "probe_s": probe_s, "probe_errors": probe_errors}


OUTSIDE_PROBER = r"""
import json, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from fastgrpo.v1 import rollout_pb2 as pb, rollout_pb2_grpc as pb_grpc

channel = grpc.insecure_channel(sys.argv[1])
health, rollout = health_pb2_grpc.HealthStub(channel), pb_grpc.RolloutServiceStub(channel)
rollout.GetStatus(pb.GetStatusRequest(), timeout=30)
out = {"health": [], "status": [], "errors": []}
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("probing", flush=True)
while not done.is_set():
    for what, call in (("health", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)),
                       ("status", lambda: rollout.GetStatus(pb.GetStatusRequest(), timeout=5))):
        t = time.perf_counter()
        try:
            call()
            out[what].append(time.perf_counter() - t)
        except grpc.RpcError as exc:
            out["errors"].append(f"{what}: {exc.code().name}: {exc.details()}")
    done.wait(float(sys.argv[2]))
print(json.dumps(out), flush=True)
"""


def _outside_prober(address: str) -> subprocess.Popen:
    """Health Check and GetStatus timed every ~50 ms from a process of its own (no load generator
    shares its interpreter) until its stdin is closed; started once it is probing."""
    p = subprocess.Popen([sys.executable, "-c", OUTSIDE_PROBER, address, str(PROBE_EVERY_S)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = readline(p.stdout, 60)
    if line.strip() != "probing":
        p.kill()
        pytest.fail(f"the outside prober did not start: {line!r} {p.communicate(timeout=10)[1][-1000:]}")
    return p


def _outside_figures(p: subprocess.Popen) -> dict:
    out, err = p.communicate("", timeout=60)
    assert p.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


async def _collect(stream) -> list:
    return [c async for c in stream]


@pytest.mark.timeout(180)
def test_load_256_clients_bounded_admission(tiny_dir, service_process, stubs, tmp_path):
    """256 concurrent clients against --max-running 4 on the CPU: every call completes or is refused
    (RESOURCE_EXHAUSTED, promptly, and counted by the server), memory stays bounded, and health checks
    and GetStatus keep answering (each under RESPONSIVE_S seen from a process of its own, twice that
    from the load generator's loop; their p50 / p99 are recorded beside the 100 ms goal in benchmarks/results/load-cpu.json). Two rounds: NO_RETRY, then the default RetryPolicy (which
    retries UNAVAILABLE only: a RESOURCE_EXHAUSTED must reach the caller, not be repeated)."""
    flags = ("--max-running", "4")
    svc = service_process(tiny_dir, *flags, http=True)
    s = stubs(svc.address)
    s.status()
    rss_start = vm_bytes(svc.proc.pid, "VmHWM")
    rounds, failures = [], []
    for name, retry in (("NO_RETRY", NO_RETRY), ("RetryPolicy()", RetryPolicy())):
        refused_before = refused_calls(svc.http_address)
        outside = _outside_prober(svc.address)
        try:
            r = asyncio.run(_load_round(svc.address, retry))
        finally:
            o = _outside_figures(outside)
        poll("the engine idle after the round",
              lambda: (lambda st: st.running_sequences == 0 and st.queued_sequences == 0)(s.status()))
        refused_after = refused_calls(svc.http_address)
        server_refused = None if refused_after is None else refused_after - refused_before
        reject_s = [t for t, _ in r["rejected"]]
        messages: dict[str, int] = {}
        for _, details in r["rejected"]:
            messages[details] = messages.get(details, 0) + 1
        fig = {
            "retry": name,
            "clients": LOAD_CLIENTS,
            "round_s": round(r["wall_s"], 2),
            "waves": r["waves"],
            "requests": len(r["completed"]) + len(r["rejected"]) + len(r["lost"]),
            "completed": len(r["completed"]),
            "rejected": len(r["rejected"]),
            "lost": len(r["lost"]),
            "rejected_by_message": messages,
            "server_refused_resource_exhausted": server_refused,
            "generate_p50_ms": ms(percentile(r["completed"], 50)),
            "generate_p99_ms": ms(percentile(r["completed"], 99)),
            "reject_p50_ms": ms(percentile(reject_s, 50)),
            "reject_p99_ms": ms(percentile(reject_s, 99)),
            "reject_max_ms": ms(max(reject_s, default=None)),
            "health_samples": len(r["probe_s"]["health"]),
            "health_p50_ms": ms(percentile(r["probe_s"]["health"], 50)),
            "health_p99_ms": ms(percentile(r["probe_s"]["health"], 99)),
            "status_samples": len(r["probe_s"]["status"]),
            "status_p50_ms": ms(percentile(r["probe_s"]["status"], 50)),
            "status_p99_ms": ms(percentile(r["probe_s"]["status"], 99)),
            "probe_errors": len(r["probe_errors"]),
            # the same probes from a process of its own (no event loop of 256 calls around them)
            "outside_health_samples": len(o["health"]),
            "outside_health_p50_ms": ms(percentile(o["health"], 50)),
            "outside_health_p99_ms": ms(percentile(o["health"], 99)),
            "outside_status_samples": len(o["status"]),
            "outside_status_p50_ms": ms(percentile(o["status"], 50)),
            "outside_status_p99_ms": ms(percentile(o["status"], 99)),
            "outside_probe_errors": len(o["errors"]),
        }
        rounds.append(fig)
        tag = f"round {name}:"
        if r["lost"]:
            failures.append(f"{tag} {len(r['lost'])} calls neither completed nor were refused, e.g. {r['lost'][:3]}")
        if not r["completed"]:
            failures.append(f"{tag} no call completed")
        if reject_s and max(reject_s) >= 2 * RESPONSIVE_S:  # (a queued call would wait for a whole Generate)
            failures.append(f"{tag} a RESOURCE_EXHAUSTED took {max(reject_s):.2f} s to come back")
        if server_refused is None:
            failures.append(f"{tag} /metrics has no fastgrpo_rollout_refused_calls_total; the clients got "
                            f"{len(r['rejected'])} RESOURCE_EXHAUSTED: {messages}")
        elif server_refused != len(r["rejected"]):
            failures.append(f"{tag} the server counted {server_refused:g} RESOURCE_EXHAUSTED refusals "
                            f"(fastgrpo_rollout_refused_calls_total), the clients got {len(r['rejected'])}: {messages}")
        if r["probe_errors"]:
            failures.append(f"{tag} {len(r['probe_errors'])} health / GetStatus probes failed, "
                            f"e.g. {sorted(set(r['probe_errors']))[:3]}")
        if o["errors"]:
            failures.append(f"{tag} {len(o['errors'])} health / GetStatus probes from the outside prober failed, "
                            f"e.g. {sorted(set(o['errors']))[:3]}")
        # latency is measured, not asserted (README: speed lives in figures): the p99s go to the
        # results file beside the 100 ms goal; what is asserted is that the probes keep answering
        # answering: the outside prober sees the service alone, and each of its probes must come back
        # within RESPONSIVE_S; the in-process prober also waits its turn on an event loop driving 256
        # calls (and their retries) on the same 2 cores, so its bound is twice that (CI once saw a
        # 1.3 s in-process probe while the outside prober's p99 was 58 ms)
        inside, outside = r["probe_s"]["health"] + r["probe_s"]["status"], o["health"] + o["status"]
        fig["max_probe_ms"], fig["outside_max_probe_ms"] = ms(max(inside, default=None)), ms(max(outside, default=None))
        fig["probe_goal_ms"] = FAST_S * 1e3
        fig["probe_goal_met"] = all(fig[f"{w}_p99_ms"] is not None and fig[f"{w}_p99_ms"] < FAST_S * 1e3
                                    for w in ("health", "status", "outside_health", "outside_status"))
        for where, probes, bound in (("from its own process", outside, RESPONSIVE_S),
                                     ("from the load generator's event loop", inside, 2 * RESPONSIVE_S)):
            if not probes or max(probes) >= bound:
                failures.append(f"{tag} a health / GetStatus probe {where} took {max(probes, default=0):.2f} s "
                                f"under load (bound {bound:g} s): the service stopped answering them promptly")
    peak = vm_bytes(svc.proc.pid, "VmHWM")

    first = rounds[0]
    out = (REPO if CODE_ROOT == REPO else tmp_path) / "benchmarks" / "results" / "load-cpu.json"
    write_results(
        out, "load", rounds,
        service={"model": "tiny random Qwen2 (vocab 97, 2 layers, hidden 64, context 256)", "device": "cpu",
                 "flags": list(flags), "omp_threads": 1},
        load={"clients": LOAD_CLIENTS, "round_s": LOAD_ROUND_S, "probe_every_s": PROBE_EVERY_S,
              "call": "1 prompt x 1 sample, 16 new tokens, greedy",
              "shape": f"waves of {LOAD_CLIENTS} concurrent calls, one after another, for round_s"},
        **{k: first[k] for k in ("requests", "completed", "rejected", "generate_p50_ms", "generate_p99_ms",
                                 "reject_p50_ms", "reject_p99_ms", "health_p50_ms", "health_p99_ms",
                                 "status_p50_ms", "status_p99_ms", "outside_health_p99_ms",
                                 "outside_status_p99_ms", "probe_goal_met")},
        peak_rss_mib=round(peak / 2**20, 1), rss_hwm_before_load_mib=round(rss_start / 2**20, 1),
        failures=failures,
    )
    print(f"\n{out}:\n{out.read_text()}")

    # the tiny model's weights are < 1 MiB and its KV cache (4 slots x 256 positions) smaller still:
    # the process is torch + transformers + gRPC (about 0.4 GiB at start). 2 GiB, or 512 MiB of
    # growth under load, would take per-call buffers that grow with the number of clients.
    if peak >= RSS_BOUND or peak - rss_start >= RSS_GROWTH_BOUND:
        failures.append(f"peak resident memory {peak / 2**20:.0f} MiB ({rss_start / 2**20:.0f} MiB before the load)")
    assert not failures, "\n".join(failures)
