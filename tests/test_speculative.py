"""Speculative decoding: tree math by hand, and losslessness end to end (greedy, logprobs, sampling)."""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from fastgrpo.rollout.speculative.controller import SpecController
from fastgrpo.rollout.runtime import sampler
from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.scheduler.requests import GenerationRequest
from fastgrpo.wire.records import Sampling
from fastgrpo.rollout.speculative import spec_step as spec_decode
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.draft_runner import Drafter
from fastgrpo.rollout.speculative.tree import TreeShape
from fastgrpo.rollout.speculative import draft_runner as spec_drafter
from fastgrpo.rollout.speculative.tree import (ancestor_mask, children_table, draw_without_replacement, expand_level,
                                               pick_children, select_tree)
from fastgrpo.rollout.runtime.sampler import sample_inverse_cdf
from fastgrpo.rollout.speculative.verify import accept_path, verify_rrs

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------ tree math by hand
def test_ancestor_mask_by_hand():
    # 0 -> 1 -> 3 ; 0 -> 2
    parents = torch.tensor([[0, 0, 0, 1]])
    anc = ancestor_mask(parents, max_depth=2)[0].int().tolist()
    assert anc == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]


def test_expand_level_keeps_best_cumulative():
    level_scores = torch.log(torch.tensor([[0.6, 0.3]]))
    child = torch.log(torch.tensor([[[0.5, 0.4, 0.1], [0.9, 0.05, 0.05]]]))
    ex = expand_level(level_scores, *pick_children(child, 2), n_expand=2)
    # every node proposes its top 2: (p0,t0) .30, (p0,t1) .24, (p1,t0) .27, (p1,t1|t2) .015
    assert ex.tokens[0, :3].tolist() == [0, 1, 0] and ex.parent_slot.tolist() == [[0, 0, 1, 1]]
    assert torch.allclose(ex.scores.exp()[0, :3], torch.tensor([0.30, 0.24, 0.27]))
    # the next level keeps .30 and .27
    assert ex.keep.tolist() == [[0, 2]]


def test_sampled_layout_fits_the_budget():
    # N=20, K=4, L=6: 19 nodes over 6 levels -> k = 19 // 6 = 3; 16 left over 5 levels -> E = 1;
    # L' = 1 + 16 // 3 = 6: 3 + 5*3 = 18 nodes
    assert TreeShape(4, 6, 20).sampled_layout() == (3, 1, 6)
    # N=31, K=3, L=4: k = 3 (capped at K); 27 over 3 levels -> 9 per level -> E = 3: 3 + 3*9 = 30
    assert TreeShape(3, 4, 31).sampled_layout() == (3, 3, 4)
    # small budgets go deep, not wide: N=4 (K=3, L=3) is a chain of 3; N=3 a chain of 2
    assert TreeShape(3, 3, 4).sampled_layout() == (1, 1, 3)
    assert TreeShape(4, 5, 3).sampled_layout() == (1, 1, 2)
    assert TreeShape(1, 7, 8).sampled_layout() == (1, 1, 7)
    for shape in (TreeShape(4, 6, 20), TreeShape(3, 4, 31), TreeShape(2, 5, 8), TreeShape(8, 5, 72), TreeShape(5, 3, 6)):
        k, e, depth = shape.sampled_layout()
        assert k + (depth - 1) * e * k <= shape.n_verify - 1


def test_draw_without_replacement_order_and_exhaustion():
    logq = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))
    # u=0.55 of 1.0 -> token 1 (cdf .5, .8); then of {0: .5, 2: .2} u=0.9*.7=.63 -> token 2; then token 0
    assert draw_without_replacement(logq, 3, torch.tensor([0.55, 0.9, 0.1])).tolist() == [1, 2, 0]
    # a fourth draw finds no mass left: it repeats the third, and pick_children gives it q = 0
    toks, lq = pick_children(logq.view(1, 1, 4), 4, torch.tensor([[[0.55, 0.9, 0.1, 0.3]]]), torch.tensor([True]))
    assert toks.tolist() == [[[1, 2, 0, 0]]] and lq[0, 0, 3] == float("-inf")
    # greedy rows take the top-k whatever the uniforms
    toks, _ = pick_children(logq.view(1, 1, 4), 2, torch.tensor([[[0.55, 0.9]]]), torch.tensor([False]))
    assert toks.tolist() == [[[0, 1]]]


