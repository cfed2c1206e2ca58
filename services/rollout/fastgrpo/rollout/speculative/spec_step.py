"""One speculative decode step for a batch of running sequences: draft a tree, verify, settle.

  1. catch-up: the draft reads the (target feature, next token) pairs settled since its last step;
  2. grow: K x L tree per sequence, the best N_verify - 1 nodes kept under the root (or, for
     recursive rejection sampling, children drawn from the draft and all kept);
  3. verify: one target forward over every node of every tree (tree mask, depth positions), then
     greedy, sample-matching or recursive-rejection-sampling acceptance;
  4. settle: the accepted path's keys/values move onto consecutive cache positions (rejected nodes
     are simply overwritten later), emitted tokens and their exact logprobs go to the sequences,
     and the accepted path's target features become the draft's next catch-up pairs.

Steps 1-2 (the draft step) and 3-4 (the verify step) are functions of device tensors, shaped by
host-side facts only (the tree's shape, whether every row is greedy, whether any truncates): no
value is read on the host between them, and one transfer after the verify step brings back what
the host decides on (runtime.steps). With --compile both are compiled: the batch (padded to its
bucket), the pending pairs a catch-up reads and the block tables (both padded to powers of two)
are symbolic sizes, so one graph serves every batch of 2 or more for a tree shape (and on CUDA
records a CUDA graph per bucket), and a batch of 1 has its own. Unlike the plain decode step's
rows, a tree's are never few enough for multiply-reduce projections (runtime.layers.GEMV_ROWS),
so a symbolic batch costs nothing there, and saves a compile per bucket.
"""
from __future__ import annotations

import itertools
import logging
import math
import operator
import time
from dataclasses import dataclass, field

import torch

from fastgrpo.rollout.runtime import sampler
from fastgrpo.rollout.runtime.batch import ForwardBatch
from fastgrpo.rollout.runtime.kv_cache import SCRATCH_BLOCK, padded_tables, token_slots
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.runtime.steps import (begin_compiled_step, bucket, compile_step, host_rows, mark_static_pools,
                                            sampling_floats, table_width)
from fastgrpo.rollout.speculative.draft_runner import ChildDraw, Drafter
from fastgrpo.rollout.speculative.pairs import FeatureSequence
from fastgrpo.rollout.speculative.text_drafts import TEXT_SOURCES, Proposal
from fastgrpo.rollout.speculative.tree import DraftTree, TextChain, TreeShape, chain_tree
from fastgrpo.rollout.speculative.verify import VERIFY_RULES, verify_greedy, verify_rrs, verify_sampled
from fastgrpo.wire.records import SpecStats

log = logging.getLogger(__name__)

HEAD_REACH_PRIOR = 0.7  # the head's acceptance per level until measured (a prior, soon replaced)
HEAD_REACH_RATE = 0.01  # moving-average weight of one row's outcome


@dataclass
class SpecState:
    """Per-sequence speculative state, owned by the scheduler's SequenceState."""

    pending_tokens: list[int] = field(default_factory=list)  # x_{i+1} of pairs not yet in the draft cache
    # f_i of those pairs, as chunks concatenated only at the next catch-up: plain decode steps add
    # one row per step, and concatenating there would copy O(n^2) rows over a long plain stretch
    pending_chunks: list[torch.Tensor] = field(default_factory=list)  # each (k, H)
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)  # [d-1]: draft tokens accepted at depth d
    # draft tokens accepted that a text chain proposed (merged ones it scored higher included), by source
    accepted_text: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TEXT_SOURCES, 0))
    captured_tokens: list[int] = field(default_factory=list)  # pairs already consumed, kept for draft learning
    prompt_pairs: int = 0  # pairs 0 .. prompt_pairs - 1 predict prompt tokens (see FeatureSequence.loss_from)
    captured_features: list[torch.Tensor] = field(default_factory=list)

    @property
    def pending_features(self) -> torch.Tensor:
        """(P, H) features of the pending pairs."""
        if len(self.pending_chunks) > 1:
            self.pending_chunks = [torch.cat(self.pending_chunks, dim=0)]
        return self.pending_chunks[0]

    def stats(self) -> SpecStats:
        return SpecStats(self.drafted, self.accepted, self.verify_steps, tuple(self.accepted_per_depth),
                         self.accepted_text["siblings"], self.accepted_text["history"])


