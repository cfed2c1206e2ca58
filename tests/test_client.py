"""The blocking RolloutClient against real rollout services on 127.0.0.1 (tiny random Qwen2, CPU).

Covers: streamed and gathered Generate (indices, shapes, logprobs equal to a local forward, seeded
determinism), every kind of weight push verified against a WeightMirror, a tampered mirror raising
ChecksumMismatch, status, error mapping, deadlines, retry across a restart, bearer auth, wait_ready.
The asyncio client runs the same checks in test_client_async.py.
"""
from __future__ import annotations

import math
import socket
import threading
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastgrpo.client import (
    NO_RETRY,
    ChecksumMismatch,
    RetryPolicy,
    RolloutClient,
    RolloutError,
    Sampling,
    WeightMirror,
)

PROMPTS = [[5, 17, 33], [8, 2], [40, 41, 42, 43]]
SAMPLING = Sampling(temperature=1.0, max_new_tokens=6, seed=1234, ignore_eos=True)
LORA_TARGETS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]


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


# ------------------------------------------------------------------------------------------ generate
def test_generate_streamed_and_gathered(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with RolloutClient(addr(app), timeout=30) as client:
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


def test_leaving_a_stream_early_cancels_it(tiny_dir, start_service):
    # one slot: the 40 sequences decode one after another, ~40x as long as the first takes
    app = start_service(tiny_dir, max_running=1)
    with RolloutClient(addr(app)) as client:
        stream = client.generate([[i] for i in range(40)], 1, Sampling(max_new_tokens=200, ignore_eos=True))
        first = next(stream)
        stream.close()
        wait_idle(client, seconds=5.0)  # the 39 others were dropped, not decoded
    assert len(first.token_ids) == 200


def test_prompts_must_be_a_list(tiny_dir, start_service):
    app = start_service(tiny_dir)
    with RolloutClient(addr(app)) as client, pytest.raises(TypeError, match="list of prompts"):
        client.generate_batch("one string")


# ------------------------------------------------------------------------------------------ status
def test_status_describes_the_served_model(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with RolloutClient(addr(app)) as client:
        s = client.status()
    assert (s.policy_version, s.running_sequences, s.queued_sequences) == (0, 0, 0)
    assert s.policy_checksum == WeightMirror.of(model).checksum
    m = s.model
    assert (m.architecture, m.vocab_size, m.max_context, m.dtype, m.device, m.eos_token_id) == (
        "Qwen2ForCausalLM", 97, 256, "float32", "cpu", 0)
    assert m.num_parameters == sum(p.numel() for p in model.parameters())
    assert s.max_running_sequences >= 1


# ------------------------------------------------------------------------------------------ weights
def test_push_full_with_and_without_mirror(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with RolloutClient(addr(app)) as client:
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


def test_push_dense_delta_with_mirror(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with RolloutClient(addr(app)) as client:
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


def test_push_lora_delta_with_mirror(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with RolloutClient(addr(app)) as client:
        mirror = WeightMirror.of(model, client.status().model.dtype)
        before = {n: mirror.state[n].clone() for n in LORA_TARGETS}
        factors = lora_factors(model)
        [r] = client.push_weights(factors, "lora_delta", lora_scale=0.5, mirror=mirror)
        assert r.version == mirror.version == 1
        assert r.checksum == mirror.checksum == client.status().policy_checksum
    for name in LORA_TARGETS:
        expected = before[name] + 0.5 * factors[f"{name}.lora_B"] @ factors[f"{name}.lora_A"]
        torch.testing.assert_close(mirror.state[name], expected, atol=1e-6, rtol=0)


def test_push_to_the_draft_bases_on_the_draft_version(tiny_dir, start_service, tmp_path):
    from fastgrpo.rollout.speculative.draft import DraftHead

    head = DraftHead.for_target(local_model(tiny_dir))
    head.save(tmp_path / "draft")
    app = start_service(tiny_dir, draft=str(tmp_path / "draft"), draft_learning=False)
    with RolloutClient(addr(app)) as client:
        for version in (1, 2):  # the second push must base on draft version 1, not policy version 0
            [r] = client.push_weights(perturbed(head, seed=version), "full", target="draft")
            assert r.version == version and r.checksum == WeightMirror.of(head).checksum
        s = client.status()
    assert (s.policy_version, s.draft_version) == (0, 2)


def test_tampered_mirror_raises_checksum_mismatch(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with RolloutClient(addr(app)) as client:
        mirror = WeightMirror.of(model)
        mirror.state["model.norm.weight"] += 1.0  # the mirror no longer matches what is served
        delta = mirror.dense_delta(perturbed(model, seed=3))
        with pytest.raises(ChecksumMismatch) as info:
            client.push_weights(delta, "dense_delta", mirror=mirror)
        served = client.status()
    assert info.value.code == grpc.StatusCode.DATA_LOSS
    assert info.value.got == served.policy_checksum != info.value.expected
    assert served.policy_version == 1 and mirror.version == 0  # the server applied it; the mirror did not move


def test_push_errors_map_to_status_codes(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    with RolloutClient(addr(app)) as client:
        with pytest.raises(RolloutError) as info:
            client.push_weights({"no.such.weight": torch.zeros(3)}, "full", verify=False)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no.such.weight" in info.value.details
        with pytest.raises(RolloutError) as info:
            client.push_weights(model, "full", base_version=5)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "base_version" in info.value.details
        assert client.status().policy_version == 0  # nothing changed


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "prompts, sampling, field",
    [
        ([[5, 1000]], SAMPLING, "prompts[0].token_ids"),
        ([[5]], Sampling(top_p=1.5), "sampling.top_p"),
        ([[5]], Sampling(max_new_tokens=0), "sampling.max_new_tokens"),
        (["text prompt"], SAMPLING, "prompts.text"),  # the tiny model has no tokenizer
    ],
)
def test_invalid_request_names_the_field(tiny_dir, start_service, prompts, sampling, field):
    app = start_service(tiny_dir)
    with RolloutClient(addr(app)) as client, pytest.raises(RolloutError) as info:
        client.generate_batch(prompts, 1, sampling)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details and info.value.method == "Generate"


def test_deadline_exceeded_frees_the_service(tiny_dir, start_service):
    app = start_service(tiny_dir)
    with RolloutClient(addr(app)) as client:
        with pytest.raises(RolloutError) as info:
            client.generate_batch(PROMPTS, 8, Sampling(max_new_tokens=240, ignore_eos=True), timeout=0.05)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_idle(client)  # the expired call's sequences were dropped, not left decoding


def test_retry_succeeds_once_the_service_is_back(tiny_dir, start_service):
    app = start_service(tiny_dir)
    address = addr(app)
    retry = RetryPolicy(max_attempts=60, initial_backoff_s=0.05, max_backoff_s=0.5)
    for call in ("generate", "status"):
        app.stop(grace=0)
        with RolloutClient(address, retry=NO_RETRY) as probe, pytest.raises(RolloutError) as info:
            probe.status()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE  # down when the call below starts
        restarted = []
        restart = threading.Timer(1.0, lambda: restarted.append(start_service(tiny_dir, port=app.port)))
        restart.start()
        with RolloutClient(address, timeout=10, retry=retry) as client:
            if call == "generate":
                assert len(client.generate_batch(PROMPTS, 2, SAMPLING).flat()) == 6
            else:
                assert client.status().policy_version == 0
        restart.join()
        app = restarted[0]


def test_bearer_token(tiny_dir, start_service):
    app = start_service(tiny_dir, auth_token="s3cret")
    for token in (None, "wrong"):
        with RolloutClient(addr(app), token=token) as client:
            client.wait_ready(timeout=10)  # health checks stay open to probes
            for call in (client.status, lambda: client.generate_batch(PROMPTS, 1, SAMPLING)):
                with pytest.raises(RolloutError) as info:
                    call()
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with RolloutClient(addr(app), token="s3cret") as client:
        assert client.status().policy_version == 0
        assert len(client.generate_batch(PROMPTS, 1, SAMPLING).flat()) == 3


def test_wait_ready(tiny_dir, start_service):
    app = start_service(tiny_dir)
    with RolloutClient(addr(app)) as client:
        client.wait_ready(timeout=10)
    with RolloutClient(f"127.0.0.1:{free_port()}") as client, pytest.raises(RolloutError) as info:
        client.wait_ready(timeout=0.5)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_two_replicas_are_pushed_alike(tiny_dir, start_service):
    apps = [start_service(tiny_dir), start_service(tiny_dir)]
    model = local_model(tiny_dir)
    with RolloutClient([addr(a) for a in apps]) as client:
        mirror = WeightMirror.of(model)
        results = client.push_weights(mirror.dense_delta(perturbed(model, seed=4)), "dense_delta", mirror=mirror)
        assert [r.address for r in results] == [addr(a) for a in apps]
        assert {r.checksum for r in results} == {mirror.checksum}
        assert [client.status(replica=i).policy_checksum for i in (0, 1)] == [mirror.checksum] * 2
        versions = {c.policy_version for _ in range(2) for c in client.generate_batch(PROMPTS, 1, SAMPLING).flat()}
        assert versions == {1}
