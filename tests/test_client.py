"""Both faces of the rollout client against real rollout services on 127.0.0.1 (tiny random Qwen2, CPU).

Every test runs once per face (the `face` fixture): the blocking RolloutClient ("sync"), and the
asyncio AsyncRolloutClient ("async") driven through BlockingAsyncClient, an adapter that runs it on
an event loop in a background thread and gives it RolloutClient's blocking surface, so that one
test body checks both.

Covers: streamed and gathered Generate (indices, shapes, logprobs equal to a local forward, seeded
determinism), leaving a stream early, status, every kind of weight push verified against a
WeightMirror, a tampered mirror raising ChecksumMismatch, two replicas pushed alike, a replica that
fails a push set aside while another accepts it (alone, its failure is raised and the mirror stays),
error mapping, a deadline that expires while the engine is held (its sequences are dropped, not
decoded), gRPC's retry policy against injected UNAVAILABLE faults
(GetStatus and Generate retried, UpdateWeights never), wait_for_ready riding out a restart, bearer
auth, wait_ready. What only asyncio adds is in test_client_async.py.
"""
from __future__ import annotations

import asyncio
import collections
import math
import socket
import threading
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import engine_held
from fastgrpo.rollout.service.interceptors import handler_like

from fastgrpo.client import (
    NO_RETRY,
    AsyncRolloutClient,
    ChecksumMismatch,
    RetryPolicy,
    RolloutClient,
    RolloutError,
    Sampling,
    WeightMirror,
)

pytestmark = pytest.mark.service

PROMPTS = [[5, 17, 33], [8, 2], [40, 41, 42, 43]]
SAMPLING = Sampling(temperature=1.0, max_new_tokens=6, seed=1234, ignore_eos=True)
LORA_TARGETS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


