"""Sync-free, compiled decode steps: counter-based sampling noise, one graph per batch bucket, one
device-to-host transfer per step, and the engine's outputs unchanged with the compiler on."""
from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from fastgrpo.rollout.runtime import sampler
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.runtime.steps import CPU_COMPILED_BATCH, DecodeStep, bucket, compiled_batch, to_host_rows
from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
from fastgrpo.rollout.scheduler.requests import GenerationRequest
from fastgrpo.wire.records import Sampling

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ pure functions
def test_buckets_and_what_each_compile_mode_compiles():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert bucket(5, cap=6) == 6 and bucket(7, cap=6) == 7  # capped, never below n
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compiled_batch("auto", cpu, 64) == 0 and compiled_batch("off", cuda, 64) == 0
    assert compiled_batch("auto", cuda, 64) == 64 and compiled_batch("on", cpu, 64) == CPU_COMPILED_BATCH
    with pytest.raises(ValueError, match="--compile must be one of"):
        compiled_batch("yes", cpu, 64)


def test_counter_uniforms_depend_on_seed_counter_and_index_only():
    seeds = torch.tensor([7, 2**62 + 5, 7, 0])
    counters = torch.tensor([0, 0, 1, 3])
    u = sampler.counter_uniforms(seeds, counters, 1000)  # (4, 1000)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    # row 0 alone, or in another batch, gets the same numbers; another counter or seed others
    assert torch.equal(sampler.counter_uniforms(seeds[:1], counters[:1], 1000), u[:1])
    assert torch.equal(sampler.counter_uniforms(seeds.flip(0), counters.flip(0), 1000).flip(0), u)
    assert not torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    # uniform: chi-square over 20 bins of 200k draws (19 dof; 43.8 is the 0.001 quantile)
    many = sampler.counter_uniforms(torch.arange(200), torch.zeros(200, dtype=torch.long), 1000).flatten()
    counts = torch.histc(many.float(), bins=20, min=0, max=1)
    expected = many.numel() / 20
    assert float(((counts - expected) ** 2 / expected).sum()) < 43.8
    # neighbouring counters are not correlated
    a = sampler.counter_uniforms(torch.full((1,), 3), torch.tensor([10]), 100_000)[0]
    b = sampler.counter_uniforms(torch.full((1,), 3), torch.tensor([11]), 100_000)[0]
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 4 / math.sqrt(100_000)


def test_sample_no_sync_draws_the_sampling_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    params = sampler.SamplingBatch(torch.tensor([0.8]), torch.tensor([0]), torch.tensor([0.9]))
    n = 40_000
    tokens, logp = sampler.sample_no_sync(logits.expand(n, 12), params.repeat_rows(n),
                                          torch.full((n,), 11), torch.arange(n), truncate=True)
    p = sampler.sampling_logprobs(logits, params, True).exp()[0]  # (12,)
    counts = torch.bincount(tokens, minlength=12).double()
    support = p > 0
    assert counts[~support].sum() == 0  # nothing outside the nucleus
    expected = n * p[support].double()
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 31.3  # chi-square, at most 11 dof, 0.001 level
    # the logprob returned is the untruncated policy's, softmax(logits / T)
    assert torch.allclose(logp, sampler.policy_logprobs(logits, torch.tensor([0.8]))[0, tokens])
    greedy = sampler.SamplingBatch(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3))
    top, _ = sampler.sample_no_sync(logits.expand(3, 12), greedy, torch.arange(3), torch.arange(3), truncate=False)
    assert top.tolist() == [int(logits.argmax())] * 3


