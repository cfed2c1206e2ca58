"""Drafts from generated text (the sibling samples' and the prompt's earlier completions): the
n-gram index, the history store, the chain merged into the head's tree, and the engine with them
on -- greedy token-identical, logprobs equal a fresh forward, sampling exact in distribution."""
from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.scheduler.engine import Engine, EngineConfig
from fastgrpo.rollout.speculative import spec_step as spec_decode
from fastgrpo.rollout.speculative.chooser import StepChooser
from fastgrpo.rollout.speculative.controller import SpecConfig, SpecController
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.draft_runner import Drafter
from fastgrpo.rollout.speculative.text_drafts import (Calibration, GroupDrafts, HistoryStore, Proposal, SuffixIndex,
                                                     TextDraftConfig, TextDrafts)
from fastgrpo.rollout.speculative.tree import (TextChain, TreeShape, attach_chain, chain_tree, merge_chain,
                                               pick_children, select_tree)
from fastgrpo.rollout.speculative.verify import accept_path, verify_rrs
from test_speculative import ALPHA, N_SAMPLES, V_SMALL, _chi2_pvalue, _exact_first3, _run, _sd_first3_counts

pytestmark = pytest.mark.unit
inf = float("inf")


# ------------------------------------------------------------------ the index and the store
def test_index_proposes_the_most_frequent_continuation_of_the_longest_known_context():
    index = SuffixIndex(max_n=3, min_n=2)
    index.extend([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3, 5])
    # (2, 3) was followed by 4 once and 5 twice: 5, smoothed 2 / (3 + 1)
    assert index.next_token([8, 2, 3]) == (5, 0.5)
    # the longer context (1, 2, 3) was followed by 4 alone: it wins over (2, 3)
    assert index.next_token([1, 2, 3]) == (4, 0.5)
    assert index.next_token([6, 6]) is None and index.next_token([3]) is None  # unknown; shorter than min_n
    p = index.propose([7, 2, 3], max_len=8, min_reach=0.05, source="siblings")
    # (7, 2, 3) -> 5 (once: 1/2); (2, 3, 5) -> 7 (1/2); (3, 5, 7) -> 2; (5, 7, 2) -> 3: reach 1/16 then 1/32 < 0.05
    assert p.tokens == (5, 7, 2, 3) and p.probs == (0.5, 0.5, 0.5, 0.5) and p.source == "siblings"
    assert p.expected_accepted() == pytest.approx(0.5 + 0.25 + 0.125 + 0.0625)
    assert index.propose([7, 2, 3], max_len=2, min_reach=0.05, source="siblings").tokens == (5, 7)
    assert index.propose([6, 6], max_len=8, min_reach=0.05, source="siblings") is None


def test_feeding_a_sample_token_by_token_builds_the_same_index_as_at_once():
    cfg = TextDraftConfig(max_n=3, min_n=1)
    prompt = (4, 5, 6, 7)
    text = [8, 4, 5, 6, 9, 8, 4, 5]
    whole = GroupDrafts.open(prompt, cfg, ("siblings",), None, 0)
    whole.feed(0, text)
    parts = GroupDrafts.open(prompt, cfg, ("siblings",), None, 0)
    for n in (1, 2, 5, 5, 8):
        parts.feed(0, text[:n])
    assert parts.siblings.table == whole.siblings.table and parts.siblings.tokens == whole.siblings.tokens
    # contexts span the prompt's end: (6, 7) -> 8
    assert whole.siblings.next_token([6, 7]) == (8, 0.5)


def test_history_keeps_recent_versions_within_its_token_bound():
    store = HistoryStore(max_tokens=10, max_age=2)
    store.add((1,), 0, [5, 5, 5])
    store.add((2,), 1, [6, 6, 6])
    store.add((1,), 3, [7, 7])
    assert store.tokens == 8 and len(store) == 2
    # version 5: prompt 1's version-0 completion is too old (5 - 0 > 2), its version-3 one is kept
    assert store.completions((1,), 5) == [(7, 7)] and store.tokens == 5
    store.add((3,), 5, [1, 2, 3, 4, 5, 6])  # 11 tokens > 10: the least recently used prompt (2) goes
    assert store.completions((2,), 5) == [] and store.tokens == 8 and len(store) == 2
    store.add((4,), 5, list(range(11)))  # larger than the whole store: not kept
    assert store.completions((4,), 5) == [] and store.completions((1,), 9) == []
    # `before`: what was added before a serial (a request's mark) only
    mark = store.serial
    store.add((1,), 9, [8, 8])
    assert store.completions((1,), 9, before=mark) == [] and store.completions((1,), 9) == [(8, 8)]
    assert not store.has((1,), 9, before=mark) and store.has((1,), 9, before=mark + 1)
    with pytest.raises(ValueError, match="history bounds must be >= 0"):
        HistoryStore(-1, 2)


