"""Rollout engine: sampler math, model runner against transformers, continuous batching."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from fastgrpo.rollout.runtime import sampler
from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
from fastgrpo.rollout.runtime.batch import ForwardBatch
from fastgrpo.rollout.runtime.layers import attention_mask
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.scheduler.requests import GenerationRequest
from fastgrpo.wire.records import Sampling

pytestmark = pytest.mark.unit


def _params(t, k, p):
    return sampler.SamplingBatch(torch.tensor(t, dtype=torch.float32), torch.tensor(k), torch.tensor(p))


# ------------------------------------------------------------------ sampler (hand-computed)
def test_sampling_logprobs_top_k_top_p_by_hand():
    # probs at T=1: [0.5, 0.25, 0.15, 0.1]
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]] * 3))
    out = sampler.sampling_logprobs(logits, _params([1.0, 1.0, 1.0], [-1, 2, -1], [1.0, 1.0, 0.7]), True).exp()
    assert torch.allclose(out[0], torch.tensor([0.5, 0.25, 0.15, 0.1]), atol=1e-6)
    # top-k 2 keeps 0.5, 0.25 -> renormalised 2/3, 1/3
    assert torch.allclose(out[1], torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=1e-6)
    # top-p 0.7: mass before token 2 is 0.75 >= 0.7 -> keep tokens 0, 1
    assert torch.allclose(out[2], torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=1e-6)


def test_temperature_and_greedy_rows():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    out = sampler.sampling_logprobs(logits, _params([0.5, 0.0], [-1, -1], [1.0, 1.0]), False)
    expect0 = torch.softmax(logits[0] / 0.5, -1)
    assert torch.allclose(out[0].exp(), expect0, atol=1e-6)
    assert out[1].tolist() == [-math.inf, 0.0, -math.inf]  # greedy: one-hot at the argmax
    pol = sampler.policy_logprobs(logits, torch.tensor([0.5, 0.0]))
    assert torch.allclose(pol[1], torch.log_softmax(logits[1], -1))  # greedy logprob at T = 1


def test_a_tiny_temperature_gives_a_one_hot_not_nan():
    """logits / T overflows float32 for T far below 1e-30; the policy distribution must still be a
    distribution (a one-hot at the argmax in the limit), never NaN."""
    logits = torch.tensor([[3.0, 2.0, -1.0, 2.9999]] * 3)
    t = torch.tensor([1e-30, 1e-38, 1e-45])
    logp = sampler.policy_logprobs(logits, t)
    assert not torch.isnan(logp).any()
    assert logp[:, 0].tolist() == [0.0, 0.0, 0.0] and bool((logp[:, 1:] < -1e20).all())
    params = sampler.SamplingBatch(t, torch.full((3,), -1), torch.ones(3))
    assert sampler.sampling_logprobs(logits, params, False).exp().sum(-1).tolist() == [1.0, 1.0, 1.0]


def test_exponential_race_matches_distribution():
    p = torch.tensor([0.6, 0.3, 0.1])
    logp = torch.log(p)[None].expand(20000, 3)
    noise = -torch.log(sampler.counter_uniforms(torch.full((20000,), 5), torch.arange(20000), 3))  # (N, 3) Exp(1)
    tokens = sampler.sample_from_logprobs(logp, noise)
    freq = torch.bincount(tokens, minlength=3).double() / 20000
    # 4.5 standard errors of a binomial proportion at n = 20000 is < 0.016
    assert torch.allclose(freq, p.double(), atol=0.016), freq


# ------------------------------------------------------------------ model runner vs transformers
@pytest.mark.parametrize("arch,tie", [("qwen2", False), ("qwen2", True), ("llama", False)])
def test_runner_prefill_and_decode_match_hf(arch, tie):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tie=tie)).eval()
    runner = ModelRunner(model)
    runner.allocate_cache(num_blocks=12, block_size=4)
    seqs = [torch.randint(1, 97, (n,)) for n in (5, 9, 1)]
    Q = 9
    tokens = torch.zeros(3, Q, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = s
    tables = torch.tensor([[3, 7, 1], [5, 2, 9], [11, 0, 0]])  # blocks out of order; 0 pads (scratch)
    out = runner.forward(ForwardBatch(tokens, torch.arange(Q)[None].expand(3, Q), tables, torch.zeros(3, dtype=torch.long)))
    with torch.no_grad():
        for b, s in enumerate(seqs):
            ref = model(s[None]).logits[0]
            assert (out.logits[b, : len(s)] - ref).abs().max() < 1e-4
        nxt = torch.tensor([[7], [11], [13]])
        starts = torch.tensor([len(s) for s in seqs])
        out2 = runner.forward(ForwardBatch(nxt, starts[:, None], tables, starts))
        for b, s in enumerate(seqs):
            ref = model(torch.cat([s, nxt[b]])[None]).logits[0, -1]
            assert (out2.logits[b, 0] - ref).abs().max() < 1e-4


def test_attention_mask_tree_and_past():
    # one row, 2 past tokens, 3 new tokens forming a tree: 0 -> {1, 2}
    tree = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    batch = ForwardBatch(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[2, 3, 3]]), torch.tensor([[1]]),
                         torch.tensor([2]), tree)
    mask = attention_mask(batch, 5)[0, 0].int().tolist()
    assert mask == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]]
    # a region that starts before the new tokens: 2 tree nodes already cached at 2, 3; new nodes at 4, 5
    region = torch.tensor([[[1, 0, 1, 0], [0, 1, 0, 1]]], dtype=torch.bool)  # node 4 under 2, node 5 under 3
    batch = ForwardBatch(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[4, 4]]), torch.tensor([[1]]),
                         torch.tensor([4]), region, torch.tensor([2]))
    mask = attention_mask(batch, 6)[0, 0].int().tolist()
    assert mask == [[1, 1, 1, 0, 1, 0], [1, 1, 0, 1, 0, 1]]


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="not supported"):
        ModelRunner(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))


# ------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def tiny_engine():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    engine = Engine(ModelRunner(model), eos_token_ids=(0,), config=EngineConfig(max_running=3, max_prefill_tokens=16))
    yield engine, model
    engine.shutdown()


def _run(engine, prompts, n=1, **sampling):
    req = GenerationRequest("t", tuple(tuple(p) for p in prompts), n, Sampling(**sampling))
    return sorted(engine.submit(req), key=lambda r: (r.prompt_index, r.sample_index))


def test_continuous_batching_equals_each_prompt_alone(tiny_engine):
    engine, model = tiny_engine
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 7, 5, 9, 4, 12, 2)]
    together = _run(engine, prompts, temperature=0.0, max_new_tokens=16)  # 7 sequences through 3 slots
    for p, res in zip(prompts, together):
        alone = _run(engine, [p], temperature=0.0, max_new_tokens=16)[0]
        assert res.token_ids == alone.token_ids
        hf = model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=0, pad_token_id=0)
        assert res.token_ids == hf[0, len(p):].tolist()[: len(res.token_ids)]


def test_seeded_sampling_does_not_depend_on_batching(tiny_engine):
    engine, _ = tiny_engine
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    a = _run(engine, prompts, n=3, temperature=0.8, top_p=0.9, max_new_tokens=10, seed=7)
    b = _run(engine, prompts[:1], n=3, temperature=0.8, top_p=0.9, max_new_tokens=10, seed=7)
    assert [r.token_ids for r in a[:3]] == [r.token_ids for r in b]
    c = _run(engine, prompts[:1], n=3, temperature=0.8, top_p=0.9, max_new_tokens=10, seed=8)
    assert [r.token_ids for r in c] != [r.token_ids for r in b]


def test_engine_logprobs_equal_fresh_forward(tiny_engine):
    engine, model = tiny_engine
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    for temperature in (0.0, 1.0, 0.7):
        res = _run(engine, [prompt], temperature=temperature, max_new_tokens=12, seed=3)[0]
        full = torch.tensor([prompt + res.token_ids])
        with torch.no_grad():
            logits = model(full).logits[0, len(prompt) - 1 : -1].float()  # (T, V)
        t = temperature if temperature > 0 else 1.0
        ref = torch.log_softmax(logits / t, -1).gather(-1, torch.tensor(res.token_ids)[:, None])[:, 0]
        assert (ref - torch.tensor(res.logprobs)).abs().max() <= 1e-4


def test_stop_tokens_and_length(tiny_engine):
    engine, _ = tiny_engine
    free = _run(engine, [[1, 2, 3]], temperature=0.0, max_new_tokens=6, ignore_eos=True)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    stop_at = free.token_ids[2]
    stopped = _run(engine, [[1, 2, 3]], temperature=0.0, max_new_tokens=6, ignore_eos=True, stop_token_ids=(stop_at,))[0]
    first = free.token_ids.index(stop_at)
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]


def test_status_counts_sequences_while_they_prefill():
    """Sequences taken from the queue for this step's prefill are neither queued nor running yet;
    the engine's snapshot (GetStatus) must still count them. The step is held at its start."""
    import contextlib
    import threading

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    engine = Engine(ModelRunner(model), eos_token_ids=(0,), config=EngineConfig(max_running=4))
    entered, release = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def held_step():
        entered.set()
        release.wait(10)
        yield

    engine.set_step_turn(held_step)
    try:
        handle = engine.submit(GenerationRequest("t", ((1, 2), (3, 4), (5, 6)), 1, Sampling(max_new_tokens=2)))
        assert entered.wait(10)  # the 3 sequences are admitted; their prefill waits
        assert engine.snapshot()["running"] + engine.snapshot()["queued"] == 3
        release.set()
        assert len(list(handle)) == 3
    finally:
        release.set()
        engine.shutdown()
