"""Speculative decoding: tree math by hand, and losslessness end to end (greedy, logprobs, sampling)."""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from fastgrpo.rollout.controller import SpecPolicy
from fastgrpo.rollout.engine import sampler
from fastgrpo.rollout.engine.engine import Engine, EngineConfig
from fastgrpo.rollout.engine.model_runner import ModelRunner
from fastgrpo.rollout.engine.types import GenerationRequest, SamplingConfig
from fastgrpo.rollout.speculative import decode as spec_decode
from fastgrpo.rollout.speculative.draft import DraftHead
from fastgrpo.rollout.speculative.drafter import Drafter, TreeShape
from fastgrpo.rollout.speculative.tree import ancestor_mask, expand_level, select_tree
from fastgrpo.rollout.speculative.verify import accept_path, sample_inverse_cdf


# ------------------------------------------------------------------ tree math by hand
def test_ancestor_mask_by_hand():
    # 0 -> 1 -> 3 ; 0 -> 2
    parents = torch.tensor([[0, 0, 0, 1]])
    anc = ancestor_mask(parents, max_depth=2)[0].int().tolist()
    assert anc == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]


def test_expand_level_keeps_best_cumulative():
    level_scores = torch.log(torch.tensor([[0.6, 0.3]]))
    child = torch.log(torch.tensor([[[0.5, 0.4, 0.1], [0.9, 0.05, 0.05]]]))
    ex = expand_level(level_scores, child, 2)
    # every node proposes its top 2: (p0,t0) .30, (p0,t1) .24, (p1,t0) .27, (p1,t1|t2) .015
    assert ex.tokens[0, :3].tolist() == [0, 1, 0] and ex.parent_slot.tolist() == [[0, 0, 1, 1]]
    assert torch.allclose(ex.scores.exp()[0, :3], torch.tensor([0.30, 0.24, 0.27]))
    # the next level keeps .30 and .27
    assert ex.keep.tolist() == [[0, 2]]


def test_select_tree_keeps_best_nodes_closed_under_ancestors():
    # candidates (topological): c0=tok5 (root child, .5), c1=tok6 (root child, .3),
    # c2=tok7 (child of c0, .45), c3=tok8 (child of c1, .05)
    tree = select_tree(
        root=torch.tensor([9]),
        cand_tokens=torch.tensor([[5, 6, 7, 8]]),
        cand_parents=torch.tensor([[-1, -1, 0, 1]]),
        cand_scores=torch.log(torch.tensor([[0.5, 0.3, 0.45, 0.05]])),
        cand_depths=torch.tensor([[1, 1, 2, 2]]),
        n_nodes=4,
    )
    assert tree.tokens.tolist() == [[9, 5, 6, 7]]
    assert tree.parents.tolist() == [[0, 0, 0, 1]]
    assert tree.depths.tolist() == [[0, 1, 1, 2]]


def _hand_tree():
    # root 9 -> {5 (node 1), 6 (node 2)}; 5 -> 7 (node 3)
    tokens = torch.tensor([[9, 5, 6, 7]])
    parents = torch.tensor([[0, 0, 0, 1]])
    from fastgrpo.rollout.speculative.tree import DraftTree

    return DraftTree(tokens, parents, torch.tensor([[0, 1, 1, 2]]), ancestor_mask(parents, 2))


@pytest.mark.parametrize(
    "targets,accepted,emitted",
    [
        ([5, 7, 0, 3], 2, [5, 7, 3]),  # root draws 5 -> node 1 draws 7 -> node 3 draws 3 (bonus)
        ([6, 7, 1, 3], 1, [6, 1]),  # root draws 6 -> node 2 draws 1 (bonus)
        ([4, 7, 1, 3], 0, [4]),  # root draws 4: no child, 4 is the bonus
        ([5, 2, 1, 3], 1, [5, 2]),  # node 1 draws 2, its child is 7: bonus 2
    ],
)
def test_accept_path_by_hand(targets, accepted, emitted):
    res = accept_path(_hand_tree(), torch.tensor([targets]))
    assert int(res.accepted[0]) == accepted
    assert res.tokens[0, : accepted + 1].tolist() == emitted


def test_inverse_cdf_sampling_hits_only_positive_mass():
    logp = torch.log(torch.tensor([[0.0, 0.5, 0.0, 0.5]]))
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.99])
    toks = sample_inverse_cdf(logp.expand(5, 4), u)
    assert toks.tolist() == [1, 1, 1, 3, 3]


# ------------------------------------------------------------------ end to end
def _engines(model, shape, slots=8, head=None):
    plain = Engine(ModelRunner(model, slots), (0,), EngineConfig(max_running=slots))
    policy = SpecPolicy("static", static_tree=shape)
    runner = ModelRunner(model, slots, headroom=policy.max_nodes())
    head = head or DraftHead.for_target(model)
    drafter = Drafter(head, slots, runner.cache.max_len + policy.draft_headroom())
    return plain, Engine(runner, (0,), EngineConfig(max_running=slots), drafter, policy)