def test_history_feeds_the_prompts_next_group():
    drafts = TextDrafts(("siblings", "history"), history_tokens=1000, history_max_age=1)
    prompt = (3, 4, 5)
    drafts.finished(("r0", 0), prompt, 0, [9, 8, 7, 6], version=0, keep=True)
    drafts.finished(("r0", 0), prompt, 1, [1, 1, 1, 1], version=0, keep=False)  # aborted: not kept
    group = drafts.group(("r1", 0), prompt, version=1)
    p = drafts.propose(group, 0, prompt, [], max_len=8)
    assert p.source == "history" and p.tokens[:4] == (9, 8, 7, 6)
    assert drafts.propose(drafts.group(("r2", 0), (1, 2), version=1), 0, (1, 2), [], max_len=8) is None
    drafts.close("r1")
    assert drafts.live_groups == 1
    # two versions later the completion is stale
    assert drafts.propose(drafts.group(("r3", 0), prompt, version=2), 0, prompt, [], 8) is None
    # whether a group would draft from history, asked without opening it (a plain step builds no index)
    drafts.finished(("r4", 0), prompt, 0, [9, 8, 7, 6], version=2, keep=True)
    live = drafts.live_groups
    assert drafts.has_history(("r5", 0), prompt, 3) and not drafts.has_history(("r5", 0), prompt, 4)
    assert not drafts.has_history(("r5", 1), (1, 2), 3) and drafts.live_groups == live
    assert drafts.has_history(("r3", 0), prompt, 3) is False  # an open group answers for itself


def test_a_requests_own_finished_samples_are_its_siblings_not_its_history():
    """Samples that end before their group opens (a GRPO batch decodes plainly while it is large)
    go to the history store for later requests; for the samples of their own request still running
    they are siblings: the group's siblings' index has them, and the request is not "with history"."""
    drafts = TextDrafts(("siblings", "history"), history_tokens=1000, history_max_age=4)
    prompt = (3, 4, 5)
    drafts.begin("r0")  # admitted, and another request beside it
    drafts.begin("rb")
    drafts.finished(("r0", 0), prompt, 0, [9, 8, 7, 6], version=0, keep=True)
    assert not drafts.has_history(("r0", 0), prompt, 0)
    group = drafts.group(("r0", 0), prompt, version=0)
    assert group.history is None
    p = drafts.propose(group, 1, prompt, [], max_len=8)
    assert p.source == "siblings" and p.tokens[:4] == (9, 8, 7, 6)
    # a request admitted after it drafts from it as history; one admitted beside it does not
    drafts.begin("r1")
    assert drafts.has_history(("r1", 0), prompt, 0) and not drafts.has_history(("rb", 0), prompt, 0)
    drafts.close("r0")
    assert drafts.live_groups == 0


def test_calibration_scales_a_sources_first_estimate_by_how_often_it_is_what_was_emitted():
    cal = Calibration(("siblings", "history"), prior=4.0, decay=1.0)
    p = Proposal((5, 6), (0.8, 0.5), "siblings")
    for i in range(96):  # emitted 1 time in 4 where the estimate said 0.8
        cal.observe(p, 5 if i % 4 == 0 else 7)
    scale = (4 + 24) / (4 + 96 * 0.8)
    assert abs(cal.scale("siblings") - scale) < 1e-12 and cal.scale("history") == 1.0
    q = cal.apply(p)
    assert q.tokens == (5, 6) and q.source == "siblings" and q.probs[1] == 0.5 and abs(q.probs[0] - 0.8 * scale) < 1e-12
    assert cal.apply(Proposal((5,), (0.9,), "history")).probs == (0.9,)
    for _ in range(5000):  # never emitted: the scale nears 0, the estimate stays a probability
        cal.observe(p, 7)
    assert 0 < cal.apply(p).probs[0] < 0.01


def test_a_samples_last_proposal_is_checked_against_the_token_it_then_emitted():
    drafts = TextDrafts(("siblings",))
    prompt, key = (1, 2, 3, 4), ("r", 0)
    group = drafts.group(key, prompt, 0)
    drafts.propose(group, 1, prompt, [5, 6, 7, 8, 9], max_len=4)  # (its own proposal: nothing follows 8 9 yet)
    p = drafts.propose(group, 0, prompt, [5, 6], max_len=4)
    assert p.tokens[0] == 7 and p.probs[0] == 0.5  # seen once, estimate 1/2; the calibration starts at 1
    drafts.propose(group, 0, prompt, [5, 6], max_len=4)  # nothing emitted since: nothing to check yet
    assert drafts.calibration.sums["siblings"] == [4.0, 4.0]
    drafts.finished(key, prompt, 0, [5, 6, 9], version=0, keep=True)  # 9 came where 7 was proposed
    assert drafts.calibration.sums["siblings"] == [4.0 * 0.999, 4.0 * 0.999 + 0.5]


def test_spec_config_refuses_bad_sources_and_bounds():
    assert SpecConfig(sources="head,siblings").text_drafts().sources == ("siblings",)
    assert SpecConfig().text_drafts() is None and SpecConfig().head
    assert not SpecConfig(sources="siblings").head
    with pytest.raises(ValueError, match="--spec-sources takes a comma-separated list of head, siblings, history"):
        SpecConfig(sources="head,neighbours")
    with pytest.raises(ValueError, match="--spec-sources takes"):
        SpecConfig(sources=" , ")
    with pytest.raises(ValueError, match="--spec-history-tokens and --spec-history-max-age must be >= 0"):
        SpecConfig(sources="head,history", history_max_age=-1)


