"""AsyncRolloutClient against real rollout services on 127.0.0.1: the checks of test_client.py, run
through grpc.aio (each test drives its own event loop with asyncio.run), plus what only asyncio
adds: concurrent calls on one client, and leaving a stream early cancels it on the server.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import threading

import grpc
import pytest
import torch

from fastgrpo.client import (
    NO_RETRY,
    AsyncRolloutClient,
    ChecksumMismatch,
    RetryPolicy,
    RolloutError,
    Sampling,
    WeightMirror,
)
from test_client import (  # helpers only: the sync test module's tests are collected there, not here
    LORA_TARGETS,
    PROMPTS,
    SAMPLING,
    addr,
    free_port,
    local_model,
    lora_factors,
    perturbed,
    reference_logprobs,
)


async def wait_idle(client: AsyncRolloutClient, seconds: float = 10.0) -> None:
    """Until the service runs and queues nothing (a cancelled call's slots are freed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        s = await client.status()
        if s.running_sequences == 0 and s.queued_sequences == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"service still busy after {seconds}s: {s}")


# ------------------------------------------------------------------------------------------ generate
def test_generate_streamed_and_gathered(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(app), timeout=30) as client:
            vocab = (await client.status()).model.vocab_size
            streamed = [c async for c in client.generate(PROMPTS, num_samples=4, sampling=SAMPLING, request_id="r1")]
            batch = await client.generate_batch(PROMPTS, num_samples=4, sampling=SAMPLING)
            return vocab, streamed, batch

    vocab, streamed, batch = asyncio.run(main())
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
    by_index = {(c.prompt_index, c.sample_index): c.token_ids for c in streamed}
    for i, group in enumerate(batch.completions):
        for j, c in enumerate(group):
            assert (c.prompt_index, c.sample_index) == (i, j)
            assert c.token_ids == by_index[(i, j)]  # same seed, same tokens, streamed or gathered


def test_concurrent_calls_on_one_client_match_one_at_a_time(tiny_dir, start_service):
    app = start_service(tiny_dir)
    seeds = [11, 12, 13]

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            one_by_one = [await client.generate_batch(PROMPTS, 2, Sampling(max_new_tokens=5, seed=s)) for s in seeds]
            together = await asyncio.gather(
                *(client.generate_batch(PROMPTS, 2, Sampling(max_new_tokens=5, seed=s)) for s in seeds),
                client.status(),
            )
            return one_by_one, together[:-1]

    one_by_one, together = asyncio.run(main())
    tokens = lambda b: [c.token_ids for c in b.flat()]  # noqa: E731
    assert [tokens(b) for b in together] == [tokens(b) for b in one_by_one]  # seeded: batching-agnostic
    assert len({tuple(map(tuple, tokens(b))) for b in one_by_one}) == len(seeds)


def test_leaving_a_stream_early_cancels_it(tiny_dir, start_service):
    # one slot: the 40 sequences decode one after another, ~40x as long as the first takes
    app = start_service(tiny_dir, max_running=1)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            stream = client.generate([[i] for i in range(40)], 1, Sampling(max_new_tokens=200, ignore_eos=True))
            async with contextlib.aclosing(stream):
                async for first in stream:
                    break
            await wait_idle(client, seconds=5.0)  # the 39 others were dropped, not decoded
            return first

    assert len(asyncio.run(main()).token_ids) == 200