@dataclass(frozen=True)
class StepTokens:
    """What one verify step emits for one sequence, before stop / length truncation."""

    tokens: list[int]
    logprobs: list[float]
    accepted: int
    depth: int  # of the deepest node in the sequence's verified tree: accepted == depth used it all


class SpecDecoder:
    def __init__(self, runner: ModelRunner, drafter: Drafter | None, rule: str = "rrs", compiled_batch: int = 0,
                 max_batch: int = 1):
        """rule: how sampled sequences verify: "rrs" (children drawn from the draft, recursive
        rejection sampling) or "match" (top-K children, sample-matching). Greedy batches always
        use top-K trees and exact matching. compiled_batch: batches up to this size run the
        compiled draft and verify steps (runtime.steps.compiled_batch), larger ones the same
        functions eagerly; max_batch: the most sequences a step holds. drafter None: trees come
        from text chains alone (every step is given some), and run eagerly."""
        if rule not in VERIFY_RULES:
            raise ValueError(f"verify rule must be one of {', '.join(VERIFY_RULES)}; got {rule!r}")
        self.runner = runner
        self.drafter = drafter
        self.rule = rule
        self.capture = False  # keep consumed pairs for online draft learning
        self.compiled_batch = min(compiled_batch, max_batch) if drafter is not None else 0
        self.max_chain = 16  # longest text chain a step takes (chains are padded to powers of two)
        # [d]: the share of drawn trees' rows (without a chain) accepted deeper than d, per depth:
        # what the head's nodes at depth d + 1 are worth, against which chains take places
        self.head_reach = [HEAD_REACH_PRIOR ** (d + 1) for d in range(self.max_chain)]
        self._last_places = None  # (chains, shape, _chain_places's answer) of the last rows asked about
        self.accepted_by_source = {"head": 0, **dict.fromkeys(TEXT_SOURCES, 0)}  # draft tokens accepted since start
        self.max_batch = max_batch
        self._compiled = None
        if self.compiled_batch:
            self._compiled = (compile_step(self._draft, runner.device), compile_step(self._verify, runner.device))
            mark_static_pools(runner.cache, drafter.cache)

    def batch_size(self, n: int) -> int:
        """The rows a step of n sequences computes: its batch bucket where it runs compiled (the
        controller sizes trees for these)."""
        return bucket(n, self.max_batch) if n <= self.compiled_batch else n

    @staticmethod
    def captured(state: SpecState) -> FeatureSequence:
        """Every pair of the sequence (consumed and still pending), for the draft-learning buffer."""
        feats = state.captured_features + state.pending_chunks
        return FeatureSequence(torch.tensor(state.captured_tokens + state.pending_tokens),
                               torch.cat(feats, dim=0).detach().cpu(), 0, state.prompt_pairs)

    @staticmethod
    def after_prefill(state: SpecState, context: tuple[int, ...], next_token: int, hidden: torch.Tensor,
                      prompt_len: int) -> None:
        """Queues the pairs (f_i, x_{i+1}) of a prefilled context for the draft: the prompt, or after
        a preemption the prompt and the tokens generated before it (whose pairs are captured again).
        hidden (n, H) target features of the context's n tokens; next_token the one after them."""
        state.pending_tokens = list(context[1:]) + [next_token]
        state.pending_chunks = [hidden]
        state.prompt_pairs = prompt_len - 1
        state.captured_tokens, state.captured_features = [], []

    @staticmethod
    def queue_pair(state: SpecState, feature: torch.Tensor, next_token: int) -> None:
        """Adds one settled pair (f_i (1, H), x_{i+1}) for the draft's next catch-up."""
        state.pending_tokens.append(next_token)
        state.pending_chunks.append(feature)

    @torch.inference_mode()
    def step(self, roots: list[int], settled: list[int], tables: list[list[int]], states: list[SpecState],
             params: list[tuple[float, int, float]], seeds: list[int], drawn: list[int],
             shape: TreeShape, chains: list[Proposal | None] | None = None, head: bool = True) -> list[StepTokens]:
        """One draft-and-verify step of B sequences, from host lists: each sequence's last emitted
        token (the root, not yet in the cache), its settled length (tokens in the cache), its
        blocks (covering every position the step writes), its sampling parameters (temperature,
        top_k, top_p), noise seed (0 for greedy) and tokens drawn so far (sampler.counter_uniforms).

        Leaves each state's pending pairs set to the accepted path, and its counters advanced; the
        caller appends the tokens and advances its settled count by len(tokens).

        chains: a text proposal per sequence (speculative.text_drafts; None where it has none).
        In a tree of drawn children (sampled rows, rule "rrs") the chains' first tokens become lead
        children (tree.attach_chain) in as many of the N_verify places as they are worth more than
        the head's nodes they displace (_chain_places), the head drawing its children in the rest;
        in a deterministic tree (greedy, rule "match") the chains compete with the head's
        candidates for the N_verify places (tree.merge_chain).
        head False (with chains): the chains alone make the trees (a sequence without one emits
        one token) and the draft head does not run; the pairs it has not read wait for its next step.
        """
        has_chains = bool(chains) and any(chains)
        # the head grows a tree of drawn children: it runs (not the chains alone), rule rrs, a row samples
        drawn_tree = (self.drafter is not None and (head or not has_chains) and self.rule == "rrs"
                      and any(p[0] > 0 for p in params))
        chain = None
        if has_chains:
            chain = self._chain(chains, self._places(chains, shape)[0] if drawn_tree else shape.n_verify - 1)
        use_head = self.drafter is not None and (head or chain is None)
        if drawn_tree and chain is not None:  # the head's draws take what the chains leave
            shape = TreeShape(shape.width, shape.depth, shape.n_verify - chain.tokens.shape[1])
        host, path_feat, N, Bp, seconds = self._run(roots, settled, tables, states, params, seeds, drawn, shape, chain,
                                                    use_head)
        self._last_places = None  # (the head's reach is learnt below)
        self.runner.report_decode(Bp * N, seconds)
        if drawn_tree and use_head:
            self._learn_head_reach(host, [b for b in range(len(states))
                                          if params[b][0] > 0 and (chain is None or chains[b] is None)])
        D1 = (len(host[0]) - 3) // 2
        steps = []
        for b, st in enumerate(states):
            n = int(host[b][0]) + 1
            toks = [int(t) for t in host[b][3: 3 + D1]]
            lps = host[b][3 + D1:]
            text = int(host[b][2])
            if text:
                st.accepted_text[chains[b].source] += text
                self.accepted_by_source[chains[b].source] += text
            self.accepted_by_source["head"] += n - 1 - text
            if use_head or self.drafter is None:  # the draft read every pending pair (or there is none)
                st.pending_tokens = toks[:n]
                st.pending_chunks = [path_feat[b, :n]]
            else:
                st.pending_tokens += toks[:n]
                st.pending_chunks.append(path_feat[b, :n])
            st.drafted += N - 1
            st.accepted += n - 1
            st.verify_steps += 1
            depth = max(shape.depth, n - 1)  # (a text chain may reach deeper than L)
            if len(st.accepted_per_depth) < depth:
                st.accepted_per_depth += [0] * (depth - len(st.accepted_per_depth))
            for d in range(n - 1):
                st.accepted_per_depth[d] += 1
            steps.append(StepTokens(toks[:n], lps[:n], n - 1, int(host[b][1])))
        return steps

    def expected_tokens(self, chains: list[Proposal | None], shape: TreeShape, head: bool) -> float:
        """The tokens a step of these rows is expected to emit (its accepted drafts and each row's
        own token) by the estimates the tree is built from: with the head (a drawn tree of `shape`
        the chains take places of where they are worth it: the head's measured reach per depth,
        and the chains' gain) or with the chains alone (each chain's cumulative estimates, as far
        as the tree would take it; a row without one emits its own token only). A step chooser
        compares the two per step (speculative.chooser: scaled by what each way emitted against
        its estimates)."""
        if not head:
            C = min(shape.n_verify - 1, self.max_chain)
            return len(chains) + sum(sum(itertools.accumulate(p.probs[:C], operator.mul)) for p in chains if p)
        _, gained = self._places(chains, shape)
        return len(chains) * (1.0 + self._head_value(shape, shape.n_verify - 1) + gained)

    def _places(self, chains: list[Proposal | None], shape: TreeShape) -> tuple[int, float]:
        """_chain_places, worked out once for a step's rows: a refined step asks for its estimate
        (expected_tokens), then builds its tree from the same chains (step). head_reach moves only
        after a step has run, which forgets the answer."""
        last = self._last_places
        if last is None or last[0] is not chains or last[1] != shape:
            last = self._last_places = (chains, shape, self._chain_places(chains, shape))
        return last[2]

    def _head_value(self, shape: TreeShape, places: int) -> float:
        """A row's expected accepted head draws in a drawn tree of `shape` cut to `places` places
        (besides the root): each level it reaches worth the head's reach there, each extra child
        about h (1 - h) / 2 (see _chain_places)."""
        reach = self.head_reach
        extra = reach[0] * (1.0 - reach[0]) / 2.0  # a drawn child beyond a node's first
        k, e, levels = TreeShape(shape.width, shape.depth, places + 1).sampled_layout()
        return sum(reach[:levels]) + (k + (levels - 1) * e * k - levels) * extra

    def _chain_places(self, chains: list[Proposal | None], shape: TreeShape) -> tuple[int, float]:
        """How many of a drawn tree's N_verify places the chains take: the number c that most
        raises the expected accepted tokens, and by how much a row's (0.0 with c = 0). A chain's
        token j is worth what its estimated cumulative acceptance adds beyond the head's own
        chance of being accepted that deep (head_reach; where the two guess the same token they
        share a node), averaged over the rows.
        The head, drawing in N_verify - c places, loses the levels it no longer reaches (each worth
        its head_reach) and the extra children it no longer draws (each worth about
        h (1 - h) / 2, h the first level's reach: the chance that the first draw is rejected and
        the next one, tested against the residual, accepted). The head keeps one place at least."""
        room = min(shape.n_verify - 2, self.max_chain)
        if room < 1 or not any(chains):
            return 0, 0.0
        reach = self.head_reach
        gained = [0.0] * room  # [j]: the rows' mean gain from chain token j + 1
        for p in chains:
            for j, r in enumerate(itertools.accumulate(p.probs[:room] if p else (), operator.mul)):
                gained[j] += max(0.0, r - reach[j]) / len(chains)
        full = self._head_value(shape, shape.n_verify - 1)
        values = [sum(gained[:c]) - (full - self._head_value(shape, shape.n_verify - 1 - c))
                  for c in range(1, room + 1)]
        best = max(range(room), key=values.__getitem__)
        return (best + 1, values[best]) if values[best] > 0 else (0, 0.0)

    def _learn_head_reach(self, host: list[list[float]], rows: list[int]) -> None:
        """Drawn trees' rows that had no chain: at each depth their tree reached, whether the head's
        draws were accepted that deep (a moving average per depth)."""
        for b in rows:
            accepted, depth = int(host[b][0]), min(int(host[b][1]), len(self.head_reach))
            for d in range(depth):
                self.head_reach[d] += HEAD_REACH_RATE * ((accepted > d) - self.head_reach[d])

    def _chain(self, chains: list[Proposal | None], room: int) -> TextChain | None:
        """The step's text chains on the device (B, C): C the longest chain's length padded to a
        power of two, at most `room` (the tree's places the chains may take) and max_chain; None
        where there is no room."""
        if room < 1:
            return None
        C = min(bucket(max(len(p.tokens) for p in chains if p)), room, self.max_chain)
        tokens, reach = [], []
        for p in chains:
            row_t, row_r, log_reach = [], [], 0.0
            for t, prob in zip(p.tokens[:C] if p else (), p.probs[:C] if p else ()):
                log_reach += math.log(prob)
                row_t.append(t)
                row_r.append(log_reach)
            tokens.append(row_t + [0] * (C - len(row_t)))
            reach.append(row_r + [float("-inf")] * (C - len(row_r)))
        dev = self.runner.device
        return TextChain(torch.tensor(tokens, dtype=torch.long).to(dev), torch.tensor(reach, dtype=torch.float32).to(dev))

    def _run(self, roots: list[int], settled: list[int], tables: list[list[int]], states: list[SpecState],
             params: list[tuple[float, int, float]], seeds: list[int], drawn: list[int], shape: TreeShape,
             chain: TextChain | None = None, use_head: bool = True
             ) -> tuple[list[list[float]], torch.Tensor, int, int, float]:
        """The draft and verify steps on the step's inputs, padded (use_head False: trees from the
        chains alone, run eagerly). Returns the host's rows (see _verify), the path features
        (B, D+1, H), the tree's nodes N, the rows computed, and the verify step's seconds."""
        B = len(roots)
        use_head = use_head and self.drafter is not None
        compiled = use_head and B <= self.compiled_batch
        Bp = self.batch_size(B) if use_head else B
        pad = Bp - B
        dev = self.runner.device
        nb = max(len(t) for t in tables)
        # pending pairs per sequence (from the host's lists: no wait for the device); a size of 1
        # would be specialised by the compiler, hence at least 2
        lengths = [len(s.pending_tokens) for s in states]
        P = max(2, bucket(max(lengths))) if compiled else max(lengths)
        nbp = table_width(self.runner, nb) if compiled else nb
        # padding rows: one pending pair at position 0 and the root at 1, in the scratch block
        ints = torch.tensor([settled + [1] * pad, roots + [0] * pad, lengths + [1] * pad,
                             [p[1] for p in params] + [0] * pad, seeds + [0] * pad, drawn + [0] * pad],
                            dtype=torch.long).to(dev)  # (6, Bp)
        floats = sampling_floats(params, pad, dev)  # (2, Bp)
        table = padded_tables(tables + [[SCRATCH_BLOCK]] * pad, nbp, dev)  # (Bp, nbp)
        pending = features = None
        if use_head:
            pending, features = self._pending(states, Bp, P)
        chain_t = chain_r = None
        if chain is not None:
            chain_t, chain_r = chain.tokens, chain.log_reach
            if pad:  # padding rows propose nothing
                chain_t = torch.cat([chain_t, chain_t.new_zeros(pad, chain_t.shape[1])])
                chain_r = torch.cat([chain_r, chain_r.new_full((pad, chain_r.shape[1]), float("-inf"))])
        greedy = all(p[0] == 0 for p in params)
        truncate = sampler.truncates(params)
        draft, verify = self._compiled if compiled else (self._draft, self._verify)
        if compiled:  # a graph per tree shape (and one for a batch of 1); batch, pairs and blocks symbolic
            begin_compiled_step(dev)
            for t in (table, pending, features):
                torch._dynamo.mark_dynamic(t, 1)
            if Bp > 1:  # (a size of 1 is always specialised)
                for t in (table, pending, features) + ((chain_t, chain_r) if chain is not None else ()):
                    torch._dynamo.mark_dynamic(t, 0)
                for t in (ints, floats):
                    torch._dynamo.mark_dynamic(t, 1)
        tree = draft(table, ints, floats, pending, features, chain_t, chain_r, shape, greedy, truncate)
        timer = _ForwardTimer(dev)
        host, path_feat = verify(table, ints, floats, tree, shape, greedy, truncate,
                                 0 if chain is None else chain.tokens.shape[1])
        timer.stop()
        rows = host.tolist()  # the step's one device-to-host transfer
        # (a compiled step's outputs are overwritten by its next replay on CUDA: keep a copy)
        return rows, path_feat.clone() if compiled else path_feat, tree[0].shape[1], Bp, timer.seconds()

    def _pending(self, states: list[SpecState], rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs each sequence's draft has not read, right-padded: tokens (rows, width) and
        features (rows, width, H), each put on the device in one copy."""
        dev = self.runner.device
        chunks = [s.pending_features for s in states]
        tokens = [s.pending_tokens + [0] * (width - len(s.pending_tokens)) for s in states]
        tokens += [[0] * width] * (rows - len(states))
        where = [b * width + i for b, s in enumerate(states) for i in range(len(s.pending_tokens))]
        features = torch.zeros(rows * width, chunks[0].shape[-1], dtype=chunks[0].dtype, device=dev)
        features.index_copy_(0, torch.tensor(where, device=dev), torch.cat(chunks))
        if self.capture:
            for s in states:
                s.captured_tokens.extend(s.pending_tokens)
                s.captured_features.append(s.pending_features)
        return torch.tensor(tokens, device=dev), features.view(rows, width, -1)

    def _draft(self, table: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor, pending: torch.Tensor,
               features: torch.Tensor, chain_tokens: torch.Tensor | None, chain_reach: torch.Tensor | None,
               shape: TreeShape, greedy: bool, truncate: bool) -> tuple:
        """The draft step: catch up on the pending pairs, then grow a tree per row (with the text
        chains, if any: merged into a deterministic tree, or each chain node its parent's lead
        child in a tree of drawn children). Returns the tree's tensors (DraftTree's fields, then
        the draft distributions of a sampled tree (or None), which nodes are candidates (None: all),
        the nodes a chain proposed (or None), and each node's lead child (or None)). Without
        pending pairs (the head does not run this step), each tree is its row's chain."""
        settled, roots, counts, top_k, seeds, drawn = ints  # (Bp,) each
        if pending is None:
            t = chain_tree(roots, TextChain(chain_tokens, chain_reach))
            return t.tokens, t.parents, t.depths, t.ancestors, None, t.from_text | (t.depths == 0), t.from_text, None
        root_feature = self.drafter.catch_up(table, settled - counts, pending, features, counts)  # (Bp, H)
        draw = None
        chain = None if chain_tokens is None else TextChain(chain_tokens, chain_reach)
        if not greedy and self.rule == "rrs":
            k, e, levels = shape.sampled_layout()
            params = sampler.SamplingBatch(floats[0], top_k, floats[1])
            draw = ChildDraw(params, self._uniforms(seeds, drawn, sampler.STREAM_CHILDREN, (levels, e, k)), truncate)
        grown = self.drafter.grow(table, settled, roots, root_feature, shape, draw, chain)
        t = grown.tree
        return t.tokens, t.parents, t.depths, t.ancestors, grown.draft_logq, grown.candidate, t.from_text, grown.lead

    def _verify(self, table: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor, tree: tuple,
                shape: TreeShape, greedy: bool, truncate: bool, chain_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The verify step: the target over every node, acceptance, and settling the accepted path
        (chain_width: the step's text chains' length, which may reach deeper than the head's L).
        Returns what the host reads (Bp, 3 + 2 (D+1)) float64 -- accepted count, deepest node's
        depth, accepted nodes a text chain proposed, the D+1 tokens, their logprobs -- and the
        path's target features (Bp, D+1, H)."""
        settled, _, _, top_k, seeds, drawn = ints  # (Bp,) each
        params = sampler.SamplingBatch(floats[0], top_k, floats[1])
        tokens, parents, depths, ancestors, draft_logq, candidate, from_text, lead = tree
        t = DraftTree(tokens, parents, depths, ancestors)
        B, N = tokens.shape
        sampled_tree = draft_logq is not None
        k, _, levels = shape.sampled_layout()
        D = max(levels if sampled_tree else shape.depth, chain_width)  # no node is deeper
        D = min(D, N - 1)  # (a tree of the chains alone has N = chain_width + 1 nodes, however deep L is)
        out = self.runner.forward_no_sync(ForwardBatch(tokens, settled[:, None] + depths, table, settled, ancestors,
                                                       key_blocks=table.shape[1]))
        logits = out.logits  # (B, N, V)
        V = logits.shape[-1]
        if greedy:
            result = verify_greedy(t, logits, D, candidate)
        else:
            logp = sampler.sampling_logprobs(logits.reshape(B * N, V), params.repeat_rows(N), truncate).view(B, N, V)
            # greedy rows have a one-hot distribution: any uniform picks the argmax
            if sampled_tree:
                # (D + 1 rounds of k tests, a lead's test where a chain joined, and the bonus)
                u = self._uniforms(seeds, drawn, sampler.STREAM_VERIFY, (D + 1, k + 1 + (lead is not None)))
                result = verify_rrs(t, logp, draft_logq, candidate, u, D, k, lead)
            else:
                result = verify_sampled(t, logp, self._uniforms(seeds, drawn, sampler.STREAM_VERIFY, (N,)), D, candidate)
        D1 = D + 1
        # settle the accepted path onto consecutive cache positions settled + k
        bs = self.runner.cache.block_size
        steps = torch.arange(D1, device=tokens.device)[None, :]
        self.runner.cache.copy_slots(token_slots(table, settled[:, None] + result.path, bs),
                                     token_slots(table, settled[:, None] + steps, bs))
        # exact logprobs of the emitted tokens, computed only at the path's nodes
        path_logits = logits.gather(1, result.path[:, :, None].expand(B, D1, V))  # (B, D+1, V)
        path_logp = sampler.policy_logprobs(path_logits.reshape(B * D1, V),
                                            params.temperature.repeat_interleave(D1)).view(B, D1, V)
        emitted_logp = path_logp.gather(2, result.tokens[:, :, None])[:, :, 0]  # (B, D+1)
        path_feat = out.hidden.gather(1, result.path[:, :, None].expand(B, D1, out.hidden.shape[-1]))  # (B, D+1, H)
        text = torch.zeros_like(result.accepted)  # (B,) accepted nodes a text chain proposed
        if result.led is not None:  # (a chain's token that a drawn child repeats counts when it passed as the lead)
            text = result.led
        elif from_text is not None:
            text = (from_text.gather(1, result.path) & (steps >= 1) & (steps <= result.accepted[:, None])).sum(1)
        # float64 is exact for ids, counts and float32 logprobs; a tree keeps its best N_verify
        # nodes, not always L deep
        return host_rows(result.accepted, depths.amax(dim=1), text, result.tokens, emitted_logp), path_feat

    @staticmethod
    def _uniforms(seeds: torch.Tensor, drawn: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, *shape) float64 U(0, 1), row b a function of (seeds[b], drawn[b], stream) only
        (greedy rows get some too: no uniform changes their outcome)."""
        u = sampler.counter_uniforms(seeds, sampler.draw_counters(drawn, stream), math.prod(shape))  # (B, n)
        return u.view(len(seeds), *shape)

    @torch.inference_mode()
    def warm_up(self, trees: dict[int, TreeShape | None]) -> float:
        """Compiles the greedy draft and verify steps for the tree the controller gives each compiled
        batch bucket (trees: bucket -> shape, None where speculation is off); sampled variants
        compile when first asked for. Returns the seconds it took."""
        t0 = time.perf_counter()
        H = self.runner.config.hidden_size
        done = set()
        for size, shape in sorted(trees.items()):
            graph = (size == 1, shape)  # (batches of 2 and more share a graph: a symbolic size)
            if shape is None or size > self.compiled_batch or graph in done:
                continue
            done.add(graph)
            states = [SpecState([0, 0], [torch.zeros(2, H, dtype=self.runner.dtype, device=self.runner.device)])
                      for _ in range(size)]
            self._run([0] * size, [2] * size, [[SCRATCH_BLOCK] * 2] * size, states, [(0.0, 0, 1.0)] * size,
                      [0] * size, [0] * size, shape)
        seconds = time.perf_counter() - t0
        if done:
            log.info("compiled the draft and verify steps for %d tree shapes and batch buckets up to %d in %.1f s",
                     len({shape for _, shape in done}), self.compiled_batch, seconds)
        return seconds


class _ForwardTimer:
    """Times the verify step without waiting for the device: CUDA events around it, read after the
    step's transfer; on the CPU, where work is done when the call returns, the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        """(call after the step's transfer: the events have completed by then)"""
        return self.start.elapsed_time(self.end) / 1000 if self.cuda else self.t1 - self.t0