# ------------------------------------------------------------------ one tree, two sources
def test_a_chain_merges_into_the_pool_and_the_best_nodes_are_kept():
    # head pool under root: a (0.6) -> c (0.3); b (0.2). The chain a, d, e with reach 0.9, 0.8, 0.1
    # repeats a (which it scores higher), so d hangs under a and e under d.
    log = math.log
    cand_tokens = torch.tensor([[10, 11, 12]])  # a, b, c
    cand_parents = torch.tensor([[-1, -1, 0]])
    cand_scores = torch.tensor([[log(0.6), log(0.2), log(0.3)]])
    cand_depths = torch.tensor([[1, 1, 2]])
    chain = TextChain(torch.tensor([[10, 13, 14]]), torch.tensor([[log(0.9), log(0.8), log(0.1)]]))
    tokens, parents, scores, depths, from_text = merge_chain(cand_tokens, cand_parents, cand_scores, cand_depths, chain)
    assert tokens.tolist() == [[10, 11, 12, 10, 13, 14]]
    assert parents.tolist() == [[-1, -1, 0, -1, 0, 4]]
    assert scores[0, 0] == pytest.approx(log(0.9)) and scores[0, 3] == float("-inf")  # merged into a
    assert depths.tolist() == [[1, 1, 2, 1, 2, 3]]
    assert from_text.tolist() == [[True, False, False, True, True, True]]
    # four nodes: root, a (0.9), d (0.8), c (0.3)
    tree = select_tree(torch.tensor([7]), tokens, parents, scores, depths, 4, 3, from_text)
    assert tree.tokens.tolist() == [[7, 10, 12, 13]] and tree.parents.tolist() == [[0, 0, 1, 1]]
    assert tree.from_text.tolist() == [[False, True, False, True]]
    # the target drawing a, then d: the chain's path is accepted, and a sibling's token is distinct
    res = accept_path(tree, torch.tensor([[10, 13, 5, 6]]), 3)
    assert int(res.accepted[0]) == 2 and res.tokens[0, :3].tolist() == [10, 13, 6]


def test_a_row_without_a_chain_keeps_its_head_tree():
    cand = (torch.tensor([[10, 11]]), torch.tensor([[-1, -1]]), torch.log(torch.tensor([[0.6, 0.3]])),
            torch.tensor([[1, 1]]))
    chain = TextChain(torch.tensor([[0, 0]]), torch.full((1, 2), float("-inf")))
    tokens, parents, scores, depths, from_text = merge_chain(*cand, chain)
    tree = select_tree(torch.tensor([7]), tokens, parents, scores, depths, 3, 2, from_text)
    assert tree.tokens.tolist() == [[7, 10, 11]] and not bool(tree.from_text.any())


def test_a_chain_alone_is_a_tree_whose_padding_is_never_accepted():
    chain = TextChain(torch.tensor([[4, 5, 6], [4, 0, 0]]), torch.tensor([[-0.1, -0.2, -0.3], [-0.1, -inf, -inf]]))
    tree = chain_tree(torch.tensor([9, 9]), chain)
    assert tree.tokens.tolist() == [[9, 4, 5, 6], [9, 4, 0, 0]] and tree.parents.tolist() == [[0, 0, 1, 2]] * 2
    assert tree.from_text.tolist() == [[False, True, True, True], [False, True, False, False]]
    candidate = tree.from_text | (tree.depths == 0)
    # the target draws 4, then 0, then 0 at every node: row 1's padding zeros would match
    res = accept_path(tree, torch.tensor([[4, 5, 6, 1], [4, 0, 0, 0]]), 3, candidate)
    assert res.accepted.tolist() == [3, 1]
    assert res.tokens[0].tolist() == [4, 5, 6, 1] and res.tokens[1, :2].tolist() == [4, 0]


def test_a_chain_attaches_to_drawn_children_as_leads():
    """Row 0: the chain's first token repeats a drawn child (node 1), which becomes the root's lead
    and keeps its own drawn child (node 3); the chain goes on in new nodes. Row 1: the chain's only
    token is new; its second slot is padding under the root, nobody's lead."""
    tree = select_tree(torch.tensor([9, 9]), torch.tensor([[5, 6, 7], [5, 6, 7]]), torch.tensor([[-1, -1, 0]] * 2),
                       torch.zeros(2, 3), torch.tensor([[1, 1, 2]] * 2), 4, 2)
    candidate = torch.ones(2, 4, dtype=torch.bool)
    chain = TextChain(torch.tensor([[5, 8, 3], [4, 0, 0]]), torch.tensor([[-0.1, -0.2, -0.3], [-0.1, -inf, -inf]]))
    out, cand, lead = attach_chain(tree, candidate, chain, 3)
    assert out.tokens.tolist() == [[9, 5, 6, 7, 0, 8, 3], [9, 5, 6, 7, 4, 0, 0]]
    assert out.parents.tolist() == [[0, 0, 0, 1, 0, 1, 5], [0, 0, 0, 1, 0, 0, 0]]
    assert out.depths.tolist() == [[0, 1, 1, 2, 1, 2, 3], [0, 1, 1, 2, 1, 1, 1]]
    assert lead.tolist() == [[1, 5, -1, -1, -1, 6, -1], [4, -1, -1, -1, -1, -1, -1]]
    assert out.from_text.tolist() == [[False] * 5 + [True, True], [False] * 4 + [True, False, False]]
    assert cand.tolist() == [[True] * 4 + [False] * 3] * 2  # (the new nodes are nobody's drawn children)
    assert bool(out.ancestors[0, 6, 1]) and bool(out.ancestors[0, 6, 5]) and not bool(out.ancestors[0, 6, 2])


