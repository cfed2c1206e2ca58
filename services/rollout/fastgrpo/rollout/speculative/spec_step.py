"""One speculative decode step for a batch of running sequences: draft a tree, verify, settle.

  1. catch-up: the draft reads the (target feature, next token) pairs settled since its last step;
  2. grow: K x L tree per sequence, the best N_verify - 1 nodes kept under the root (or, for
     recursive rejection sampling, children drawn from the draft and all kept);
  3. verify: one target forward over every node of every tree (tree mask, depth positions), then
     greedy, sample-matching or recursive-rejection-sampling acceptance;
  4. settle: the accepted path's keys/values move onto consecutive cache positions (rejected nodes
     are simply overwritten later), emitted tokens and their exact logprobs go to the sequences,
     and the accepted path's target features become the draft's next catch-up pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastgrpo.rollout.runtime import sampler
from fastgrpo.rollout.runtime.batch import ForwardBatch
from fastgrpo.rollout.runtime.kv_cache import token_slots
from fastgrpo.rollout.runtime.model_runner import ModelRunner
from fastgrpo.rollout.runtime.steps import to_host_rows
from fastgrpo.rollout.speculative.draft_runner import ChildDraw, Drafter, GrownTree
from fastgrpo.rollout.speculative.pairs import FeatureSequence
from fastgrpo.rollout.speculative.tree import TreeShape
from fastgrpo.rollout.speculative.verify import VERIFY_RULES, VerifyResult, verify_greedy, verify_rrs, verify_sampled
from fastgrpo.wire.records import SpecStats


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
        return SpecStats(self.drafted, self.accepted, self.verify_steps, tuple(self.accepted_per_depth))


@dataclass(frozen=True)
class StepTokens:
    """What one verify step emits for one sequence, before stop / length truncation."""

    tokens: list[int]
    logprobs: list[float]
    accepted: int
    depth: int  # of the deepest node in the sequence's verified tree: accepted == depth used it all


class SpecDecoder:
    def __init__(self, runner: ModelRunner, drafter: Drafter, rule: str = "rrs"):
        """rule: how sampled sequences verify: "rrs" (children drawn from the draft, recursive
        rejection sampling) or "match" (top-K children, sample-matching). Greedy batches always
        use top-K trees and exact matching."""
        if rule not in VERIFY_RULES:
            raise ValueError(f"verify rule must be one of {', '.join(VERIFY_RULES)}; got {rule!r}")
        self.runner = runner
        self.drafter = drafter
        self.rule = rule
        self.capture = False  # keep consumed pairs for online draft learning

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
        """Adds one settled pair (f_i (H,), x_{i+1}) for the draft's next catch-up."""
        state.pending_tokens.append(next_token)
        state.pending_chunks.append(feature[None])

    def step(
        self,
        table: torch.Tensor,
        settled: torch.Tensor,
        roots: torch.Tensor,
        states: list[SpecState],
        params: sampler.SamplingBatch,
        seeds: torch.Tensor,
        drawn: torch.Tensor,
        greedy: bool,
        shape: TreeShape,
    ) -> list[StepTokens]:
        """table (B, nb) block tables (covering every tree position), settled (tokens in the cache),
        roots (last emitted token) (B,) -> tokens per sequence. seeds, drawn (B,): each sequence's
        noise seed and tokens drawn so far (sampler.counter_uniforms); greedy: every row is.

        Leaves each state's pending pairs set to the accepted path, and its counters advanced; the
        caller appends the tokens and advances its settled count by len(tokens).
        """
        B = table.shape[0]
        dev = table.device
        root_feature = self._catch_up(table, settled, states)  # (B, H)
        draw = None if greedy or self.rule != "rrs" else self._child_draw(shape, params, seeds, drawn)
        grown = self.drafter.grow(table, settled, roots, root_feature, shape, draw)
        tree = grown.tree
        N = tree.size
        out = self.runner.forward(ForwardBatch(tree.tokens, settled[:, None] + tree.depths, table, settled, tree.ancestors))
        logits = out.logits  # (B, N, V)
        V = logits.shape[-1]
        result = verify_greedy(tree, logits) if greedy else self._verify(grown, logits, params, seeds, drawn, shape)
        D1 = result.path.shape[1]
        # settle the accepted path onto consecutive cache positions settled + k
        k = torch.arange(D1, device=dev)[None, :]
        bs = self.runner.cache.block_size
        self.runner.cache.copy_slots(token_slots(table, settled[:, None] + result.path, bs),
                                     token_slots(table, settled[:, None] + k, bs))
        # exact logprobs of the emitted tokens, computed only at the path's nodes
        path_logits = logits.gather(1, result.path[:, :, None].expand(B, D1, V))  # (B, D+1, V)
        path_logp = sampler.policy_logprobs(path_logits.reshape(B * D1, V),
                                            params.temperature.repeat_interleave(D1)).view(B, D1, V)
        emitted_logp = path_logp.gather(2, result.tokens[:, :, None])[:, :, 0]  # (B, D+1)
        path_feat = out.hidden.gather(1, result.path[:, :, None].expand(B, D1, out.hidden.shape[-1]))  # (B, D+1, H)
        # one transfer for everything the host decides on: (B, 2 + 2 (D+1)) float64, exact for ids,
        # counts and float32 logprobs; a tree keeps its best N_verify nodes, not always L deep
        host = to_host_rows(result.accepted, tree.depths.amax(dim=1), result.tokens, emitted_logp)
        steps = []
        for b, st in enumerate(states):
            n = int(host[b][0]) + 1
            toks = [int(t) for t in host[b][2: 2 + D1]]
            lps = host[b][2 + D1:]
            st.pending_tokens = toks[:n]
            st.pending_chunks = [path_feat[b, :n]]
            st.drafted += N - 1
            st.accepted += n - 1
            st.verify_steps += 1
            if len(st.accepted_per_depth) < shape.depth:
                st.accepted_per_depth += [0] * (shape.depth - len(st.accepted_per_depth))
            for d in range(n - 1):
                st.accepted_per_depth[d] += 1
            steps.append(StepTokens(toks[:n], lps[:n], n - 1, int(host[b][1])))
        return steps

    def _catch_up(self, table: torch.Tensor, settled: torch.Tensor, states: list[SpecState]) -> torch.Tensor:
        dev = table.device
        lengths = [len(s.pending_tokens) for s in states]
        counts = torch.tensor(lengths, device=dev)  # (B,)
        P = max(lengths)  # (from the host's lists: no wait for the device)
        H = states[0].pending_features.shape[-1]
        tokens = torch.zeros(len(states), P, dtype=torch.long, device=dev)  # (B, P)
        feats = torch.zeros(len(states), P, H, dtype=states[0].pending_features.dtype, device=dev)  # (B, P, H)
        for b, s in enumerate(states):
            n = len(s.pending_tokens)
            tokens[b, :n] = torch.tensor(s.pending_tokens, device=dev)
            feats[b, :n] = s.pending_features
            if self.capture:
                s.captured_tokens.extend(s.pending_tokens)
                s.captured_features.append(s.pending_features)
        return self.drafter.catch_up(table, settled - counts, tokens, feats, counts)

    @staticmethod
    def _uniforms(seeds: torch.Tensor, drawn: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, *shape) float64 U(0, 1), row b a function of (seeds[b], drawn[b], stream) only
        (greedy rows get some too: no uniform changes their outcome)."""
        u = sampler.counter_uniforms(seeds, sampler.draw_counters(drawn, stream), math.prod(shape))  # (B, n)
        return u.view(len(seeds), *shape)

    def _child_draw(self, shape: TreeShape, params: sampler.SamplingBatch, seeds: torch.Tensor,
                    drawn: torch.Tensor) -> ChildDraw:
        k, e, levels = shape.sampled_layout()
        return ChildDraw(params, self._uniforms(seeds, drawn, sampler.STREAM_CHILDREN, (levels, e, k)))

    def _verify(self, grown: GrownTree, logits: torch.Tensor, params: sampler.SamplingBatch,
                seeds: torch.Tensor, drawn: torch.Tensor, shape: TreeShape) -> VerifyResult:
        tree = grown.tree
        B, N, V = logits.shape
        logp = sampler.sampling_logprobs(logits.reshape(B * N, V), params.repeat_rows(N)).view(B, N, V)
        # greedy rows have a one-hot distribution: any uniform picks the argmax
        if grown.draft_logq is None:
            return verify_sampled(tree, logp, self._uniforms(seeds, drawn, sampler.STREAM_VERIFY, (N,)))
        k, _, levels = shape.sampled_layout()  # at most k children per node, `levels` deep
        return verify_rrs(tree, logp, grown.draft_logq, grown.candidate,
                          self._uniforms(seeds, drawn, sampler.STREAM_VERIFY, (levels + 1, k + 1)))
