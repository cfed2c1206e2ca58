"""The paged KV cache: block bookkeeping, shared prompts, preemption, a memory budget, and what a
request that cannot fit gets."""
from __future__ import annotations

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_random_model, tiny_config
from fastgrpo.rollout.runtime.blocks import BlockManager, blocks_for
from fastgrpo.rollout.runtime.kv_cache import PagedKVCache, parse_bytes
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
from fastgrpo.rollout.scheduler.requests import GenerationRequest, KVCacheTooSmall
from fastgrpo.rollout.speculative.controller import SpecController
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.draft_runner import Drafter
from fastgrpo.rollout.speculative.tree import TreeShape
from fastgrpo.wire.records import Sampling

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ bookkeeping
def test_blocks_are_held_shared_cached_and_evicted_oldest_first():
    bm = BlockManager(num_blocks=5, block_size=2)  # 4 usable, block 0 is scratch
    a = bm.allocate(2)
    assert 0 not in a and bm.stats().used == 2
    digests = bm.digests((1, 2, 3, 4, 5), 2)
    bm.register(digests, a)
    assert bm.lookup(digests) == a and bm.lookup(bm.digests((1, 2, 9, 9), 2)) == a[:1]  # prefix, not content
    bm.hold(a[0])
    bm.release(a)
    assert bm.refs(a[0]) == 1 and bm.stats() == bm.stats().__class__(4, 1, 1, 2)  # a[1] cached, nobody holds it
    bm.release([a[0]])
    assert bm.stats().cached == 2 and bm.available == 4
    b = bm.allocate(3)  # the two free ones, then the oldest cached one (a[1], released first) is evicted
    assert a[1] in b and a[0] not in b and bm.lookup(digests) == [a[0]]
    with pytest.raises(MemoryError):
        bm.allocate(2)
    bm.forget_prefixes()
    assert bm.lookup(digests) == [] and bm.stats().free == 1


def test_digests_chain_the_whole_prefix():
    bm = BlockManager(num_blocks=4, block_size=2)
    one, two = bm.digests((1, 2, 3, 4), 2), bm.digests((5, 6, 3, 4), 2)
    assert one[1] != two[1]  # the same tokens after another prefix are another block


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="not a byte size"):
        parse_bytes("lots")


# ------------------------------------------------------------------ engines on a tiny random model
def _model(max_pos: int = 256, layers: int = 2):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(max_pos=max_pos, layers=layers)).eval()


def _run(engine: Engine, prompts, samples: int, **sampling):
    req = GenerationRequest("r", tuple(map(tuple, prompts)), samples, Sampling(**sampling))
    return sorted(engine.submit(req), key=lambda c: (c.prompt_index, c.sample_index))


def _spec_engine(model, head, **config):
    controller = SpecController("static", static_tree=TreeShape(3, 3, 8))
    runner = ModelRunner(model, headroom=controller.max_nodes())
    return Engine(runner, (0,), EngineConfig(**config), Drafter(head), controller)


PROMPTS = [list(range(1, 38)), list(range(40, 57)), [5, 6, 7]]  # 37, 17 and 3 tokens: 2, 1 and 0 full blocks


@pytest.mark.parametrize("spec", [False, True], ids=["plain", "speculative"])
def test_shared_prompt_samples_equal_unshared_ones(spec):
    model = _model()
    head = DraftHead.for_target(model).eval() if spec else None
    outputs = {}
    for sharing in (True, False):
        config = dict(max_running=32, prefix_sharing=sharing, kv_block_size=16)
        engine = _spec_engine(model, head, **config) if spec else Engine(ModelRunner(model), (0,), EngineConfig(**config))
        try:
            outputs[sharing] = _run(engine, PROMPTS, 6, temperature=1.0, max_new_tokens=24, seed=7, ignore_eos=True)
            status = engine.snapshot()
        finally:
            engine.shutdown()
        # the 5 samples after the first of each prompt share its full blocks: 2 + 1 + 0 blocks of 16
        assert status["shared_prompt_tokens"] == (5 * (37 + 17 + 3) if sharing else 0)
    for a, b in zip(outputs[True], outputs[False]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_logprobs_of_shared_samples_equal_a_fresh_forward():
    model = _model()
    engine = Engine(ModelRunner(model), (0,), EngineConfig(max_running=16, kv_block_size=8))
    try:
        done = _run(engine, PROMPTS[:2], 4, temperature=0.8, top_k=20, max_new_tokens=20, seed=3, ignore_eos=True)
    finally:
        engine.shutdown()
    with torch.no_grad():
        for c in done:
            prompt = PROMPTS[c.prompt_index]
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1: -1].double()  # (n, V)
            ref = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max() < 1e-4