def _rrs_with_lead(p, q, rows, seed, biased=False):
    """The first two tokens of `rows` walks: two children of the root drawn from q, then a chain
    (1, 2) attached as leads (token 1 often repeats a draw; token 2 is always new), the target p
    at every node. Returns the pairs' counts (V * V,) and the tokens passed as leads."""
    g = torch.Generator().manual_seed(seed)
    V, k = p.shape[0], 2
    toks, lq = pick_children(q.log().expand(rows, 1, V), k, torch.rand(rows, 1, k, generator=g, dtype=torch.float64),
                             torch.ones(rows, dtype=torch.bool))
    tree = select_tree(torch.zeros(rows, dtype=torch.long), toks[:, 0], torch.full((rows, k), -1),
                       torch.zeros(rows, k), torch.ones(rows, k, dtype=torch.long), k + 1, 1)
    candidate = torch.cat([torch.ones(rows, 1, dtype=torch.bool), lq[:, 0] > float("-inf")], 1)
    chain = TextChain(torch.tensor([[1, 2]]).expand(rows, 2), torch.log(torch.tensor([[0.9, 0.8]])).expand(rows, 2))
    tree, candidate, lead = attach_chain(tree, candidate, chain, 2)
    N = tree.size
    u = torch.rand(rows, 3, k + 2, generator=g, dtype=torch.float64)
    if biased:  # a lead passes whenever p gives it any probability
        u[:, :, k] = 0.0
    res = verify_rrs(tree, p.log().expand(rows, N, V), q.log().expand(rows, N, V), candidate, u, 2, k, lead)
    # a walk that stopped at the root emitted one token: its second comes from the next step, a draw from p
    second = torch.where(res.accepted >= 1, res.tokens[:, 1], torch.multinomial(p, rows, True, generator=g))
    return torch.bincount(res.tokens[:, 0] * V + second, minlength=V * V), int(res.led.sum())


def test_rrs_with_chain_leads_emits_exactly_the_target_distribution():
    """Pure tensors, 40,000 walks: the first two tokens are i.i.d. p (chi-square at 1e-3, fixed
    seeds); the leads were taken often; the same check fails with a lead accepted whenever p(x) > 0."""
    from scipy.stats import chisquare

    p = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2], dtype=torch.float64)
    rows = 40000
    expected = (torch.outer(p, p).flatten() * rows).numpy()
    counts, led = _rrs_with_lead(p, q, rows, seed=4)
    assert led > rows // 2
    assert chisquare(counts.double().numpy(), expected).pvalue > 1e-3
    counts, _ = _rrs_with_lead(p, q, rows, seed=4, biased=True)
    assert chisquare(counts.double().numpy(), expected).pvalue < 1e-3


def test_chains_take_the_places_where_they_are_worth_more_than_the_heads_draws():
    from types import SimpleNamespace

    from fastgrpo.rollout.speculative.spec_step import SpecDecoder

    shape = TreeShape(width=2, depth=3, n_verify=7)  # (the head draws 2 children, 1 expanded, 3 levels)
    strong = [Proposal((1, 2, 3, 4), (0.95, 0.95, 0.95, 0.95), "history")] * 4
    weak = [Proposal((1, 2), (0.3, 0.5), "siblings"), None, None, None]

    def places(head_per_level, chains):
        me = SimpleNamespace(head_reach=[head_per_level ** (d + 1) for d in range(16)], max_chain=16)
        me._head_value = lambda shape, places: SpecDecoder._head_value(me, shape, places)
        c, gained = SpecDecoder._chain_places(me, chains, shape)
        assert (gained > 0) == (c > 0)
        return c

    assert places(0.9, weak) == 0  # a head accepted 9 levels in 10 keeps its places from a doubtful chain
    # and its levels from a confident one, which adds little to it (giving up only second children)
    assert 1 <= places(0.9, strong) <= 3
    assert places(0.3, strong) == 4  # a weak head gives up as many as the chains have tokens (keeping 2)
    assert places(0.3, weak) == 0  # a chain hardly likelier than the head's draws takes nothing

    me = SimpleNamespace(head_reach=[0.5, 0.25, 0.125])
    SpecDecoder._learn_head_reach(me, [[2.0, 3.0], [0.0, 1.0]], [0, 1])  # accepted 2 of 3 levels; 0 of 1
    assert me.head_reach == [0.5 + 0.01 * (1 - 0.5) + 0.01 * (0 - 0.505), 0.25 + 0.01 * 0.75, 0.125 - 0.01 * 0.125]


# ------------------------------------------------------------------ the engine with text drafts on
def _text_engines(model, shape, slots=8, verify="rrs", sources=("siblings", "history"), head=True):
    """A plain engine, and one drafting from text (and from a random draft head, with head)."""
    config = EngineConfig(max_running=slots, max_queued=10_000)
    plain = Engine(ModelRunner(model), (0,), config)
    controller = SpecController("static", static_tree=shape, verify=verify)
    spec = Engine(ModelRunner(model, headroom=controller.max_nodes()), (0,), config,
                  Drafter(DraftHead.for_target(model)) if head else None, controller,
                  text_drafts=TextDrafts(sources, history_tokens=100_000, history_max_age=4))
    return plain, spec