def test_prompts_must_be_a_list(tiny_dir, start_service):
    app = start_service(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            await client.generate_batch("one string")

    with pytest.raises(TypeError, match="list of prompts"):
        asyncio.run(main())


# ------------------------------------------------------------------------------------------ status
def test_status_describes_the_served_model(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            return await client.status()

    s = asyncio.run(main())
    assert (s.policy_version, s.running_sequences, s.queued_sequences) == (0, 0, 0)
    assert s.policy_checksum == WeightMirror.of(model).checksum
    assert (s.model.architecture, s.model.vocab_size, s.model.dtype) == ("Qwen2ForCausalLM", 97, "float32")


# ------------------------------------------------------------------------------------------ weights
def test_push_full_with_and_without_mirror(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            status = await client.status()
            mirror = WeightMirror.of(model, status.model.dtype, version=status.policy_version)
            [r1] = await client.push_weights(perturbed(model, seed=1), "full", mirror=mirror)
            assert (r1.version, mirror.version) == (1, 1)
            assert r1.checksum == mirror.checksum == (await client.status()).policy_checksum != status.policy_checksum
            [r2] = await client.push_weights(perturbed(model, seed=2), "full")
            assert r2.version == 2
            assert r2.checksum == WeightMirror.of(model).checksum == (await client.status()).policy_checksum
            return (await client.generate_batch(PROMPTS[:1], 1, SAMPLING)).flat()[0]

    c = asyncio.run(main())
    assert c.policy_version == 2
    torch.testing.assert_close(torch.tensor(c.logprobs), reference_logprobs(model, PROMPTS[0], c.token_ids, 1.0),
                               atol=1e-4, rtol=0)


def test_push_dense_delta_with_mirror(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            mirror = WeightMirror.of(model, (await client.status()).model.dtype)
            for step in (1, 2):
                delta = mirror.dense_delta(perturbed(model, seed=step))
                [r] = await client.push_weights(delta, "dense_delta", mirror=mirror)
                assert (r.version, mirror.version) == (step, step)
                assert r.checksum == mirror.checksum == (await client.status()).policy_checksum
            with pytest.raises(ValueError, match="mirror"):
                await client.push_weights(delta, "dense_delta")

    asyncio.run(main())


def test_push_lora_delta_with_mirror(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            mirror = WeightMirror.of(model)
            before = {n: mirror.state[n].clone() for n in LORA_TARGETS}
            factors = lora_factors(model, seed=1)
            [r] = await client.push_weights(factors, "lora_delta", lora_scale=2.0, mirror=mirror)
            assert r.version == mirror.version == 1
            assert r.checksum == mirror.checksum == (await client.status()).policy_checksum
            return mirror, before, factors

    mirror, before, factors = asyncio.run(main())
    for name in LORA_TARGETS:
        expected = before[name] + 2.0 * factors[f"{name}.lora_B"] @ factors[f"{name}.lora_A"]
        torch.testing.assert_close(mirror.state[name], expected, atol=1e-6, rtol=0)


def test_push_to_the_draft_bases_on_the_draft_version(tiny_dir, start_service, tmp_path):
    from fastgrpo.rollout.speculative.draft import DraftHead

    head = DraftHead.for_target(local_model(tiny_dir))
    head.save(tmp_path / "draft")
    app = start_service(tiny_dir, draft=str(tmp_path / "draft"), draft_learning=False)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            for version in (1, 2):  # the second push must base on draft version 1, not policy version 0
                [r] = await client.push_weights(perturbed(head, seed=version), "full", target="draft")
                assert r.version == version and r.checksum == WeightMirror.of(head).checksum
            return await client.status()

    s = asyncio.run(main())
    assert (s.policy_version, s.draft_version) == (0, 2)


def test_tampered_mirror_raises_checksum_mismatch(tiny_dir, start_service):
    app = start_service(tiny_dir)
    model = local_model(tiny_dir)
    mirror = WeightMirror.of(model)
    mirror.state["model.layers.0.input_layernorm.weight"] -= 0.5  # the mirror no longer matches what is served

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            with pytest.raises(ChecksumMismatch) as info:
                await client.push_weights(mirror.dense_delta(perturbed(model, seed=3)), "dense_delta", mirror=mirror)
            return info.value, await client.status()

    err, served = asyncio.run(main())
    assert err.code == grpc.StatusCode.DATA_LOSS and err.got == served.policy_checksum != err.expected
    assert served.policy_version == 1 and mirror.version == 0


def test_two_replicas_are_pushed_concurrently_and_alike(tiny_dir, start_service):
    apps = [start_service(tiny_dir), start_service(tiny_dir)]
    model = local_model(tiny_dir)

    async def main():
        async with AsyncRolloutClient([addr(a) for a in apps]) as client:
            mirror = WeightMirror.of(model)
            results = await client.push_weights(mirror.dense_delta(perturbed(model, seed=4)), "dense_delta",
                                                mirror=mirror)
            checksums = [(await client.status(replica=i)).policy_checksum for i in (0, 1)]
            return mirror, results, checksums

    mirror, results, checksums = asyncio.run(main())
    assert [r.address for r in results] == [addr(a) for a in apps]
    assert [r.checksum for r in results] == checksums == [mirror.checksum] * 2


def test_a_failing_replica_leaves_the_mirror_unmoved(tiny_dir, start_service):
    good, stale = start_service(tiny_dir), start_service(tiny_dir)
    model = local_model(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(stale)) as client:  # `stale` is one version ahead of the mirror
            await client.push_weights(model, "full")
        async with AsyncRolloutClient([addr(good), addr(stale)]) as client:
            mirror = WeightMirror.of(model)
            with pytest.raises(RolloutError) as info:
                await client.push_weights(mirror.dense_delta(perturbed(model, seed=5)), "dense_delta", mirror=mirror)
            return info.value, mirror

    err, mirror = asyncio.run(main())
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "base_version" in err.details
    assert mirror.version == 0


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "prompts, sampling, field",
    [
        ([[5, 1000]], SAMPLING, "prompts[0].token_ids"),
        ([[5]], Sampling(temperature=-1.0), "sampling.temperature"),
        ([[5]], Sampling(top_k=-3), "sampling.top_k"),
    ],
)
def test_invalid_request_names_the_field(tiny_dir, start_service, prompts, sampling, field):
    app = start_service(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            await client.generate_batch(prompts, 1, sampling)

    with pytest.raises(RolloutError) as info:
        asyncio.run(main())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details and info.value.method == "Generate"


def test_deadline_exceeded_frees_the_service(tiny_dir, start_service):
    app = start_service(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            with pytest.raises(RolloutError) as info:
                await client.generate_batch(PROMPTS, 8, Sampling(max_new_tokens=240, ignore_eos=True), timeout=0.05)
            await wait_idle(client)
            return info.value

    assert asyncio.run(main()).code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_retry_succeeds_once_the_service_is_back(tiny_dir, start_service):
    app = start_service(tiny_dir)
    address = addr(app)
    retry = RetryPolicy(max_attempts=60, initial_backoff_s=0.05, max_backoff_s=0.5)

    async def probe():
        async with AsyncRolloutClient(address, retry=NO_RETRY) as client:
            await client.status()

    async def call(which: str):
        async with AsyncRolloutClient(address, timeout=10, retry=retry) as client:
            if which == "generate":
                return len((await client.generate_batch(PROMPTS, 2, SAMPLING)).flat())
            return (await client.status()).policy_version

    for which, expected in (("generate", 6), ("status", 0)):
        app.stop(grace=0)
        with pytest.raises(RolloutError) as info:
            asyncio.run(probe())
        assert info.value.code == grpc.StatusCode.UNAVAILABLE  # down when the call below starts
        restarted = []
        restart = threading.Timer(1.0, lambda: restarted.append(start_service(tiny_dir, port=app.port)))
        restart.start()
        assert asyncio.run(call(which)) == expected
        restart.join()
        app = restarted[0]


def test_bearer_token(tiny_dir, start_service):
    app = start_service(tiny_dir, auth_token="s3cret")

    async def main():
        for token in (None, "wrong"):
            async with AsyncRolloutClient(addr(app), token=token) as client:
                await client.wait_ready(timeout=10)  # health checks stay open to probes
                for call in (client.status(), client.generate_batch(PROMPTS, 1, SAMPLING)):
                    with pytest.raises(RolloutError) as info:
                        await call
                    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncRolloutClient(addr(app), token="s3cret") as client:
            assert (await client.status()).policy_version == 0
            assert len((await client.generate_batch(PROMPTS, 1, SAMPLING)).flat()) == 3

    asyncio.run(main())


def test_wait_ready(tiny_dir, start_service):
    app = start_service(tiny_dir)

    async def main():
        async with AsyncRolloutClient(addr(app)) as client:
            await client.wait_ready(timeout=10)
        async with AsyncRolloutClient(f"127.0.0.1:{free_port()}") as client:
            with pytest.raises(RolloutError) as info:
                await client.wait_ready(timeout=0.5)
            return info.value

    assert asyncio.run(main()).code == grpc.StatusCode.DEADLINE_EXCEEDED