def test_children_table_in_index_order():
    parents = torch.tensor([[0, 0, 0, 1, 1, 2]])
    table = children_table(parents, torch.tensor([[True, True, True, True, False, True]]), 2)
    assert table.tolist() == [[[1, 2], [3, -1], [5, -1], [-1, -1], [-1, -1], [-1, -1]]]
    # room for more children than any node has: the columns past them stay -1
    assert children_table(parents, torch.ones(1, 6, dtype=torch.bool), 3).tolist() == [
        [[1, 2, -1], [3, 4, -1], [5, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]]


def _one_level_rrs(p, q, k, rows, seed):
    """The first emitted token of `rows` independent RRS rounds: k children of the root drawn from q
    without replacement, verified against p. Returns counts per token."""
    g = torch.Generator().manual_seed(seed)
    V = p.shape[0]
    logq = q.log().expand(rows, 1, V)
    toks, lq = pick_children(logq, k, torch.rand(rows, 1, k, generator=g, dtype=torch.float64),
                             torch.ones(rows, dtype=torch.bool))
    tree = select_tree(torch.zeros(rows, dtype=torch.long), toks[:, 0], torch.full((rows, k), -1),
                       torch.zeros(rows, k), torch.ones(rows, k, dtype=torch.long), k + 1, 1)
    candidate = torch.cat([torch.ones(rows, 1, dtype=torch.bool), lq[:, 0] > float("-inf")], 1)
    N = k + 1
    logp = p.log().expand(rows, N, V)
    node_q = q.log().expand(rows, N, V)
    res = verify_rrs(tree, logp, node_q, candidate, torch.rand(rows, 2, k + 1, generator=g, dtype=torch.float64), 1, k)
    return torch.bincount(res.tokens[:, 0], minlength=V), res.accepted


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rrs_emits_exactly_the_target_distribution(k):
    """One node, pure tensors: 40000 rounds; chi-square against p at significance 1e-3 (fixed seeds)."""
    from scipy.stats import chisquare

    p = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2], dtype=torch.float64)
    counts, accepted = _one_level_rrs(p, q, k, 40000, seed=k)
    assert chisquare(counts.double().numpy(), (p * 40000).numpy()).pvalue > 1e-3
    # more children accept more often: P(accept) = 1 - prod of the residual masses (k=1: sum min(p, q) = .65)
    if k == 1:
        assert abs(accepted.double().mean().item() - float(torch.minimum(p, q).sum())) < 0.01


def test_rrs_on_deterministic_children_is_biased():
    """The common bug DESIGN warns about: the p/q test on top-K children. The same check must fail."""
    from scipy.stats import chisquare

    p = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2], dtype=torch.float64)
    rows, V = 40000, 5
    g = torch.Generator().manual_seed(9)
    toks, _ = pick_children(q.log().expand(rows, 1, V), 2)  # top-2 of q, not drawn
    tree = select_tree(torch.zeros(rows, dtype=torch.long), toks[:, 0], torch.full((rows, 2), -1),
                       torch.zeros(rows, 2), torch.ones(rows, 2, dtype=torch.long), 3, 1)
    res = verify_rrs(tree, p.log().expand(rows, 3, V), q.log().expand(rows, 3, V), torch.ones(rows, 3, dtype=torch.bool),
                     torch.rand(rows, 2, 3, generator=g, dtype=torch.float64), 1, 2)
    counts = torch.bincount(res.tokens[:, 0], minlength=V)
    assert chisquare(counts.double().numpy(), (p * rows).numpy()).pvalue < 1e-3


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
        max_depth=2,
    )
    assert tree.tokens.tolist() == [[9, 5, 6, 7]]
    assert tree.parents.tolist() == [[0, 0, 0, 1]]
    assert tree.depths.tolist() == [[0, 1, 1, 2]]
    assert tree.ancestors[0, 3].tolist() == [True, True, False, True]  # node 3: itself, node 1, the root


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
    res = accept_path(_hand_tree(), torch.tensor([targets]), 2)
    assert int(res.accepted[0]) == accepted
    assert res.tokens[0, : accepted + 1].tolist() == emitted


def test_inverse_cdf_sampling_hits_only_positive_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]], dtype=torch.float64)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.99])
    assert sample_inverse_cdf(probs.expand(5, 4), u).tolist() == [1, 1, 1, 3, 3]
    # unnormalised mass (a residual) is drawn from alike: u is a fraction of the row's total
    assert sample_inverse_cdf(3 * probs.expand(5, 4), u).tolist() == [1, 1, 1, 3, 3]