def _run(engine, prompts, n=1, **s):
    req = GenerationRequest("t", tuple(tuple(p) for p in prompts), n, SamplingConfig(**s))
    return sorted(engine.submit(req), key=lambda r: (r.prompt_index, r.sample_index))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_sd_is_token_identical_random_models(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    plain, spec = _engines(model, TreeShape(width=4, depth=4, n_verify=12))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 20, (50,), generator=g)]
    a = _run(plain, prompts, temperature=0.0, max_new_tokens=40)
    b = _run(spec, prompts, temperature=0.0, max_new_tokens=40)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert all(y.spec.verify_steps > 0 for y in b if len(y.token_ids) > 1)
    for x, y in zip(a, b):
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) <= 1e-4
    plain.shutdown()
    spec.shutdown()


def test_sd_logprobs_equal_fresh_forward():
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    plain, spec = _engines(model, TreeShape(width=3, depth=3, n_verify=8))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (0.7, 0.95)):
        res = _run(spec, [prompt], n=3, temperature=temperature, top_p=top_p, max_new_tokens=24, seed=5)
        for r in res:
            full = torch.tensor([prompt + r.token_ids])
            with torch.no_grad():
                logits = model(full).logits[0, len(prompt) - 1 : -1].float()
            t = temperature or 1.0
            ref = torch.log_softmax(logits / t, -1).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
            assert (ref - torch.tensor(r.logprobs)).abs().max() <= 1e-4
    plain.shutdown()
    spec.shutdown()


# ------------------------------------------------------------------ sampling is exact in distribution
V_SMALL = 5
PROMPT = [1, 2, 3]
N_SAMPLES = 6000
ALPHA = 1e-3  # significance level of the goodness-of-fit test (fixed seeds: the outcome is fixed)


def _exact_first3(model, temperature, top_p) -> dict[tuple[int, ...], float]:
    """P(x1, x2, x3 | prompt) under plain sampling, by enumerating every prefix."""
    params = sampler.SamplingBatch(torch.tensor([temperature]), torch.tensor([-1]), torch.tensor([top_p]))
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(V_SMALL), repeat=2):
            ids = torch.tensor([PROMPT + list(seq)])
            logits = model(ids).logits[0, -3:].float()  # predicts x1, x2, x3
            lp = sampler.sampling_logprobs(logits, sampler.SamplingBatch(
                params.temperature.expand(3), params.top_k.expand(3), params.top_p.expand(3))).double().exp()
            for x3 in range(V_SMALL):
                probs[(seq[0], seq[1], x3)] = float(lp[0, seq[0]] * lp[1, seq[1]] * lp[2, x3])
    return probs


def _chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    from scipy.stats import chi2

    # pool cells with expected count < 5 into one
    stat, dof, pooled_obs, pooled_exp = 0.0, -1, 0.0, 0.0
    for cell, p in probs.items():
        e, o = p * n, counts.get(cell, 0)
        if e < 5:
            pooled_obs += o
            pooled_exp += e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        dof += 1
    return float(chi2.sf(stat, dof))


def _sd_first3_counts(spec, temperature, top_p):
    res = _run(spec, [PROMPT], n=N_SAMPLES, temperature=temperature, top_p=top_p, max_new_tokens=3,
               ignore_eos=True, seed=1234)
    counts = {}
    for r in res:
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    return counts, sum(r.spec.accepted for r in res)


@pytest.fixture(scope="module")
def small_vocab_engines():
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", vocab_size=V_SMALL)).eval()
    with torch.no_grad():  # sharpen the random logits a little so trees get accepted often
        model.lm_head.weight.mul_(4.0)
    plain, spec = _engines(model, TreeShape(width=2, depth=3, n_verify=6), slots=128)
    plain.shutdown()
    yield model, spec
    spec.shutdown()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.95)])
def test_sd_sampling_matches_plain_distribution(small_vocab_engines, temperature, top_p):
    model, spec = small_vocab_engines
    counts, accepted = _sd_first3_counts(spec, temperature, top_p)
    assert accepted > N_SAMPLES // 4  # the draft tree really was used
    p = _chi2_pvalue(counts, _exact_first3(model, temperature, top_p), N_SAMPLES)
    assert p > ALPHA, f"SD first-3-token distribution differs from plain sampling (p = {p:.2e})"


def test_chi2_detects_a_broken_acceptance_rule(small_vocab_engines, monkeypatch):
    """Guard for the test above: accepting a child when it is the target's *argmax* (not a sample)
    is biased, and the same goodness-of-fit test must reject it."""
    model, spec = small_vocab_engines

    def biased(tree, logp, uniforms):
        return accept_path(tree, logp.argmax(-1))  # greedy matching under a sampling request

    monkeypatch.setattr(spec_decode, "verify_sampled", biased)
    counts, _ = _sd_first3_counts(spec, 1.0, 1.0)
    p = _chi2_pvalue(counts, _exact_first3(model, 1.0, 1.0), N_SAMPLES)
    assert p < ALPHA
