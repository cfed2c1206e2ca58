"""Faults against real rollout services on 127.0.0.1: cancelled streams, clients killed mid-push,
idle push streams, long calls beyond the limit, SIGTERM with work in flight, a taken port,
half-given TLS flags, and a restart under a waiting client (load: test_load.py).

Every call carries a deadline and every wait a bound, so that a service which misbehaves makes a test
fail rather than hang. Ordering comes from events (a process's stdout line, GetStatus, a refused
probe, a channel's state), never from sleeping; the only timed waits are one-sided "still waiting"
checks and polls with a deadline.
"""
from __future__ import annotations

import itertools
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2

from fastgrpo.client import NO_RETRY, RetryPolicy, RolloutClient, Sampling
from fastgrpo.client.weights import update_stream
from fastgrpo.v1 import rollout_pb2 as pb
from probes import (CALL_TIMEOUT, LONG, PROMPT, RESPONSIVE_S, SERVING, Stubs, new_state, poll, readline,
                    request)

pytestmark = pytest.mark.system

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- 1. cancel

@pytest.mark.timeout(120)
def test_cancel_mid_stream_frees_slots_and_kv(tiny_dir, start_service, stubs):
    app = start_service(tiny_dir, max_running=2)
    s = stubs(f"127.0.0.1:{app.port}")
    call = s.rollout.Generate(request(8, LONG), timeout=CALL_TIMEOUT)
    first = next(call)
    assert len(first.token_ids) == LONG
    st = s.status()
    assert st.running_sequences + st.queued_sequences > 0, "nothing left to cancel: the stream ended already"
    call.cancel()
    poll("the engine back to 0 running / 0 queued after the cancel",
          lambda: (lambda st: st.running_sequences == 0 and st.queued_sequences == 0)(s.status()))

    # both slots are free again: a Generate of 4 long sequences runs 2 at once, and completes in full
    done = threading.Event()
    results: list = []

    def gather():
        try:
            results.extend(s.rollout.Generate(request(4, LONG), timeout=CALL_TIMEOUT))
        except grpc.RpcError as exc:
            results.append(exc)
        done.set()

    threading.Thread(target=gather, daemon=True).start()
    peak = 0
    while peak < 2 and not done.is_set():
        peak = max(peak, s.status().running_sequences)
        time.sleep(0.002)
    assert done.wait(CALL_TIMEOUT), "the Generate after the cancel did not complete"
    assert not any(isinstance(r, Exception) for r in results), results
    assert sorted(r.prompt_index for r in results) == [0, 1, 2, 3]
    assert all(len(r.token_ids) == LONG and r.finish_reason == pb.FINISH_REASON_LENGTH for r in results)
    assert peak == 2, f"at most {peak} of the 2 slots ran at once after the cancel: a slot leaked"


# ---------------------------------------------------------------------------------------------- 2. killed pusher

KILLED_PUSHER = r"""
import pickle, sys, time
import grpc

address, path = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    messages = pickle.load(f)  # UpdateWeights messages, serialized: the header, then the data chunks
half = 1 + (len(messages) - 1) // 2

def stream():
    yield from messages[:half]
    print(f"sent {half} of {len(messages)} messages", flush=True)
    time.sleep(600)  # the parent kills this process here
    yield from messages[half:]

push = grpc.insecure_channel(address).stream_unary("/fastgrpo.v1.RolloutService/UpdateWeights")
push(stream(), timeout=600)
print("the push ended", flush=True)
"""
KILLS = 3  # a push slot that frees only sometimes (a race) still fails the test


def _held(s: Stubs, pusher: subprocess.Popen) -> bool:
    """Whether the pusher's push holds the only push slot (a probe is refused); fails if it ended."""
    if pusher.poll() is not None:
        pytest.fail(f"the pusher ended by itself (exit {pusher.returncode}): {pusher.communicate(timeout=10)}")
    return s.push_probe() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.timeout(120)