# ------------------------------------------------------------------------------------------ helpers
def local_model(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log p(completion[i] | prompt + completion[:i]) from one plain forward, at the temperature."""
    ids = torch.tensor([prompt + completion])  # (1, P + C)
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # (C, V)
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)  # (C, V)
    return logp.gather(1, torch.tensor(completion)[:, None])[:, 0]  # (C,)


def perturbed(model, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """`model` with noise added to every parameter (in place; returned for chaining)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def lora_factors(model, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """'<W>.lora_A' (r, in) and '<W>.lora_B' (out, r) for each LoRA target W."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    out = {}
    for name in LORA_TARGETS:
        out_dim, in_dim = state[name].shape
        out[f"{name}.lora_A"] = torch.randn(rank, in_dim, generator=g) * 0.1
        out[f"{name}.lora_B"] = torch.randn(out_dim, rank, generator=g) * 0.1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def addr(app) -> str:
    return f"127.0.0.1:{app.port}"


def wait_idle(client, seconds: float = 10.0) -> None:
    """Until the service runs and queues nothing (a cancelled call's slots are freed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = client.status()
        if s.running_sequences == 0 and s.queued_sequences == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"service still busy after {seconds}s: {s}")


def finished_sequences(app) -> dict[str, float]:
    """The service's count of finished sequences by finish reason (its Prometheus counter)."""
    registry = app.servicer.metrics.registry
    return {reason: registry.get_sample_value("fastgrpo_rollout_finished_sequences_total", {"reason": reason})
            for reason in ("stop", "length", "abort")}


# ------------------------------------------------------------------------------------------ the two faces
class BlockingAsyncClient:
    """AsyncRolloutClient behind RolloutClient's blocking surface (same constructor and methods).

    The client lives on an asyncio event loop of its own, run by a background thread; it is created
    on that loop (grpc.aio channels belong to the loop they were made on), and every call submits its
    coroutine there and waits for the result, which re-raises the client's own exceptions here.
    """

    def __init__(self, address, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-face-loop", daemon=True)
        self._thread.start()

        async def create() -> AsyncRolloutClient:
            return AsyncRolloutClient(address, **kwargs)

        try:
            self._client = self._run(create())
        except BaseException:
            self._stop_loop()
            raise
        self.replicas = self._client.replicas

    def _run(self, awaitable):
        async def wait():
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wait(), self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
            self._run(self._loop.shutdown_asyncgens())
        finally:
            self._stop_loop()

    def __enter__(self) -> "BlockingAsyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def status(self, **kwargs):
        return self._run(self._client.status(**kwargs))

    def replica_states(self):
        return self._client.replica_states()

    def train_draft(self, **kwargs):
        return self._run(self._client.train_draft(**kwargs))

    def wait_ready(self, timeout: float = 60.0) -> None:
        return self._run(self._client.wait_ready(timeout))

    def generate(self, *args, **kwargs) -> "AsyncStream":
        return AsyncStream(self._run, self._client.generate(*args, **kwargs))

    def generate_batch(self, *args, **kwargs):
        return self._run(self._client.generate_batch(*args, **kwargs))

    def push_weights(self, *args, **kwargs):
        return self._run(self._client.push_weights(*args, **kwargs))


class AsyncStream:
    """An async generator of completions as a blocking iterator: each item is pulled through the
    loop; close() closes the generator there (aclose), which cancels the call."""

    def __init__(self, run, agen):
        self._run = run
        self._agen = agen

    def __iter__(self) -> "AsyncStream":
        return self

    def __next__(self):
        try:
            return self._run(self._agen.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._run(self._agen.aclose())


@pytest.fixture(params=["sync", "async"])
def face(request):
    """The client under test, as a class: face(address, **RolloutClient's keyword arguments)."""
    return {"sync": RolloutClient, "async": BlockingAsyncClient}[request.param]


# ------------------------------------------------------------------------------------------ fault injection
class FaultInjector(grpc.ServerInterceptor):
    """Aborts the next calls of a method with UNAVAILABLE (what a restarting or overloaded server
    answers), and counts every call of each method it sees, aborted or not. Methods by short name:
    "GetStatus", "Generate", "UpdateWeights", "Watch", ..."""

    def __init__(self):
        self.calls: collections.Counter[str] = collections.Counter()
        self._failures: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def fail(self, method: str, times: int) -> None:
        """The next `times` calls of `method` are aborted with UNAVAILABLE."""
        with self._lock:
            self._failures[method] = times

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method.rsplit("/", 1)[-1]
        with self._lock:
            self.calls[method] += 1
            inject = self._failures[method] > 0
            if inject:
                self._failures[method] -= 1
        handler = continuation(handler_call_details)
        if not inject or handler is None:
            return handler

        def abort(request_or_iterator, context):
            if handler.request_streaming:  # read to the end first, as the service does (servicer.py)
                for _ in request_or_iterator:
                    pass
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected")

        return handler_like(handler, abort, handler.request_deserializer)


# ------------------------------------------------------------------------------------------ generate
def test_generate_streamed_and_gathered(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with face(addr(app), timeout=30) as client:
        vocab = client.status().model.vocab_size
        streamed = list(client.generate(PROMPTS, num_samples=4, sampling=SAMPLING, request_id="r1"))
        batch = client.generate_batch(PROMPTS, num_samples=4, sampling=SAMPLING)
        other_seed = client.generate_batch(PROMPTS, num_samples=4, sampling=Sampling(
            temperature=1.0, max_new_tokens=6, seed=99, ignore_eos=True))

    assert sorted((c.prompt_index, c.sample_index) for c in streamed) == [(i, j) for i in range(3) for j in range(4)]
    assert {c.request_id for c in streamed} == {"r1"}
    for c in streamed:
        assert len(c.token_ids) == len(c.logprobs) == SAMPLING.max_new_tokens
        assert c.finish_reason == "length" and c.policy_version == 0
        assert all(0 <= t < vocab for t in c.token_ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
        ref = reference_logprobs(model, PROMPTS[c.prompt_index], c.token_ids, SAMPLING.temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)

    assert [len(g) for g in batch.completions] == [4, 4, 4]
    assert len(batch.flat()) == 12
    by_index = {(c.prompt_index, c.sample_index): c.token_ids for c in streamed}
    for i, group in enumerate(batch.completions):
        for j, c in enumerate(group):
            assert (c.prompt_index, c.sample_index) == (i, j)
            assert c.token_ids == by_index[(i, j)]  # same seed, same tokens, streamed or gathered
    assert len({tuple(c.token_ids) for c in batch.flat()}) > 1  # samples of one seed still differ
    assert [c.token_ids for c in other_seed.flat()] != [c.token_ids for c in batch.flat()]


def test_leaving_a_stream_early_cancels_it(tiny_dir, start_service, face):
    # one slot: the 40 sequences decode one after another, ~40x as long as the first takes
    app = start_service(tiny_dir, max_running=1)
    with face(addr(app)) as client:
        stream = client.generate([[i] for i in range(40)], 1, Sampling(max_new_tokens=200, ignore_eos=True))
        first = next(stream)
        stream.close()
        wait_idle(client, seconds=5.0)  # the 39 others were dropped, not decoded
    assert len(first.token_ids) == 200


def test_prompts_must_be_a_list(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    with face(addr(app)) as client, pytest.raises(TypeError, match="list of prompts"):
        client.generate_batch("one string")


# ------------------------------------------------------------------------------------------ status
def test_status_describes_the_served_model(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with face(addr(app)) as client:
        s = client.status()
    assert (s.policy_version, s.running_sequences, s.queued_sequences) == (0, 0, 0)
    assert s.policy_checksum == WeightMirror.of(model).checksum
    m = s.model
    assert (m.architecture, m.vocab_size, m.max_context, m.dtype, m.device, m.eos_token_id) == (
        "Qwen2ForCausalLM", 97, 256, "float32", "cpu", 0)
    assert m.num_parameters == sum(p.numel() for p in model.parameters())
    assert s.max_running_sequences >= 1


# ------------------------------------------------------------------------------------------ weights
def test_push_full_with_and_without_mirror(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with face(addr(app)) as client:
        status = client.status()
        mirror = WeightMirror.of(model, status.model.dtype, version=status.policy_version)
        assert mirror.checksum == status.policy_checksum

        [r1] = client.push_weights(perturbed(model, seed=1), "full", mirror=mirror)
        assert (r1.version, mirror.version) == (1, 1)
        assert r1.checksum == mirror.checksum == client.status().policy_checksum != status.policy_checksum
        assert r1.bytes_sent == 4 * sum(p.numel() for p in model.parameters())

        # no mirror: a full push of every tensor is checked against the checksum of what was sent
        [r2] = client.push_weights(perturbed(model, seed=2), "full")
        assert r2.version == 2
        assert r2.checksum == WeightMirror.of(model).checksum == client.status().policy_checksum

        # what is served now is the pushed policy: its logprobs match a local forward of it
        [c] = client.generate_batch(PROMPTS[:1], 1, SAMPLING).flat()
    assert c.policy_version == 2
    torch.testing.assert_close(torch.tensor(c.logprobs), reference_logprobs(model, PROMPTS[0], c.token_ids, 1.0),
                               atol=1e-4, rtol=0)


def test_push_dense_delta_with_mirror(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with face(addr(app)) as client:
        mirror = WeightMirror.of(model, client.status().model.dtype)
        for step in (1, 2):
            delta = mirror.dense_delta(perturbed(model, seed=step))
            assert delta  # every tensor changed
            [r] = client.push_weights(delta, "dense_delta", mirror=mirror)
            assert (r.version, mirror.version) == (step, step)
            assert r.checksum == mirror.checksum == client.status().policy_checksum
        with pytest.raises(ValueError, match="mirror"):
            client.push_weights(delta, "dense_delta")  # a delta cannot be verified without a mirror
    # the mirror is the model up to float rounding of old + (new - old)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(mirror.state[name], t, atol=1e-6, rtol=0)


def test_push_lora_delta_with_mirror(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with face(addr(app)) as client:
        mirror = WeightMirror.of(model, client.status().model.dtype)
        for version, (seed, scale) in enumerate([(0, 0.5), (1, 2.0)], start=1):
            before = {n: mirror.state[n].clone() for n in LORA_TARGETS}
            factors = lora_factors(model, seed=seed)
            [r] = client.push_weights(factors, "lora_delta", lora_scale=scale, mirror=mirror)
            assert r.version == mirror.version == version
            assert r.checksum == mirror.checksum == client.status().policy_checksum
            for name in LORA_TARGETS:
                expected = before[name] + scale * factors[f"{name}.lora_B"] @ factors[f"{name}.lora_A"]
                torch.testing.assert_close(mirror.state[name], expected, atol=1e-6, rtol=0)


def test_push_to_the_draft_bases_on_the_draft_version(tiny_dir, start_service, tmp_path, face):
    from fastgrpo.rollout.speculative.draft_head import DraftHead

    head = DraftHead.for_target(local_model(tiny_dir))
    head.save(tmp_path / "draft")
    app = start_service(tiny_dir, draft=str(tmp_path / "draft"), draft_learning=False)
    with face(addr(app)) as client:
        for version in (1, 2):  # the second push must base on draft version 1, not policy version 0
            [r] = client.push_weights(perturbed(head, seed=version), "full", target="draft")
            assert r.version == version and r.checksum == WeightMirror.of(head).checksum
        s = client.status()
    assert (s.policy_version, s.draft_version) == (0, 2)


def test_tampered_mirror_raises_checksum_mismatch(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with face(addr(app)) as client:
        mirror = WeightMirror.of(model)
        mirror.state["model.norm.weight"] += 1.0  # the mirror no longer matches what is served
        delta = mirror.dense_delta(perturbed(model, seed=3))
        with pytest.raises(ChecksumMismatch) as info:
            client.push_weights(delta, "dense_delta", mirror=mirror)
        served = client.status()
    assert info.value.code == grpc.StatusCode.DATA_LOSS
    assert info.value.got == served.policy_checksum != info.value.expected
    assert served.policy_version == 1 and mirror.version == 0  # the server applied it; the mirror did not move


def test_push_errors_map_to_status_codes(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with face(addr(app)) as client:
        with pytest.raises(RolloutError) as info:
            client.push_weights({"no.such.weight": torch.zeros(3)}, "full", verify=False)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no.such.weight" in info.value.details
        with pytest.raises(RolloutError) as info:
            client.push_weights(model, "full", base_version=5)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "base_version" in info.value.details
        assert client.status().policy_version == 0  # nothing changed


def test_two_replicas_are_pushed_alike(tiny_dir, start_service, face):
    apps = [start_service(tiny_dir), start_service(tiny_dir)]
    model = local_model(tiny_dir)
    with face([addr(a) for a in apps]) as client:
        mirror = WeightMirror.of(model)
        results = client.push_weights(mirror.dense_delta(perturbed(model, seed=4)), "dense_delta", mirror=mirror)
        assert [r.address for r in results] == [addr(a) for a in apps]
        checksums = [client.status(replica=i).policy_checksum for i in (0, 1)]
        assert [r.checksum for r in results] == checksums == [mirror.checksum] * 2
        # a batch is split over both replicas (both idle: half each), and both serve version 1
        versions = {c.policy_version for _ in range(2) for c in client.generate_batch(PROMPTS, 1, SAMPLING).flat()}
        assert versions == {1}


def test_a_replica_that_fails_a_push_is_set_aside_while_another_accepts_it(tiny_dir, start_service, face):
    good, stale = start_service(tiny_dir), start_service(tiny_dir)
    with face(addr(stale)) as client:  # `stale` is one version ahead of the mirrors below
        client.push_weights(local_model(tiny_dir), "full")

    model = local_model(tiny_dir)
    with face(addr(stale)) as client:  # alone it refuses the push: raised, and the mirror stays
        mirror = WeightMirror.of(model)
        before = mirror.checksum
        with pytest.raises(RolloutError) as info:
            client.push_weights(mirror.dense_delta(perturbed(model, seed=5)), "dense_delta", mirror=mirror)
        assert client.replica_states()[0].in_service  # the last replica in service is never set aside
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "base_version" in info.value.details
    assert (mirror.version, mirror.checksum) == (0, before)

    model = local_model(tiny_dir)
    with face([addr(good), addr(stale)]) as client:  # beside one that accepts it: set aside, the push stands
        mirror = WeightMirror.of(model)
        results = client.push_weights(mirror.dense_delta(perturbed(model, seed=5)), "dense_delta", mirror=mirror)
        states = client.replica_states()
        served = client.status(replica=0)
        versions = {c.policy_version for _ in range(2) for c in client.generate_batch(PROMPTS, 1, SAMPLING).flat()}
        assert client.replica_states()[1].in_service is False
    assert [r.address for r in results] == [addr(good)]
    assert [(s.in_service, s.set_asides) for s in states] == [(True, 0), (False, 1)]
    assert "base_version" in states[1].last_error
    assert (mirror.version, mirror.checksum) == (1, served.policy_checksum) != (0, before)
    assert versions == {1}  # a set-aside replica gets no work: every rollout came from `good`


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "prompts, sampling, field",
    [
        ([[5, 1000]], SAMPLING, "prompts[0].token_ids"),
        ([[5]], Sampling(top_p=1.5), "sampling.top_p"),
        ([[5]], Sampling(max_new_tokens=0), "sampling.max_new_tokens"),
        ([[5]], Sampling(temperature=-1.0), "sampling.temperature"),
        ([[5]], Sampling(top_k=-3), "sampling.top_k"),
        (["text prompt"], SAMPLING, "prompts.text"),  # the tiny model has no tokenizer
    ],
)
def test_invalid_request_names_the_field(tiny_dir, start_service, face, prompts, sampling, field):
    app = start_service(tiny_dir)
    with face(addr(app)) as client, pytest.raises(RolloutError) as info:
        client.generate_batch(prompts, 1, sampling)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details and info.value.method == "Generate"


def test_deadline_exceeded_frees_the_service(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    with face(addr(app)) as client:
        with engine_held(app.engine):  # nothing decodes until the block ends
            with pytest.raises(RolloutError) as info:
                client.generate_batch(PROMPTS, 8, Sampling(max_new_tokens=240, ignore_eos=True), timeout=0.5)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert client.status().queued_sequences == 3 * 8  # the expired call's sequences still wait
        wait_idle(client)
    # the expired call's sequences were dropped, not decoded (each would need 240 steps to finish)
    assert finished_sequences(app) == {"stop": 0, "length": 0, "abort": 3 * 8}


# ------------------------------------------------------------------------------------------ retries
def test_status_is_retried_on_unavailable(tiny_dir, start_service, face):
    injector = FaultInjector()
    app = start_service(tiny_dir, interceptors=[injector])
    with face(addr(app), retry=FAST_RETRY) as client:
        injector.fail("GetStatus", 2)
        assert client.status().policy_version == 0
        assert injector.calls["GetStatus"] == 3  # two injected failures, then the answer

        injector.calls.clear()
        injector.fail("GetStatus", 3)  # as many failures as the policy's attempts
        with pytest.raises(RolloutError) as info:
            client.status()
        assert (info.value.code, info.value.details) == (grpc.StatusCode.UNAVAILABLE, "injected")
        assert injector.calls["GetStatus"] == 3

    injector.calls.clear()
    with face(addr(app), retry=NO_RETRY) as client:
        injector.fail("GetStatus", 2)
        with pytest.raises(RolloutError) as info:
            client.status()
        assert (info.value.code, info.value.details) == (grpc.StatusCode.UNAVAILABLE, "injected")
        assert injector.calls["GetStatus"] == 1


def test_generate_is_retried_before_its_first_completion(tiny_dir, start_service, face):
    injector = FaultInjector()
    app = start_service(tiny_dir, interceptors=[injector])
    tokens = lambda batch: [c.token_ids for c in batch.flat()]  # noqa: E731
    with face(addr(app), retry=FAST_RETRY) as client:
        clean = client.generate_batch(PROMPTS, 2, SAMPLING)
        injector.calls.clear()
        injector.fail("Generate", 1)
        retried = client.generate_batch(PROMPTS, 2, SAMPLING)
        assert injector.calls["Generate"] == 2
    assert len(retried.flat()) == 6 and tokens(retried) == tokens(clean)  # fixed seed: the same tokens

    injector.calls.clear()
    with face(addr(app), retry=NO_RETRY) as client:
        injector.fail("Generate", 1)
        with pytest.raises(RolloutError) as info:
            client.generate_batch(PROMPTS, 2, SAMPLING)
        assert (info.value.code, info.value.method) == (grpc.StatusCode.UNAVAILABLE, "Generate")
        assert injector.calls["Generate"] == 1


def test_update_weights_is_never_retried(tiny_dir, start_service, face):
    injector = FaultInjector()
    app = start_service(tiny_dir, interceptors=[injector])
    model = local_model(tiny_dir)
    with face(addr(app), retry=FAST_RETRY) as client:
        mirror = WeightMirror.of(model, client.status().model.dtype)
        before = mirror.checksum
        injector.fail("UpdateWeights", 1)
        with pytest.raises(RolloutError) as info:
            client.push_weights(perturbed(model, seed=6), "full", mirror=mirror)
        assert (info.value.code, info.value.method) == (grpc.StatusCode.UNAVAILABLE, "UpdateWeights")
        assert injector.calls["UpdateWeights"] == 1
        served = client.status()
    assert (served.policy_version, served.policy_checksum) == (0, before)  # nothing was applied
    assert (mirror.version, mirror.checksum) == (0, before)  # and the mirror did not move


class ReplyLoser(grpc.ServerInterceptor):
    """Runs UpdateWeights for real (the update is committed) and then answers CANCELLED instead of
    its reply: what a client sees when it gives up on a push between the commit and the reply."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.endswith("/UpdateWeights"):
            return handler

        def lose(requests, context):
            handler.stream_unary(requests, context)
            context.abort(grpc.StatusCode.CANCELLED, "the reply was lost")

        return handler_like(handler, lose, handler.request_deserializer)


def test_a_push_whose_reply_is_lost_is_judged_by_what_is_served(tiny_dir, start_service, face):
    """The update was applied but the client saw CANCELLED: the client asks for the served checksum,
    finds the weights it pushed, and counts the push as done, its mirror advanced."""
    app = start_service(tiny_dir, interceptors=[ReplyLoser()])
    model = local_model(tiny_dir)
    with face(addr(app)) as client:
        mirror = WeightMirror.of(model, client.status().model.dtype)
        [result] = client.push_weights(mirror.dense_delta(perturbed(model, seed=7)), "dense_delta", mirror=mirror)
        served = client.status()
    assert (result.version, result.checksum) == (1, served.policy_checksum)
    assert (mirror.version, mirror.checksum) == (1, served.policy_checksum)


def test_wait_for_ready_rides_out_a_restart(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    address = addr(app)
    app.stop(grace=0)
    with face(address, retry=NO_RETRY) as probe, pytest.raises(RolloutError) as info:
        probe.status()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE  # down when the call below starts

    outcome = {}

    def call() -> None:
        # one attempt: only wait_for_ready can keep it from failing at once while the service is down
        try:
            with face(address, timeout=30, retry=RetryPolicy(max_attempts=1, wait_for_ready=True)) as client:
                outcome["status"] = client.status()
        except BaseException as exc:  # noqa: BLE001  (reported by the assertions below)
            outcome["error"] = exc

    waiter = threading.Thread(target=call, daemon=True)
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive(), f"the call did not wait for the service: {outcome}"
    start_service(tiny_dir, port=app.port)
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert "error" not in outcome, outcome["error"]
    assert outcome["status"].policy_version == 0


# ------------------------------------------------------------------------------------------ auth, readiness
def test_bearer_token(tiny_dir, start_service, face):
    app = start_service(tiny_dir, auth_token="s3cret")
    for token in (None, "wrong"):
        with face(addr(app), token=token) as client:
            client.wait_ready(timeout=10)  # health checks stay open to probes
            for call in (client.status, lambda: client.generate_batch(PROMPTS, 1, SAMPLING)):
                with pytest.raises(RolloutError) as info:
                    call()
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with face(addr(app), token="s3cret") as client:
        assert client.status().policy_version == 0
        assert len(client.generate_batch(PROMPTS, 1, SAMPLING).flat()) == 3


def test_wait_ready(tiny_dir, start_service, face):
    app = start_service(tiny_dir)
    with face(addr(app)) as client:
        client.wait_ready(timeout=10)
    with face(f"127.0.0.1:{free_port()}") as client, pytest.raises(RolloutError) as info:
        client.wait_ready(timeout=0.5)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