def _greedy_twice(plain, spec):
    """Six random prompts x 2 samples, greedy, through plain once and through spec twice (the
    second time with the first's completions as history); asserts that spec's tokens and logprobs
    are plain's both times. Returns spec's two results and its chooser's step counts between them;
    shuts both engines down."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 97, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (6,), generator=g)]
    try:
        a = _run(plain, prompts, n=2, temperature=0.0, max_new_tokens=40)
        first = _run(spec, prompts, n=2, temperature=0.0, max_new_tokens=40)
        between = dict(spec.chooser.steps)
        second = _run(spec, prompts, n=2, temperature=0.0, max_new_tokens=40)
    finally:
        plain.shutdown()
        spec.shutdown()
    for b in (first, second):
        assert [x.token_ids for x in a] == [y.token_ids for y in b]
        for x, y in zip(a, b):
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) <= 1e-4
    return first, second, between


@pytest.mark.parametrize("head", [True, False], ids=["with-head", "text-alone"])
def test_greedy_with_text_drafts_is_token_identical_and_history_is_used(head):
    """Greedy samples of a prompt are identical, so the second request's history holds the exact
    continuation: its chains are accepted, and the tokens stay those of plain decoding."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    plain, spec = _text_engines(model, TreeShape(width=2, depth=3, n_verify=8), head=head)
    first, second, _ = _greedy_twice(plain, spec)
    hist = sum(y.spec.accepted_history for y in second)
    assert hist > 0.5 * sum(len(y.token_ids) for y in second)  # the history carried most tokens
    assert sum(y.spec.accepted_history for y in first) == 0
    assert all(y.spec.accepted_head >= 0 for y in second)
    if not head:
        assert sum(y.spec.accepted_head for y in first + second) == 0


def test_sampled_logprobs_with_text_drafts_equal_a_fresh_forward():
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", vocab_size=11)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # peaked enough that siblings repeat each other
    plain, spec = _text_engines(model, TreeShape(width=2, depth=3, n_verify=8))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    text = 0
    try:
        for temperature, top_p in ((1.0, 1.0), (0.7, 0.95)):
            res = _run(spec, [prompt], n=8, temperature=temperature, top_p=top_p, max_new_tokens=24, seed=5)
            text += sum(r.spec.accepted_siblings + r.spec.accepted_history for r in res)
            for r in res:
                full = torch.tensor([prompt + r.token_ids])
                with torch.no_grad():
                    logits = model(full).logits[0, len(prompt) - 1: -1].float()
                ref = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
                assert (ref - torch.tensor(r.logprobs)).abs().max() <= 1e-4
    finally:
        plain.shutdown()
        spec.shutdown()
    assert text > 0  # chains were accepted


@pytest.fixture(scope="module", params=[True, False], ids=["with-head", "text-alone"])
def small_vocab_text_engine(request):
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2", vocab_size=V_SMALL)).eval()
    with torch.no_grad():  # (as test_speculative's: trees get accepted often)
        model.lm_head.weight.mul_(4.0)
    plain, spec = _text_engines(model, TreeShape(width=2, depth=3, n_verify=7), slots=128, head=request.param)
    plain.shutdown()
    yield model, spec
    spec.shutdown()


def _first3(spec, temperature, top_p):
    return _sd_first3_counts(spec, temperature, top_p, lambda st: st.accepted_siblings + st.accepted_history)


def _chains_take_every_place(monkeypatch):
    monkeypatch.setattr(spec_decode.SpecDecoder, "_chain_places", lambda self, chains, shape: (shape.n_verify - 2, 1.0))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.95)])
def test_sampling_with_text_chains_matches_plain_distribution(small_vocab_text_engine, temperature, top_p, monkeypatch):
    """6,000 samples of one prompt: every step after the first 128 has siblings' text to draft from.
    With the head, the trees are of drawn children and every chain joins them as lead children
    in all the places it may take (how many it takes is a budget, not a matter of exactness); text
    alone, each tree is its row's chain, verified by sample-matching."""
    _chains_take_every_place(monkeypatch)
    model, spec = small_vocab_text_engine
    counts, text = _first3(spec, temperature, top_p)
    assert text > N_SAMPLES // 4  # the chains really were used
    p = _chi2_pvalue(counts, _exact_first3(model, temperature, top_p), N_SAMPLES)
    assert p > ALPHA, f"first-3-token distribution with text chains differs from plain sampling (p = {p:.2e})"


def test_chi2_detects_a_chain_accepted_by_argmax(small_vocab_text_engine, monkeypatch):
    """Guard for the test above: accepting a chain's nodes when they are the target's argmax (not a
    sample), or a lead child whenever the target gives it any probability, must fail the same test."""
    model, spec = small_vocab_text_engine
    _chains_take_every_place(monkeypatch)

    def biased(tree, logp, uniforms, max_depth, candidate=None):
        return accept_path(tree, logp.argmax(-1), max_depth)

    def biased_lead(tree, logp, logq, candidate, uniforms, max_depth, max_children, lead=None):
        uniforms = uniforms.clone()
        if lead is not None:  # a lead child passes whenever the target gives it any probability
            uniforms[:, :, max_children] = 0.0
        return verify_rrs(tree, logp, logq, candidate, uniforms, max_depth, max_children, lead)

    monkeypatch.setattr(spec_decode, "verify_sampled", biased)  # (text alone: the chains' trees)
    monkeypatch.setattr(spec_decode, "verify_rrs", biased_lead)  # (with the head: chains as leads)
    counts, _ = _first3(spec, 1.0, 1.0)
    assert _chi2_pvalue(counts, _exact_first3(model, 1.0, 1.0), N_SAMPLES) < ALPHA