def test_a_prompt_cached_by_an_earlier_request_is_not_prefilled_again():
    model = _model()
    engine = Engine(ModelRunner(model), (0,), EngineConfig(max_running=8, kv_block_size=8))
    try:
        first = _run(engine, [PROMPTS[0]], 1, temperature=0.0, max_new_tokens=8)
        assert engine.snapshot()["shared_prompt_tokens"] == 0
        again = _run(engine, [PROMPTS[0]], 1, temperature=0.0, max_new_tokens=8)
        assert engine.snapshot()["shared_prompt_tokens"] == 32  # 4 full blocks before the last prompt token
        engine.run_exclusive(lambda: engine.set_policy_version(1))  # new weights: the cached keys are stale
        _run(engine, [PROMPTS[0]], 1, temperature=0.0, max_new_tokens=8)
        assert engine.snapshot()["shared_prompt_tokens"] == 32
    finally:
        engine.shutdown()
    assert first[0].token_ids == again[0].token_ids


@pytest.mark.parametrize("spec", [False, True], ids=["plain", "speculative"])
def test_running_out_of_blocks_preempts_and_completes_every_request(spec):
    model = _model()
    head = DraftHead.for_target(model).eval() if spec else None
    prompts = [[i + 1] * (5 + 3 * i) for i in range(8)]

    def make(**config):
        config = dict(max_running=8, kv_block_size=4, prefix_sharing=False, **config)
        return _spec_engine(model, head, **config) if spec else Engine(ModelRunner(model), (0,), EngineConfig(**config))

    roomy, tight = make(), None
    try:
        expected = _run(roomy, prompts, 1, temperature=0.0, max_new_tokens=40, ignore_eos=True)
        per_block = roomy.kv_bytes_per_block
        # room for the longest sequence with the largest tree any step could verify, and no more
        # (+1: the scratch block): the eight together need several times that
        blocks = blocks_for(len(prompts[-1]) + 40 + roomy.lookahead, 4) + 1
        tight = make(kv_cache_memory=str(per_block * blocks))
        got = _run(tight, prompts, 1, temperature=0.0, max_new_tokens=40, ignore_eos=True)
        snap = tight.snapshot()
    finally:
        roomy.shutdown()
        if tight is not None:
            tight.shutdown()
    assert snap["preemptions"] > 0
    assert snap["kv_blocks"].used == 0  # every block went back
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert all(len(c.token_ids) == 40 and c.finish_reason == "length" for c in got)


def test_a_request_that_cannot_fit_the_cache_is_refused_and_others_run():
    model = _model()
    engine = Engine(ModelRunner(model), (0,), EngineConfig(max_running=4, kv_block_size=4, kv_cache_memory="40KiB"))
    try:
        total = engine.blocks.num_blocks - 1
        with pytest.raises(KVCacheTooSmall, match=r"needs \d+ KV-cache blocks \(.* MiB"):
            _run(engine, [list(range(1, 4 * total + 1))], 1, temperature=0.0, max_new_tokens=4)
        assert engine.snapshot()["queued"] == 0
        done = _run(engine, [[1, 2, 3]], 2, temperature=0.0, max_new_tokens=4)
        assert len(done) == 2
    finally:
        engine.shutdown()


def test_a_64_by_32k_context_configuration_starts_within_a_small_budget():
    model = _model(max_pos=32768, layers=4)
    runner = ModelRunner(model)
    per_token = runner.kv_bytes_per_block(1)
    dense = 64 * 32768 * per_token  # what one slot per sequence of the whole context took before: 2 GiB
    budget = 64 * 2**20
    assert dense >= 32 * budget
    engine = Engine(runner, (0,), EngineConfig(max_running=64, kv_cache_memory="64MiB"))
    try:
        assert runner.cache.nbytes <= budget
        done = _run(engine, [[1, 2, 3]], 64, temperature=1.0, max_new_tokens=8, seed=1)
        assert len(done) == 64
    finally:
        engine.shutdown()


# ------------------------------------------------------------------ over gRPC
@pytest.mark.service
def test_service_refuses_a_prompt_beyond_the_budget_with_resource_exhausted(tmp_path, start_service, stubs):
    from fastgrpo.v1 import rollout_pb2 as pb

    model_dir = save_random_model(tmp_path / "m", max_pos=4096)
    app = start_service(model_dir, max_running=4, kv_cache_memory="256KiB", kv_block_size=16)
    s = stubs(f"127.0.0.1:{app.port}")
    kv = s.status().kv_cache
    assert kv.block_size == 16 and kv.blocks_total > 0 and kv.blocks_free == kv.blocks_total
    too_long = pb.GenerateRequest(prompts=[pb.Prompt(token_ids=pb.TokenIds(ids=list(range(1, 90)) * 30))], num_samples=1,
                                  sampling=pb.SamplingParams(max_new_tokens=8))
    with pytest.raises(grpc.RpcError) as err:
        list(s.rollout.Generate(too_long))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "needs" in err.value.details() and "MiB" in err.value.details() and "--kv-cache-memory" in err.value.details()
    ok = pb.GenerateRequest(prompts=[pb.Prompt(token_ids=pb.TokenIds(ids=[1, 2, 3]))], num_samples=3,
                            sampling=pb.SamplingParams(max_new_tokens=5))
    assert len(list(s.rollout.Generate(ok))) == 3
    after = s.status().kv_cache
    assert after.blocks_used == 0 and after.bytes_total == kv.bytes_total