def test_client_killed_mid_push_changes_nothing_and_frees_the_push_slot(tiny_dir, service_process, stubs, tmp_path):
    """A client killed (SIGKILL) half way through a full update, three times over: the served weights
    never change, and the one push slot (--max-pushes 1) is free again at once, so a valid push works."""
    svc = service_process(tiny_dir, "--max-pushes", "1", "--shutdown-grace-s", "2")
    s = stubs(svc.address)
    before = s.status()
    state = new_state(tiny_dir, seed=1)
    total = sum(t.numel() * t.element_size() for t in state.values())
    _, messages = update_stream(state, "full", before.policy_version, before.policy_version + 1,
                                chunk_size=total // 8 + 1)
    (tmp_path / "push.pickle").write_bytes(pickle.dumps([m.SerializeToString() for m in messages]))
    for kill in range(KILLS):
        pusher = subprocess.Popen([sys.executable, "-c", KILLED_PUSHER, svc.address, str(tmp_path / "push.pickle")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = readline(pusher.stdout, 60)
            assert line.startswith("sent "), f"the pusher did not get half way: {line!r} {pusher.poll()}"
            # the server holds the half-received push in its one slot (a probe is refused) ...
            poll("the half-sent push holding the only push slot", lambda: _held(s, pusher))
        finally:
            pusher.kill()  # SIGKILL: no goodbye from the client
            pusher.wait(10)
        # ... and lets go of it once the client is gone (not only after --push-idle-timeout-s, 60 s)
        poll(f"the push slot freed after the client was killed (kill {kill + 1} of {KILLS})",
              lambda: s.push_probe() == grpc.StatusCode.INVALID_ARGUMENT)
        after = s.status()
        assert (after.policy_version, after.policy_checksum) == (before.policy_version, before.policy_checksum)

    with RolloutClient(svc.address, retry=NO_RETRY, timeout=CALL_TIMEOUT) as client:
        (result,) = client.push_weights(new_state(tiny_dir, seed=2), "full")  # verifies the checksum it returns
    assert result.version == before.policy_version + 1
    final = s.status()
    assert final.policy_version == result.version and final.policy_checksum == result.checksum != before.policy_checksum


# ---------------------------------------------------------------------------------------------- 3. idle and long calls

def _idle_push(header: pb.WeightHeader, release: threading.Event):
    """An UpdateWeights stream that sends its header, then nothing until `release` is set."""
    yield pb.WeightChunk(header=header)
    release.wait(60)


@pytest.mark.timeout(120)
def test_idle_push_streams_time_out_without_blocking_the_service(tiny_dir, service_process, stubs):
    svc = service_process(tiny_dir, "--max-pushes", "2", "--push-idle-timeout-s", "2")
    s = stubs(svc.address)
    state = new_state(tiny_dir, seed=3)
    header = next(update_stream(state, "full", 0, 1)[1]).header
    release = threading.Event()

    def open_idle() -> tuple[grpc.Future, float]:
        return s.rollout.UpdateWeights.future(_idle_push(header, release), timeout=CALL_TIMEOUT), time.monotonic()

    def both_held() -> bool:
        for i, (f, _) in enumerate(idle):
            if f.done():  # refused while a probe held a slot for an instant: opened again
                assert f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"an idle stream ended: {f.exception()}"
                idle[i] = open_idle()
        return s.push_probe() == grpc.StatusCode.RESOURCE_EXHAUSTED

    try:
        idle = [open_idle(), open_idle()]
        # both push slots are held by the idle streams ...
        poll("the two idle streams holding both push slots", both_held, interval=0.05)
        # ... so a third push is refused at once
        t0 = time.monotonic()
        third = s.rollout.UpdateWeights.future(_idle_push(header, release), timeout=CALL_TIMEOUT)
        exc = third.exception(timeout=10)
        refused_after = time.monotonic() - t0
        assert exc is not None and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        assert refused_after < RESPONSIVE_S, f"the third push was refused after {refused_after:.3f} s, not at once"
        # health and GetStatus stay fast meanwhile
        probes = [s.timed_probes() for _ in range(10)]
        assert not any(f.done() for f, _ in idle), "an idle stream ended before the health checks were done"
        slowest = max(max(p) for p in probes)
        assert slowest < RESPONSIVE_S, f"health / GetStatus took {slowest * 1e3:.1f} ms while two pushes were idle"
        # the idle streams end with DEADLINE_EXCEEDED after --push-idle-timeout-s
        for f, opened in idle:
            exc = f.exception(timeout=15)
            ended_after = time.monotonic() - opened
            assert exc is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
            assert "--push-idle-timeout-s" in exc.details(), exc.details()
            assert 1.9 < ended_after < 10, f"an idle stream ended after {ended_after:.2f} s (timeout 2 s)"
    finally:
        release.set()
    with RolloutClient(svc.address, retry=NO_RETRY, timeout=CALL_TIMEOUT) as client:
        (result,) = client.push_weights(state, "full")
    assert result.version == 1 and s.status().policy_checksum == result.checksum


@pytest.mark.timeout(120)
def test_long_calls_beyond_the_limit_are_refused_and_health_stays_fast(tiny_dir, service_process, stubs):
    """--workers 8 (4 reserved): 40 long Generates at once; 4 run, 36 are refused with
    RESOURCE_EXHAUSTED; health checks and GetStatus, probed all along, answer every time within RESPONSIVE_S."""
    svc = service_process(tiny_dir, "--workers", "8", "--max-running", "1")
    s = stubs(svc.address)
    probe = stubs(svc.address)  # a channel of its own, as a load balancer's probe has
    s.status()
    samples: list[tuple[str, str, float, str]] = []  # (phase, what, seconds, "" or the error)
    stop = threading.Event()
    sampled = threading.Event()
    burst = threading.Event()

    def prober():
        while not stop.is_set():
            for what, call in (("health", lambda: probe.health.Check(health_pb2.HealthCheckRequest(), timeout=2)),
                               ("status", lambda: probe.rollout.GetStatus(pb.GetStatusRequest(), timeout=2))):
                t = time.perf_counter()
                try:
                    call()
                    error = ""
                except grpc.RpcError as exc:
                    error = f"{exc.code().name}: {exc.details()}"
                samples.append(("prober" if burst.is_set() else "before", what, time.perf_counter() - t, error))
            if len(samples) >= 10:
                sampled.set()
            stop.wait(0.01)

    prober_thread = threading.Thread(target=prober, daemon=True)
    prober_thread.start()
    calls = []
    try:
        assert sampled.wait(10)
        burst.set()
        # 16 sequences of 240 tokens each, one decoding at a time: none can finish for seconds; a
        # health check and a GetStatus go out beside each of them
        for _ in range(40):
            calls.append(s.rollout.Generate(request(16, LONG), timeout=CALL_TIMEOUT))
            for what, rpc, message in (("health", probe.health.Check, health_pb2.HealthCheckRequest()),
                                       ("status", probe.rollout.GetStatus, pb.GetStatusRequest())):
                t = time.perf_counter()
                rpc.future(message, timeout=2).add_done_callback(
                    lambda f, what=what, t=t: samples.append(("burst", what, time.perf_counter() - t, _error(f))))
        poll("36 of the 40 long calls refused", lambda: sum(c.done() for c in calls) >= 36, timeout=15)
        stop.wait(0.5)  # one-sided: the 4 admitted calls are still running half a second later
        running = [c for c in calls if not c.done()]
        refused = [c for c in calls if c.done()]
        codes = sorted({c.code().name for c in refused})
        assert len(running) == 4, f"{len(running)} long calls in flight, expected workers - reserved = 4"
        assert codes == ["RESOURCE_EXHAUSTED"], codes
        s.status()  # one more round of probes with the 4 still in flight
        n = len(samples)
        poll("more probes with the long calls in flight", lambda: len(samples) >= n + 10)
    finally:
        stop.set()
        prober_thread.join(10)
        for c in calls:
            c.cancel()
    assert sum(x[0] == "burst" for x in samples) == 80, "the probes beside the burst never came back"
    failed = [x for x in samples if x[3]]
    slow = [(phase, what, round(t * 1e3, 1)) for phase, what, t, error in samples if not error and t >= RESPONSIVE_S]
    by_phase = {phase: sum(x[0] == phase for x in failed) for phase in ("before", "burst", "prober")}
    assert not failed, (f"{len(failed)} of {len(samples)} health / GetStatus probes failed ({by_phase}: before the "
                        f"burst; beside each of the 40 Generates; the prober from the burst on), e.g. {failed[:3]}")
    assert not slow, f"{len(slow)} of {len(samples)} probes took >= {RESPONSIVE_S} s: {slow[:5]}"


def _error(f: grpc.Future) -> str:
    exc = f.exception()
    return f"{exc.code().name}: {exc.details()}" if exc is not None else ""


# ---------------------------------------------------------------------------------------------- 4. SIGTERM, port, TLS

@pytest.mark.timeout(120)
def test_sigterm_drains_the_call_in_flight_refuses_new_ones_and_exits_0(tiny_dir, service_process, stubs):
    svc = service_process(tiny_dir, "--max-running", "1", "--shutdown-grace-s", "20")
    s = stubs(svc.address)
    n = 12  # one decoding at a time: a few seconds of work
    received: list = []
    outcome: list = []
    done = threading.Event()

    def generate():
        try:
            for c in s.rollout.Generate(request(n, LONG), timeout=CALL_TIMEOUT):
                received.append(c)
        except grpc.RpcError as exc:
            outcome.append(exc)
        done.set()

    threading.Thread(target=generate, daemon=True).start()
    poll("the Generate's sequences in the engine",
          lambda: (lambda st: st.running_sequences + st.queued_sequences == n)(s.status()))
    in_flight = len(received)  # (normally 0: the first completion needs ~240 decode steps)
    svc.proc.send_signal(signal.SIGTERM)
    terminated = time.monotonic()
    assert in_flight < n, "the Generate finished before SIGTERM: nothing was in flight"

    seen: list[str] = []

    def refusing() -> bool:
        """Health answers NOT_SERVING for an instant (SERVING before the signal is handled), then new
        calls are refused (UNAVAILABLE). A call that arrives in the very instant the server stops may
        end CANCELLED instead: polled past."""
        try:
            seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(
                s.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status))
        except grpc.RpcError as exc:
            seen.append(exc.code().name)
        return seen[-1] == "UNAVAILABLE"

    try:
        poll("health checks refused after SIGTERM", refusing)
    except pytest.fail.Exception as exc:
        runs = [(code, len(list(group))) for code, group in itertools.groupby(seen)]
        pytest.fail(f"{exc}; the checks answered, in order (answer, times): {runs}")
    with pytest.raises(grpc.RpcError) as err:
        list(s.rollout.Generate(request(1, 8), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value

    assert done.wait(CALL_TIMEOUT), "the Generate in flight at SIGTERM never ended"
    assert not outcome, f"the Generate in flight at SIGTERM failed: {outcome[0]}"
    assert sorted(c.prompt_index for c in received) == list(range(n))
    assert all(len(c.token_ids) == LONG and c.finish_reason == pb.FINISH_REASON_LENGTH for c in received)
    rc = svc.proc.wait(25)
    exited_after = time.monotonic() - terminated
    assert rc == 0, f"exit code {rc}: {''.join(svc.stderr_lines[-20:])}"
    assert exited_after < 20, f"exited {exited_after:.1f} s after SIGTERM, past the 20 s grace"


def _serve_attempt(model_dir: Path, *flags: str) -> subprocess.Popen:
    log = tempfile.TemporaryFile("w+")
    p = subprocess.Popen([sys.executable, "-m", "fastgrpo.rollout", "serve", "--model", str(model_dir),
                          "--host", "127.0.0.1", "--log-level", "WARNING", *flags],
                         stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    p.log = log  # type: ignore[attr-defined]
    return p


def _serve_outcome(p: subprocess.Popen, timeout: float = 90) -> tuple[int | None, str]:
    """(exit code, stderr) of a `serve` expected to fail; (None, ...) when it started serving instead."""
    line = readline(p.stdout, timeout)
    started = "serving on" in line
    if started or p.poll() is None and not line:
        p.kill()
    rc = p.wait(timeout)
    p.log.seek(0)  # type: ignore[attr-defined]
    err = p.log.read()  # type: ignore[attr-defined]
    return (None if started else rc), err


def _error_line(stderr: str) -> str:
    return next((line for line in reversed(stderr.splitlines()) if "error" in line.lower()), stderr[-300:])


@pytest.mark.timeout(180)
def test_second_serve_on_a_taken_port_and_lone_tls_flags_exit_2(tiny_dir, start_service, stubs, tmp_path):
    app = start_service(tiny_dir)
    attempts = {  # all three at once: each spends its seconds importing
        "port": _serve_attempt(tiny_dir, "--port", str(app.port)),
        "cert": _serve_attempt(tiny_dir, "--port", "0", "--tls-cert", str(tmp_path / "cert.pem")),
        "key": _serve_attempt(tiny_dir, "--port", "0", "--tls-key", str(tmp_path / "key.pem")),
    }
    outcomes = {name: _serve_outcome(p) for name, p in attempts.items()}

    failures = []
    rc, err = outcomes["port"]
    if rc is None:
        failures.append("a second `serve` on the port of a running one started serving")
    elif not (rc == 2 and "in use" in _error_line(err)):
        failures.append(f"a second `serve` on a taken port: exit code {rc}, stderr ends {err[-600:]!r}")
    for given, other in (("cert", "--tls-key"), ("key", "--tls-cert")):
        rc, err = outcomes[given]
        if rc is None:
            failures.append(f"`serve --tls-{given}` alone started serving")
        elif not (rc == 2 and other in _error_line(err)):
            failures.append(f"`serve --tls-{given}` alone: exit code {rc} (expected 2 naming {other}), "
                            f"stderr ends {err[-600:]!r}")
    # the first service never noticed
    s = stubs(f"127.0.0.1:{app.port}")
    assert s.health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT).status == SERVING
    assert len(list(s.rollout.Generate(request(1, 8), timeout=CALL_TIMEOUT))) == 1
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------- 5. restart

@pytest.mark.timeout(120)
def test_wait_for_ready_call_rides_out_a_restart_on_the_same_port(tiny_dir, service_process):
    first = service_process(tiny_dir)
    client = RolloutClient(first.address, retry=RetryPolicy(wait_for_ready=True), timeout=60)
    channel = client.replicas[0].channel
    failing = threading.Event()

    def watch(state: grpc.ChannelConnectivity):
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            failing.set()

    try:
        client.status()
        first.proc.kill()
        first.proc.wait(10)
        channel.subscribe(watch, try_to_connect=False)
        result: list = []
        call = threading.Thread(target=lambda: result.append(_outcome(
            lambda: client.generate_batch([PROMPT], 2, Sampling(temperature=0.0, max_new_tokens=16, ignore_eos=True)))),
            daemon=True)
        call.start()
        assert failing.wait(15), "the channel never tried (and failed) to reach the killed service"
        call.join(0.3)  # one-sided: the call is still waiting, not failed
        assert call.is_alive() and not result, f"the call did not wait for the service: {result}"
        second = service_process(tiny_dir, port=first.port)
        call.join(60)
        assert not call.is_alive(), "the call did not complete after the restart"
        (batch,) = result
        assert not isinstance(batch, Exception), batch
        assert [[len(c.token_ids) for c in g] for g in batch.completions] == [[16, 16]]
        assert second.proc.poll() is None
    finally:
        channel.unsubscribe(watch)
        client.close()


def _outcome(fn: Callable[[], T]) -> T | Exception:
    try:
        return fn()
    except Exception as exc:
        return exc