# ------------------------------------------------------------------ over gRPC
@pytest.mark.service
def test_a_service_drafting_from_text_alone_matches_a_plain_one(fixture_dir, start_service):
    """`--spec-sources siblings,history` without --draft: the fixture's task prompts twice, greedy,
    through the client; the second time the history carries, and the tokens stay plain decoding's."""
    from transformers import AutoTokenizer

    from fastgrpo.client import RolloutClient, Sampling
    from fastgrpo.learner.tasks import format_prompt, synthetic_math

    tok = AutoTokenizer.from_pretrained(str(fixture_dir))
    prompts = [tok(format_prompt(p.question))["input_ids"] for p in synthetic_math(seed=0).test[:6]]
    plain = start_service(fixture_dir, max_running=12)
    text = start_service(fixture_dir, max_running=12, spec_sources="siblings,history", spec_mode="static",
                         spec_n_verify=8)
    sampling = Sampling(temperature=0.0, max_new_tokens=40)
    with RolloutClient(f"127.0.0.1:{plain.port}") as a, RolloutClient(f"127.0.0.1:{text.port}") as b:
        want = [c.token_ids for c in a.generate_batch(prompts, 2, sampling).flat()]
        first = b.generate_batch(prompts, 2, sampling).flat()
        second = b.generate_batch(prompts, 2, sampling).flat()
        status = b.status()
    assert [c.token_ids for c in first] == want == [c.token_ids for c in second]
    spec = status.speculation
    assert spec.sources == "siblings,history" and spec.mode == "static"
    assert spec.accepted_head == 0 and spec.accepted_history == sum(c.spec.accepted_history for c in first + second) > 0
    assert spec.history_prompts == len(prompts)


@pytest.mark.service
def test_a_draft_that_the_sources_leave_out_is_refused(fixture_dir, draft_dir, start_service):
    with pytest.raises(ValueError, match="--draft is given but --spec-sources 'siblings' leaves the head out"):
        start_service(fixture_dir, draft=str(draft_dir), spec_sources="siblings")


def test_the_step_chooser_keeps_the_fastest_way_and_tries_the_slower_ones_the_more_rarely_the_slower():
    chooser = StepChooser(explore=4, max_explore=64, budget=0.25, seed=0)
    ways = ["head", "text", "plain"]
    # (tokens, seconds) of a step each way, here and now: text 30 tok/s, plain 20, head 10 (its
    # steps three times as long)
    step = {"text": (30, 1.0), "plain": (20, 1.0), "head": (30, 3.0)}
    assert chooser.choose(8, ways) == "text"  # nothing known anywhere: each in turn, the cheapest first
    chooser.record(8, "text", *step["text"])
    assert chooser.choose(9, ways) == "plain"  # (the same bin)
    chooser.record(9, "plain", *step["plain"])
    assert chooser.choose(8, ways) == "head"
    chooser.record(8, "head", *step["head"])
    assert chooser.choose(8, ["head"]) == "head"  # one way open: no choice
    assert chooser.leader(8, ways) == "text" and chooser.leader(64, ways) is None

    picks = []
    for _ in range(400):
        way = chooser.choose(8, ways)
        chooser.record(8, way, *step[way])
        picks.append(way)
    gaps = {w: [b - a for a, b in itertools.pairwise(i for i, p in enumerate(picks) if p == w)] for w in ways}
    # the two ways behind share the budget, 0.125 each: a try of plain loses 1 x (1 - 20/30) = 1/3 of
    # text's step: every max(4, ceil(1/3 / 0.125)) = 4 choices; of the head 3 x (1 - 10/30) = 2
    # steps: every 2 / 0.125 = 16; each times a factor in [0.5, 1.5) (a try falls a choice later
    # where the other way is due too)
    assert 2 <= min(gaps["plain"]) and max(gaps["plain"]) <= 7 and 4 <= statistics.mean(gaps["plain"]) <= 5.5
    assert 8 <= min(gaps["head"]) and max(gaps["head"]) <= 25 and 15 <= statistics.mean(gaps["head"]) <= 18
    assert picks.count("text") == 400 - len(gaps["plain"]) - len(gaps["head"]) - 2
    assert len(set(gaps["plain"])) >= 3 and len(set(gaps["head"])) >= 5  # no fixed period to lock onto
    # a new bin starts from the nearest bin's rates: the fastest at once, no round of slow tries
    assert chooser.choose(64, ways) == "text" and chooser.rates[((None, 64), "head")] == chooser.rates[((None, 8), "head")]
    chooser.record(64, "text", tokens=2400, seconds=1.0)  # 10x bin 8's rate: the borrowed ones scale with it
    assert chooser.rates[((None, 64), "plain")] == pytest.approx(10 * chooser.rates[((None, 8), "plain")])
    assert chooser.rates[((None, 64), "text")] == 2400 / 64  # (tokens per second per sequence)
    # borrowed figures count as measured: plain, cheap to try, is measured `explore` (times 0.5-1.5)
    # choices on
    late = [chooser.choose(64, ways) for _ in range(7)]
    assert "plain" in late[1:] and set(late[:late.index("plain")]) == {"text"}
    chooser.record(64, "plain", tokens=200, seconds=1.0)
    chooser.record(8, "head", tokens=4000, seconds=1.0)  # the head got much faster: the average follows
    assert chooser.rates[((None, 8), "head")] == pytest.approx(0.8 * 10 / 8 + 0.2 * 4000 / 8)
    assert chooser.choose(8, ways) == "head"
    assert sum(chooser.steps.values()) == 3 + 400 + 3
    with pytest.raises(ValueError, match="explore <= max_explore"):
        StepChooser(explore=1)