# ------------------------------------------------------------------ the step, compiled
# (inductor compiles its C++ kernels in subprocesses: these are system tests)
class HostReads(TorchFunctionMode):
    """Counts the ways Python reads a tensor's values (each a device-to-host transfer and a wait on a
    GPU). On the CPU `.to(device)` cannot tell the step's inputs going up from outputs coming back,
    so it is left out: a step's outputs reach Python only through a read."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "__array__", "cpu",
             "__repr__", "__format__"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("qwen2", layers=2)).eval()


@pytest.mark.system
def test_decode_step_compiles_once_per_batch_bucket_and_matches_eager(tiny_model):
    from torch._dynamo.utils import counters

    runner = ModelRunner(tiny_model)
    runner.allocate_cache(num_blocks=1 + 8 * 8, block_size=4)
    step = DecodeStep(runner, compiled_batch=8, max_batch=8)
    eager = DecodeStep(runner, compiled_batch=0, max_batch=8)
    g = torch.Generator().manual_seed(0)
    tables = [list(range(1 + 8 * b, 9 + 8 * b)) for b in range(8)]  # 8 blocks (32 tokens) per sequence
    lens = [2 + b for b in range(8)]
    params = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 0.9), (1.0, 0, 1.0)] * 2
    before = counters["stats"]["unique_graphs"]
    for i in range(20):  # the batch changes within the bucket of 8, the contexts grow past a block bucket
        B = 5 + i % 4
        tokens = torch.randint(1, 97, (B,), generator=g).tolist()
        args = (tokens, lens[:B], tables[:B], params[:B], list(range(100, 100 + B)), [i] * B)
        out = step(*args)
        ref = eager(*args)  # rewrites the same keys and values
        assert torch.equal(out.tokens, ref.tokens)
        assert (out.logprobs - ref.logprobs).abs().max() <= 1e-4
        assert (out.hidden - ref.hidden).abs().max() <= 1e-4
        for b in range(B):
            lens[b] += 1
    # the first call compiled the bucket's graph (fullgraph: a graph break would have raised); no
    # later step compiled another
    assert counters["stats"]["unique_graphs"] == before + 1
    assert 16 < max(lens) <= 32  # past the table bucket of 4 blocks (a symbolic size, not a recompile)


def _engine(model, mode: str):
    engine = Engine(ModelRunner(model), (0,), EngineConfig(max_running=4, compile=mode))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def eager_engine(tiny_model):
    yield from _engine(tiny_model, "off")


@pytest.fixture(scope="module")
def compiled_engine(tiny_model):
    """The same model with the compiler on (on the CPU: the batches up to 4)."""
    yield from _engine(tiny_model, "on")


@pytest.mark.parametrize("engine_fixture", ["eager_engine", pytest.param("compiled_engine", marks=pytest.mark.system)])
def test_an_engine_decode_step_reads_the_device_once(request, engine_fixture):
    engine = request.getfixturevalue(engine_fixture)
    reads: list[list[str]] = []
    decode = engine._decode

    def counted(seqs):
        with HostReads() as mode:
            decode(seqs)
        reads.append(mode.reads)

    engine._decode = counted
    try:
        req = GenerationRequest("t", ((1, 2, 3), (4, 5)), 2, Sampling(temperature=1.0, top_p=0.9, max_new_tokens=8,
                                                                       seed=1, ignore_eos=True))
        assert all(len(r.token_ids) == 8 for r in engine.submit(req))
    finally:
        del engine._decode  # the method again
    assert len(reads) >= 7 and all(r == ["tolist"] for r in reads), reads


# ------------------------------------------------------------------ outputs unchanged
def _run(engine, prompts, n=1, **sampling):
    req = GenerationRequest("t", tuple(tuple(p) for p in prompts), n, Sampling(**sampling))
    return sorted(engine.submit(req), key=lambda r: (r.prompt_index, r.sample_index))


@pytest.mark.system
def test_compiled_engine_outputs_equal_eager_and_a_fresh_forward(tiny_model, eager_engine, compiled_engine):
    engines = {"off": eager_engine, "on": compiled_engine}
    assert engines["on"].decode_step.compiled_batch == 4 and engines["off"].decode_step.compiled_batch == 0
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 7, 5, 9, 4, 12)]
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 5}, {"temperature": 0.7, "top_p": 0.9, "seed": 6}):
        out = {mode: _run(e, prompts, n=2, max_new_tokens=16, **sampling) for mode, e in engines.items()}
        assert [r.token_ids for r in out["on"]] == [r.token_ids for r in out["off"]], sampling
        for p, res in zip([p for p in prompts for _ in range(2)], out["on"]):
            full = torch.tensor([p + res.token_ids])
            with torch.no_grad():
                logits = tiny_model(full).logits[0, len(p) - 1: -1].float()  # (T, V)
            t = sampling["temperature"] or 1.0
            ref = torch.log_softmax(logits / t, -1).gather(-1, torch.tensor(res.token_ids)[:, None])[:, 0]
            assert (ref - torch.tensor(res.logprobs)).abs().max() <= 1e-4
    greedy = _run(engines["on"], prompts[:1], max_new_tokens=16, temperature=0.0)[0]
    hf = tiny_model.generate(torch.tensor(prompts[:1]), max_new_tokens=16, do_sample=False, eos_token_id=0,
                             pad_token_id=0)
    assert greedy.token_ids == hf[0, len(prompts[0]):].tolist()[: len(greedy.token_ids)]


def test_to_host_rows_puts_each_rows_columns_side_by_side():
    assert to_host_rows(torch.tensor([3, 4]), torch.tensor([-0.5, -1.25])) == [[3.0, -0.5], [4.0, -1.25]]
    assert to_host_rows(torch.tensor([1, 2]), torch.tensor([[5, 6], [7, 8]])) == [[1.0, 5.0, 6.0], [2.0, 7.0, 8.0]]


@pytest.mark.system
def test_a_compiled_profile_times_every_count_on_one_graph(tiny_model):
    from torch._dynamo.utils import counters

    from fastgrpo.rollout.speculative.calibration import Calibration, profile

    runner = ModelRunner(tiny_model, headroom=64)
    before = counters["stats"]["unique_graphs"]
    points = profile(runner, [2, 3, 4, 6, 8, 11, 16, 23, 32], context=20, repeats=2, compiled=True)
    assert [t for t, _ in points] == [2, 3, 4, 6, 8, 11, 16, 23, 32] and all(s > 0 for _, s in points)
    # the token count is a symbolic size: one graph whatever the counts (a symbolic row count
    # is never specialised into multiply-reduce projections: runtime.layers.project)
    assert counters["stats"]["unique_graphs"] == before + 1
    cal = Calibration(8.0, "m", "cpu", "float32", points, compiled=True)
    assert cal.key() == "m|cpu|float32|compiled" != Calibration(8.0, "m", "cpu", "float32").key()


# ------------------------------------------------------------------ speculative steps
@pytest.mark.system
def test_draft_and_verify_steps_compile_once_per_batch_bucket_and_match_eager(tiny_model):
    """A mixed batch (greedy, sampled, top-k/top-p rows), its size changing within the bucket of 8,
    contexts growing, and the pending pairs a catch-up reads changing in number: the draft and the
    verify step are one graph each, and give what the same functions give eagerly. (Recursive
    rejection sampling, the default; each graph compiles in about half a minute here.)"""
    rule = "rrs"
    from torch._dynamo.utils import counters

    from fastgrpo.rollout.speculative.draft_head import DraftHead
    from fastgrpo.rollout.speculative.draft_runner import Drafter
    from fastgrpo.rollout.speculative.spec_step import SpecDecoder, SpecState
    from fastgrpo.rollout.speculative.tree import TreeShape

    runner = ModelRunner(tiny_model, headroom=32)
    runner.allocate_cache(num_blocks=1 + 8 * 16, block_size=4)
    drafter = Drafter(DraftHead.for_target(tiny_model))
    drafter.allocate_cache(num_blocks=1 + 8 * 16, block_size=4)
    compiled = SpecDecoder(runner, drafter, rule, compiled_batch=8, max_batch=8)
    eager = SpecDecoder(runner, drafter, rule, compiled_batch=0, max_batch=8)
    shape = TreeShape(width=3, depth=3, n_verify=8)
    g = torch.Generator().manual_seed(0)
    tables = [list(range(1 + 16 * b, 17 + 16 * b)) for b in range(8)]  # 16 blocks (64 tokens) per sequence
    lens = [4 + b for b in range(8)]
    params = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 0.9), (1.0, 0, 1.0)] * 2
    before = counters["stats"]["unique_graphs"]
    accepted = 0
    for i in range(20):
        B = 5 + i % 4
        pending = [1 + (i + b) % 4 for b in range(B)]
        toks = [torch.randint(1, 97, (n,), generator=g).tolist() for n in pending]
        feats = [torch.randn(n, 64, generator=g) for n in pending]
        args = (torch.randint(1, 97, (B,), generator=g).tolist(), lens[:B], tables[:B])
        noise = (params[:B], list(range(100, 100 + B)), [i] * B, shape)
        states = [SpecState(list(t), [f]) for t, f in zip(toks, feats)]
        out = compiled.step(*args, states, *noise)
        ref = eager.step(*args, [SpecState(list(t), [f]) for t, f in zip(toks, feats)], *noise)  # rewrites the same
        assert [o.tokens for o in out] == [r.tokens for r in ref] and [o.depth for o in out] == [r.depth for r in ref]
        assert max(abs(a - b) for o, r in zip(out, ref) for a, b in zip(o.logprobs, r.logprobs)) <= 1e-4
        # the draft's next catch-up reads the accepted path's target features
        assert all(s.pending_tokens == o.tokens and s.pending_features.shape == (len(o.tokens), 64)
                   for s, o in zip(states, out))
        accepted += sum(o.accepted for o in out)
        for b in range(B):
            lens[b] += 1
    assert counters["stats"]["unique_graphs"] == before + 2  # draft and verify, compiled once
    assert 32 < max(lens) + shape.n_verify <= 64  # the tables' bucket grew past 8 blocks
    assert accepted > 0


@pytest.mark.system
def test_compiled_steps_with_text_chains_attached_match_eager(tiny_model, monkeypatch):
    """Text chains joining sampled (drawn) trees as lead children, and merging into greedy ones,
    inside the compiled draft and verify steps (fullgraph): the same tokens and logprobs as the
    same functions eagerly. The chains take 3 places every step here (how many they take is the
    host's choice, outside the graphs)."""
    from fastgrpo.rollout.speculative.draft_head import DraftHead
    from fastgrpo.rollout.speculative.draft_runner import Drafter
    from fastgrpo.rollout.speculative.spec_step import SpecDecoder, SpecState
    from fastgrpo.rollout.speculative.text_drafts import Proposal
    from fastgrpo.rollout.speculative.tree import TreeShape

    monkeypatch.setattr(SpecDecoder, "_chain_places", lambda self, chains, shape: (3, 1.0))
    runner = ModelRunner(tiny_model, headroom=32)
    runner.allocate_cache(num_blocks=1 + 8 * 16, block_size=4)
    drafter = Drafter(DraftHead.for_target(tiny_model))
    drafter.allocate_cache(num_blocks=1 + 8 * 16, block_size=4)
    compiled = SpecDecoder(runner, drafter, "rrs", compiled_batch=8, max_batch=8)
    eager = SpecDecoder(runner, drafter, "rrs", compiled_batch=0, max_batch=8)
    shape = TreeShape(width=3, depth=3, n_verify=8)
    g = torch.Generator().manual_seed(1)
    tables = [list(range(1 + 16 * b, 17 + 16 * b)) for b in range(8)]
    lens = [4 + b for b in range(8)]
    for i in range(8):
        B = 5 + i % 4
        greedy = i % 4 == 3  # (an all-greedy batch: top-K trees, the chains merged into them)
        params = [(0.0, 0, 1.0)] * B if greedy else [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 0.9), (1.0, 0, 1.0)] * 2
        pending = [1 + (i + b) % 4 for b in range(B)]
        toks = [torch.randint(1, 97, (n,), generator=g).tolist() for n in pending]
        feats = [torch.randn(n, 64, generator=g) for n in pending]
        chains = [None if b % 3 == 0 else Proposal(tuple(torch.randint(1, 97, (4,), generator=g).tolist()),
                                                   (0.9, 0.9, 0.8, 0.5), "history") for b in range(B)]
        args = (torch.randint(1, 97, (B,), generator=g).tolist(), lens[:B], tables[:B])
        noise = (params[:B], list(range(100, 100 + B)), [i] * B, shape)
        out = compiled.step(*args, [SpecState(list(t), [f]) for t, f in zip(toks, feats)], *noise, chains=chains)
        ref = eager.step(*args, [SpecState(list(t), [f]) for t, f in zip(toks, feats)], *noise, chains=chains)
        assert [o.tokens for o in out] == [r.tokens for r in ref]
        assert max(abs(a - b) for o, r in zip(out, ref) for a, b in zip(o.logprobs, r.logprobs)) <= 1e-4
        for b in range(B):
            lens[b] += 1
    assert compiled.accepted_by_source == eager.accepted_by_source