# ------------------------------------------------------------------ end to end
def _engines(model, shape, slots=8, head=None, verify="rrs"):
    # the distribution tests queue thousands of samples of one prompt in a single request
    config = EngineConfig(max_running=slots, max_queued=10_000)
    plain = Engine(ModelRunner(model), (0,), config)
    controller = SpecController("static", static_tree=shape, verify=verify)
    runner = ModelRunner(model, headroom=controller.max_nodes())
    head = head or DraftHead.for_target(model)
    drafter = Drafter(head)
    return plain, Engine(runner, (0,), config, drafter, controller)


def _run(engine, prompts, n=1, **s):
    req = GenerationRequest("t", tuple(tuple(p) for p in prompts), n, Sampling(**s))
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


@pytest.mark.service
def test_greedy_sd_is_token_identical_on_the_fixture(fixture_dir, draft_dir):
    """The trained fixture policy with its bootstrapped draft (so most drafts are accepted, deep
    paths included): 50 task prompts, greedy, token-identical to plain decoding."""
    from transformers import AutoTokenizer

    from fastgrpo.learner.tasks import format_prompt, synthetic_math

    model = AutoModelForCausalLM.from_pretrained(str(fixture_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(fixture_dir))
    head = DraftHead.load(draft_dir, model)
    plain, spec = _engines(model, TreeShape(width=4, depth=5, n_verify=16), slots=16, head=head)
    prompts = [tok(format_prompt(p.question))["input_ids"] for p in synthetic_math(seed=0).test[:50]]
    a = _run(plain, prompts, temperature=0.0, max_new_tokens=48)
    b = _run(spec, prompts, temperature=0.0, max_new_tokens=48)
    plain.shutdown()
    spec.shutdown()
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    accepted, steps = sum(y.spec.accepted_tokens for y in b), sum(y.spec.verify_steps for y in b)
    assert (accepted + steps) / steps > 2.5  # the draft really carried most tokens
    for x, y in zip(a, b):
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) <= 1e-4


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
                params.temperature.expand(3), params.top_k.expand(3), params.top_p.expand(3)), True).double().exp()
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


def _sd_first3_counts(spec, temperature, top_p, accepted=lambda s: s.accepted_tokens):
    """Counts of each first-3-token outcome over N_SAMPLES samples of PROMPT, and the draft tokens
    accepted (`accepted` of each sequence's SpecStats)."""
    res = _run(spec, [PROMPT], n=N_SAMPLES, temperature=temperature, top_p=top_p, max_new_tokens=3,
               ignore_eos=True, seed=1234)
    counts = {}
    for r in res:
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    return counts, sum(accepted(r.spec) for r in res)


@pytest.fixture(scope="module", params=["rrs", "match"])
def small_vocab_engines(request):
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", vocab_size=V_SMALL)).eval()
    with torch.no_grad():  # sharpen the random logits a little so trees get accepted often
        model.lm_head.weight.mul_(4.0)
    # rrs: K=2 children drawn at each of 2 expanded levels (2 + 2*2 = 6 nodes under the root)
    plain, spec = _engines(model, TreeShape(width=2, depth=3, n_verify=7), slots=128, verify=request.param)
    plain.shutdown()
    yield model, spec
    spec.shutdown()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.95)])
def test_sd_sampling_matches_plain_distribution(small_vocab_engines, temperature, top_p):
    """Both verification rules: rrs (children drawn from the draft) and match (top-K children)."""
    model, spec = small_vocab_engines
    counts, accepted = _sd_first3_counts(spec, temperature, top_p)
    assert accepted > N_SAMPLES // 4  # the draft tree really was used
    p = _chi2_pvalue(counts, _exact_first3(model, temperature, top_p), N_SAMPLES)
    assert p > ALPHA, f"SD first-3-token distribution differs from plain sampling (p = {p:.2e})"


def test_chi2_detects_a_broken_acceptance_rule(small_vocab_engines, monkeypatch):
    """Guard for the test above: a biased rule must fail the same goodness-of-fit test. For match,
    accepting a child when it is the target's *argmax* (not a sample); for rrs, the p/q test over
    top-K children instead of drawn ones."""
    model, spec = small_vocab_engines
    if spec.spec.rule == "match":
        def biased(tree, logp, uniforms, max_depth, candidate=None):
            return accept_path(tree, logp.argmax(-1), max_depth)  # greedy matching under a sampling request

        monkeypatch.setattr(spec_decode, "verify_sampled", biased)
    else:
        def top_k_children(logq, k, uniforms=None, sampled=None):
            return pick_children(logq, k)  # the p/q test applied to top-K children: DESIGN's common bug

        monkeypatch.setattr(spec_drafter, "pick_children", top_k_children)
    counts, _ = _sd_first3_counts(spec, 1.0, 1.0)
    p = _chi2_pvalue(counts, _exact_first3(model, 1.0, 1.0), N_SAMPLES)
    assert p < ALPHA