def test_the_step_chooser_compares_ways_per_sequence_whatever_the_batch_size_in_the_bin_they_were_measured_at():
    """A bin spans B to 2B - 1 rows: plain decoding measured as the batch drained through its top (15
    rows, 15 tokens a second) and the head at its bottom (8 rows, 12.8 tokens a second) compare as
    they would at one size, where a step's time hardly moves with the rows (below the knee): the
    head emits 1.6 tokens a second per sequence, plain decoding 1."""
    chooser = StepChooser(seed=0)
    assert chooser.choose(15, ["head", "plain"]) == "plain"
    chooser.record(15, "plain", tokens=15, seconds=1.0)
    assert chooser.choose(8, ["head", "plain"]) == "head"
    chooser.record(8, "head", tokens=12.8, seconds=1.0)
    assert chooser.leader(8, ["head", "plain"]) == chooser.leader(15, ["head", "plain"]) == "head"
    assert chooser.rates[((None, 8), "plain")] == 1.0 and chooser.rates[((None, 8), "head")] == 1.6


def test_the_step_chooser_keeps_regimes_apart():
    chooser = StepChooser()
    ways = ["head", "text", "plain"]
    for way, rate in (("text", 30), ("plain", 20), ("head", 10)):  # with history: the chains lead
        assert chooser.choose(8, ways, regime=True) == way
        chooser.record(8, way, tokens=rate, seconds=1.0, regime=True)
    assert chooser.leader(8, ways, regime=True) == "text"
    # without history the chains' way is not known, at this batch size or any: it is not borrowed
    # across regimes, nor is anything at another batch size
    assert chooser.leader(8, ways, regime=False) is None and chooser.leader(16, ways, regime=False) is None
    assert chooser.choose(16, ways, regime=False) == "text"  # each way in turn, as in a first bin
    chooser.record(16, "text", tokens=5, seconds=1.0, regime=False)
    assert chooser.choose(16, ways, regime=False) == "plain"
    # while another bin of the same regime borrows at once
    assert chooser.choose(32, ways, regime=True) == "text" and ((True, 32), "head") in chooser.rates

    # plain and the head, the same steps in either regime, are taken from the same batch size in the
    # other: a bin new to a regime tries the chains' way alone, then keeps the faster
    chooser = StepChooser()
    for way, rate in (("plain", 20), ("head", 40)):
        assert chooser.choose(4, ["head", "plain"], regime=False) == way
        chooser.record(4, way, tokens=rate, seconds=1.0, regime=False)
    assert chooser.choose(4, ways, regime=True) == "text"
    assert chooser.rates[((True, 4), "head")] == 40 / 4 and chooser.rates[((True, 4), "plain")] == 20 / 4
    chooser.record(4, "text", tokens=25, seconds=1.0, regime=True)
    assert chooser.choose(4, ways, regime=True) == "head"
    chooser.record(4, "head", tokens=50, seconds=1.0, regime=True)  # replaces the borrowed 40, scales nothing
    assert chooser.rates[((True, 4), "head")] == 50 / 4 and chooser.rates[((True, 4), "plain")] == 20 / 4
    assert chooser.rates[((False, 4), "head")] == 40 / 4
    # and where no other regime has measured that batch size, nothing is shared
    assert chooser.choose(64, ["head", "plain"], regime="new") == "plain" and (("new", 64), "head") not in chooser.rates
    # what GetStatus shows: every figure, by regime, bin and way; plain's at B = 4 with history is
    # still the other regime's, not measured there
    assert [(r.with_history, r.batch_size, r.way, r.tokens_per_second, r.measured) for r in chooser.table()] == [
        (False, 4, "plain", 20 / 4, True), (False, 4, "head", 40 / 4, True),
        (True, 4, "text", 25 / 4, True), (True, 4, "plain", 20 / 4, False), (True, 4, "head", 50 / 4, True)]
    assert [r.step_seconds for r in chooser.table()] == [1.0] * 5