@pytest.fixture(scope="module")
def spec_engines():
    """Speculative engines on test_speculative's five-token model (so the chi-square test can
    enumerate every outcome) with one random draft head: eager, and compiled. One sequence at a
    time: each compiled graph costs about half a minute here, and a batch of 1 has its own."""
    from test_speculative import V_SMALL

    from fastgrpo.rollout.speculative.controller import SpecController
    from fastgrpo.rollout.speculative.draft_head import DraftHead
    from fastgrpo.rollout.speculative.draft_runner import Drafter
    from fastgrpo.rollout.speculative.tree import TreeShape

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", vocab_size=V_SMALL)).eval()
    with torch.no_grad():  # (as test_speculative's: trees get accepted often)
        model.lm_head.weight.mul_(4.0)
    engines = {}
    for mode in ("off", "on"):
        controller = SpecController("static", static_tree=TreeShape(width=2, depth=3, n_verify=7), verify="rrs")
        torch.manual_seed(0)
        engines[mode] = Engine(ModelRunner(model, headroom=controller.max_nodes()), (0,),
                               EngineConfig(max_running=1, max_queued=10_000, compile=mode),
                               Drafter(DraftHead.for_target(model)), controller)
    assert engines["on"].spec.compiled_batch == 1 and engines["off"].spec.compiled_batch == 0
    yield model, engines
    for engine in engines.values():
        engine.shutdown()