def _fixture_engines(fixture_dir, draft_dir, controller, slots: int, n_prompts: int):
    """Plain and speculative engines over the fixture policy (its bootstrapped draft under
    `controller`), and n_prompts task prompts."""
    from transformers import AutoTokenizer

    from fastgrpo.learner.tasks import format_prompt, synthetic_math

    model = AutoModelForCausalLM.from_pretrained(str(fixture_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(fixture_dir))
    head = DraftHead.load(draft_dir, model)
    runner = ModelRunner(model, headroom=controller.max_nodes())
    spec = Engine(runner, (tok.eos_token_id,), EngineConfig(max_running=slots),
                  Drafter(head), controller)
    plain = Engine(ModelRunner(model), (tok.eos_token_id,), EngineConfig(max_running=slots))
    prompts = [tok(format_prompt(p.question))["input_ids"] for p in synthetic_math(seed=0).test[:n_prompts]]
    return plain, spec, prompts


@pytest.mark.service
def test_adaptive_alpha_follows_acceptance_depth_and_stays_lossless(fixture_dir, draft_dir):
    """The fixture's bootstrapped draft is right deep into most sequences: at B = 1 under C_peak 21
    (N = 21, L = 4) most accepted paths reach the deepest node, so the live alpha halves and trees
    grow to L = 5, and greedy output stays token-identical to plain decoding across the change.
    Requests in static mode never move alpha (their depth is fixed)."""
    from fastgrpo.rollout.speculative.controller import ControllerConfig
    from fastgrpo.rollout.speculative.online_calibration import OnlineCalibrator, OnlineCalibrationConfig

    # C_peak held still (no exploration, no latency updates): only alpha may move
    cal = OnlineCalibrator(21.0, "configured", OnlineCalibrationConfig(explore_every=0, update_every=10**9, alpha_every=8))
    # (every step as sized: the step chooser, timing plain decoding faster on this small model,
    # may leave too few trees to move alpha: a fresh-clone run here once saw none move it)
    controller = SpecController("adaptive", ControllerConfig(c_peak=21.0), TreeShape(4, 5, 16), calibrator=cal,
                                choose=False)
    plain, spec, prompts = _fixture_engines(fixture_dir, draft_dir, controller, 1, 6)
    try:
        assert controller.tree_for(1).depth == 4
        static = GenerationRequest("t", tuple(tuple(p) for p in prompts[:3]), 1,
                                   Sampling(temperature=0.0, max_new_tokens=48), "static")
        assert all(r.spec.verify_steps > 0 for r in spec.submit(static))
        assert (controller.alpha, cal.alpha_updates) == (0.75, 0)
        a = _run(plain, prompts, temperature=0.0, max_new_tokens=48)
        b = _run(spec, prompts, temperature=0.0, max_new_tokens=48)
    finally:
        plain.shutdown()
        spec.shutdown()
    assert controller.alpha < 0.75 and cal.alpha_updates >= 1 and controller.tree_for(1).depth == 5
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


@pytest.mark.service
def test_two_node_trees_leave_alpha_alone(fixture_dir, draft_dir):
    """Under C_peak 2 at B = 1 every adaptive tree is two nodes, one level deep whatever alpha
    says: its accepted paths reach the deepest node most of the time, which must not deepen alpha."""
    from fastgrpo.rollout.speculative.controller import ControllerConfig
    from fastgrpo.rollout.speculative.online_calibration import OnlineCalibrator, OnlineCalibrationConfig

    cal = OnlineCalibrator(2.0, "configured", OnlineCalibrationConfig(explore_every=0, update_every=10**9, alpha_every=8))
    # (every step as sized: plain decoding, faster here, would leave few trees to tell alpha anything)
    controller = SpecController("adaptive", ControllerConfig(c_peak=2.0), calibrator=cal, choose=False)
    assert controller.tree_for(1).n_verify == 2
    plain, spec, prompts = _fixture_engines(fixture_dir, draft_dir, controller, 1, 3)
    try:
        b = _run(spec, prompts, temperature=0.0, max_new_tokens=48)
    finally:
        plain.shutdown()
        spec.shutdown()
    assert sum(y.spec.accepted_tokens for y in b) > 0.5 * sum(y.spec.verify_steps for y in b)  # mostly saturated
    assert (controller.alpha, cal.alpha_updates) == (0.75, 0)