@pytest.mark.service
def test_get_status_shows_the_rates_the_step_chooser_compares(fixture_dir, draft_dir, start_service):
    """GetStatus's way_rates are the step chooser's figures, per bin and way: a batch of 8 sampled
    sequences with a draft head (C_peak 160 sizes trees at B <= 8) tries plain decoding and the
    head, and every figure is a rate and a step time."""
    from fastgrpo.client import RolloutClient, Sampling

    app = start_service(fixture_dir, draft=str(draft_dir), max_running=8, draft_learning=False, c_peak_refine=False)
    with RolloutClient(f"127.0.0.1:{app.port}") as client:
        assert client.status().speculation.way_rates == ()  # no step with a tree yet
        client.generate_batch([[1, 2, 3, 4], [5, 6, 7]], 4, Sampling(temperature=1.0, max_new_tokens=24, seed=1))
        spec = client.status().speculation
    assert spec.way_rates == tuple(app.engine.chooser.table())  # (idle engine: nothing moved in between)
    assert {r.way for r in spec.way_rates} == {"plain", "head"} and not any(r.with_history for r in spec.way_rates)
    for r in spec.way_rates:
        assert r.batch_size & (r.batch_size - 1) == 0 and r.tokens_per_second > 0 and r.step_seconds > 0
    # a bin new to the chooser, with nothing to borrow, tries plain decoding, then the head: some bin
    # has measured both (which one depends on when the samples ended; the others borrowed from it)
    measured = {(r.batch_size, r.way) for r in spec.way_rates if r.measured}
    assert any({(b, "plain"), (b, "head")} <= measured for b in (1, 2, 4, 8))
    assert spec.steps_plain >= 1 and spec.steps_head >= 1 and spec.steps_text == 0


def test_the_step_chooser_refines_its_leader_by_each_steps_estimates():
    chooser = StepChooser(seed=0)
    ways = ["head", "text", "plain"]
    for way, (tokens, seconds) in (("text", (20, 1.0)), ("plain", (8, 0.5)), ("head", (30, 1.25))):
        assert chooser.choose(8, ways, regime=True) == way
        chooser.record(8, way, tokens, seconds, regime=True)
    # no yields yet: the estimates as they are, over each way's step time
    assert chooser.refine(8, {"head": 30.0, "text": 40.0}, regime=True) == "text"  # 40 / 1.0 > 30 / 1.25
    assert chooser.refine(8, {"head": 30.0, "text": 20.0}, regime=True) == "head"
    # the chains alone emitted half what they promised: their estimates count half from then on
    chooser.record(8, "text", tokens=20, seconds=1.0, regime=True, estimate=40.0)
    assert chooser.yields[((True, 8), "text")] == 0.5
    assert chooser.refine(8, {"head": 30.0, "text": 40.0}, regime=True) == "head"
    chooser.record(8, "text", tokens=40, seconds=1.0, regime=True, estimate=40.0)  # a moving average
    assert chooser.yields[((True, 8), "text")] == pytest.approx(0.8 * 0.5 + 0.2 * 1.0)


def test_with_history_each_step_takes_the_head_or_the_chains_by_its_own_estimates_and_stays_exact():
    """Where the head and the chains alone lead plain decoding, each step of the second request
    (history: the first request's greedy completions, exact) takes whichever its chains make
    faster (StepChooser.refine), and greedy output stays plain decoding's."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    config = EngineConfig(max_running=12, max_queued=10_000)
    controller = SpecController("adaptive")
    plain = Engine(ModelRunner(model), (0,), config)
    spec = Engine(ModelRunner(model, headroom=controller.max_nodes()), (0,), config,
                  Drafter(DraftHead.for_target(model)), controller,
                  text_drafts=TextDrafts(("siblings", "history"), history_tokens=100_000, history_max_age=4))

    class PlainNeverLeads(StepChooser):  # (this tiny model's plain steps are the fastest: the test is
        def choose(self, batch, ways, regime=None):  # about the other two ways)
            return "head" if "head" in ways else super().choose(batch, ways, regime)

        def leader(self, batch, ways, regime=None):
            return "head"

    spec.chooser = PlainNeverLeads()
    for b in (1, 2, 4, 8):  # both ways' step times known at every batch size the requests reach
        for way in ("head", "text"):
            spec.chooser.record(b, way, tokens=b, seconds=1e-3, regime=True)
    first, second, before = _greedy_twice(plain, spec)
    refined = {w: spec.chooser.steps[w] - before[w] for w in ("head", "text")}
    assert refined["text"] > 0 and any(k[1] == "text" for k in spec.chooser.yields)
    assert sum(y.spec.accepted_history for y in second) > 0


def test_without_history_a_head_step_takes_the_chains_and_there_is_no_text_way():
    """The ways an adaptive step may take: siblings' chains alone (no history) are no way of their
    own where a head drafts (they join its trees); with history, or with no head, they are."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    controller = SpecController("adaptive")
    engines = {head: Engine(ModelRunner(model, headroom=controller.max_nodes()), (0,), EngineConfig(max_running=2),
                            Drafter(DraftHead.for_target(model)) if head else None, controller,
                            text_drafts=TextDrafts(("siblings", "history"), history_tokens=1000, history_max_age=4))
               for head in (True, False)}
    try:
        assert engines[True]._ways(True, False) == ["head", "plain"]
        assert engines[True]._ways(True, True) == ["head", "text", "plain"]
        assert engines[False]._ways(True, False) == ["text", "plain"]
        assert engines[True]._ways(False, False) == ["head"]  # a static tree: as sized
    finally:
        for e in engines.values():
            e.shutdown()