@pytest.mark.parametrize("mode", ["off", pytest.param("on", marks=pytest.mark.system)])
def test_a_speculative_step_reads_the_device_once(spec_engines, mode):
    engine = spec_engines[1][mode]
    reads: list[list[str]] = []
    spec_decode = engine._spec_decode

    def counted(seqs, tree, adaptive):
        with HostReads() as reader:
            out = spec_decode(seqs, tree, adaptive)
        reads.append(reader.reads)
        return out

    engine._spec_decode = counted
    try:
        req = GenerationRequest("t", ((1, 2, 3), (4, 1)), 2, Sampling(temperature=1.0, max_new_tokens=12, seed=1,
                                                                       ignore_eos=True))
        assert all(len(r.token_ids) == 12 for r in engine.submit(req))
    finally:
        del engine._spec_decode
    assert len(reads) >= 4 and all(r == ["tolist"] for r in reads), reads


@pytest.mark.system
def test_compiled_speculative_engine_is_exact(spec_engines):
    """Compiled speculative decoding: greedy token-identical to plain decoding (HF generate),
    seeded samples equal the eager speculative engine's, logprobs equal a fresh forward."""
    model, engines = spec_engines
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 5, (n,), generator=g).tolist() for n in (3, 7, 5, 9)]
    greedy = _run(engines["on"], prompts, max_new_tokens=24, temperature=0.0, ignore_eos=True)
    assert sum(r.spec.verify_steps for r in greedy) > 0
    for p, r in zip(prompts, greedy):
        hf = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert r.token_ids == hf[0, len(p):].tolist()
    sampling = {"temperature": 1.0, "seed": 5, "ignore_eos": True}
    out = {mode: _run(e, prompts, n=2, max_new_tokens=16, **sampling) for mode, e in engines.items()}
    assert [r.token_ids for r in out["on"]] == [r.token_ids for r in out["off"]]
    for p, res in zip([p for p in prompts for _ in range(2)], out["on"]):
        full = torch.tensor([p + res.token_ids])
        with torch.no_grad():
            logits = model(full).logits[0, len(p) - 1: -1].float()  # (T, V)
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(res.token_ids)[:, None])[:, 0]
        assert (ref - torch.tensor(res.logprobs)).abs().max() <= 1e-4


@pytest.mark.system
def test_compiled_speculative_sampling_matches_plain_distribution(spec_engines):
    """test_speculative's chi-square test with the draft and verify steps compiled: the first three
    tokens of 6000 samples (rrs: children drawn from the draft) against plain sampling."""
    from test_speculative import ALPHA, N_SAMPLES, _chi2_pvalue, _exact_first3, _sd_first3_counts

    model, engines = spec_engines
    counts, accepted = _sd_first3_counts(engines["on"], 1.0, 1.0)
    assert accepted > N_SAMPLES // 4  # the draft tree really was used
    assert _chi2_pvalue(counts, _exact_first3(model, 1.0, 1.0), N_SAMPLES) > ALPHA
