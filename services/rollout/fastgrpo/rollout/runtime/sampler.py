"""Sampling: logits -> the target's sampling distribution -> tokens, and exact logprobs.

Pure tensor functions. The order of processing is the one vLLM and HF apply: temperature, then
top-k, then top-p. Two distributions matter and are kept apart:
  * the *sampling* distribution (temperature, top-k, top-p applied), from which tokens are drawn;
  * the *policy* distribution softmax(logits / temperature), untruncated, whose log-probability of
    each emitted token is returned to the trainer (what a GRPO learner's importance ratio uses).
Greedy rows (temperature 0) take the argmax; their policy logprob is under softmax(logits).

Noise is a function of (sequence seed, draw counter, vocabulary index), computed on the device
(`counter_uniforms`): a sequence's draws depend on its own seed and how many draws it made, never
on which sequences share its batch or on any host-side generator state, and no noise crosses from
the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of a batch of sequences, as tensors."""

    temperature: torch.Tensor  # (B,) float; 0 = greedy
    top_k: torch.Tensor  # (B,) long; <= 0 = off
    top_p: torch.Tensor  # (B,) float in (0, 1]

    def __post_init__(self):
        assert self.temperature.dim() == 1 and self.temperature.shape == self.top_k.shape == self.top_p.shape

    @property
    def greedy(self) -> torch.Tensor:
        return self.temperature == 0  # (B,) bool

    def repeat_rows(self, n: int) -> "SamplingBatch":
        """Each row repeated n times in place (row b -> rows b*n .. b*n+n-1), for per-node tree logits."""
        return SamplingBatch(
            self.temperature.repeat_interleave(n), self.top_k.repeat_interleave(n), self.top_p.repeat_interleave(n)
        )


def policy_logprobs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """log softmax(logits / T) per row, T = 1 for greedy rows. logits (B, V), temperature (B,) -> (B, V).

    The row's largest logit is subtracted before dividing: with a tiny T, logits / T would overflow
    to inf and inf - inf is NaN, while (logit - max) / T only runs down to -inf (probability 0)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))  # (B,)
    logits = logits.float()
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # (B, V), <= 0
    return torch.log_softmax(shifted / t[:, None], dim=-1)  # (B, V)


def sampling_logprobs(logits: torch.Tensor, params: SamplingBatch, truncate: bool) -> torch.Tensor:
    """Log-probs of the distribution tokens are drawn from: temperature, top-k, top-p; -inf outside.

    logits (B, V) -> (B, V); truncate: whether any row has top-k or top-p (`truncates`, a host-side
    fact: without it the sort is skipped, with no sync). Greedy rows get a one-hot at the argmax
    (log 1 = 0, -inf elsewhere), so that verification code can treat greedy as the degenerate case
    of sampling.
    """
    assert logits.dim() == 2 and logits.shape[0] == params.temperature.shape[0]
    logp = policy_logprobs(logits, params.temperature)  # (B, V)
    out = _truncate(logp, params) if truncate else logp
    onehot = torch.full_like(out, float("-inf")).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 0.0)
    return torch.where(params.greedy[:, None], onehot, out)


def _truncate(logp: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Top-k, then top-p over what top-k kept, renormalised. logp (B, V) -> (B, V), -inf outside."""
    V = logp.shape[-1]
    # top-k: drop everything below the k-th largest value of the row
    k = torch.where(params.top_k > 0, params.top_k.clamp(max=V), torch.full_like(params.top_k, V))  # (B,)
    sorted_logp, sorted_idx = torch.sort(logp, dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(V, device=logp.device)[None, :]  # (1, V)
    keep_sorted = ranks < k[:, None]  # (B, V)
    # top-p over what top-k kept: keep the smallest prefix whose mass reaches top_p (the first always)
    probs_sorted = torch.softmax(sorted_logp.masked_fill(~keep_sorted, float("-inf")), dim=-1)  # (B, V)
    mass_before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted  # (B, V)
    keep_sorted &= mass_before < params.top_p[:, None]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, sorted_idx, keep_sorted)  # (B, V)
    return torch.log_softmax(logp.masked_fill(~keep, float("-inf")), dim=-1)  # (B, V)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), exactly: int64 never overflows (c split in halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 x in [0, 2**32), in int64 arithmetic."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float64 uniforms in (0, 1): element i of row b is a hash of (seeds[b], counters[b], i).

    seeds (B,) int64 >= 0 (63-bit), counters (B,) int64 in [0, 2**32): which draw of the sequence
    this is. Counter-based (as Philox is): no state, no sync, the same numbers in any batch."""
    seeds, counters = seeds.long(), counters.long()
    key = _hash32(_hash32(_hash32(seeds >> 32) ^ (seeds & 0xFFFFFFFF)) ^ counters)  # (B,)
    i = torch.arange(n, device=seeds.device)  # (n,)
    high = _hash32(key[:, None] ^ _hash32(2 * i)[None, :])  # (B, n) 32 bits
    low = _hash32(key[:, None] ^ _hash32(2 * i + 1)[None, :]) >> 11  # (B, n) 21 bits
    bits = high * 2**21 + low  # (B, n) 53 random bits
    return (bits.double() + 0.5) * 2.0**-53  # (B, n), never 0 or 1


# A sequence's draws are numbered: counter = stream * 2**28 + tokens drawn before them (at most
# 2**28 tokens a sequence). The plain step's token draw, a speculative step's child draws and its
# verification uniforms are three streams, so no two uses of one step share their numbers.
STREAM_TOKEN, STREAM_CHILDREN, STREAM_VERIFY = 0, 1, 2


def draw_counters(drawn: torch.Tensor, stream: int) -> torch.Tensor:
    """(B,) tokens each sequence has drawn -> the counters of `stream` (counter_uniforms)."""
    return drawn + stream * 2**28


def truncates(params: list[tuple[float, int, float]]) -> bool:
    """Whether any row's sampling parameters (temperature, top_k, top_p) cut the distribution
    (top-k or top-p): a host-side fact."""
    return any(top_k > 0 or top_p < 1 for _, top_k, top_p in params)


def sample_no_sync(logits: torch.Tensor, params: SamplingBatch, seeds: torch.Tensor, counters: torch.Tensor,
                   truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its policy logprob, without reading a value on the host.

    logits (B, V); seeds, counters (B,) int64 (counter_uniforms); truncate: whether any row has top-k
    or top-p (a host-side fact, so the sort is skipped without a sync). Greedy rows take the argmax.
    Returns tokens (B,) long, logprobs (B,) float32."""
    logp = policy_logprobs(logits, params.temperature)  # (B, V)
    logp_sample = _truncate(logp, params) if truncate else logp  # (B, V)
    noise = -torch.log(counter_uniforms(seeds, counters, logits.shape[-1]))  # (B, V) Exp(1)
    sampled = sample_from_logprobs(logp_sample, noise)  # (B,)
    tokens = torch.where(params.greedy, logits.argmax(dim=-1), sampled)  # (B,)
    return tokens, gather_rows(logp, tokens)  # (B,), (B,)


def sample_from_logprobs(logp: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: argmax p / E with E ~ Exp(1) draws token i with probability p_i exactly.

    logp (B, V) log-probs (rows may hold -inf), noise (B, V) Exp(1) -> (B,) token ids.
    """
    assert logp.shape == noise.shape
    return torch.argmax(logp.double() - torch.log(noise), dim=-1)  # (B,)


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from unnormalised probabilities, by inverse CDF: the first index whose
    cumulative mass exceeds u times the row's total (it has positive probability: the cdf only
    rises there). probs (..., V) float64, uniforms (...) U[0, 1) -> (...) token ids."""
    cdf = probs.cumsum(-1)  # (..., V)
    target = uniforms.double()[..., None] * cdf[..., -1:]  # (..., 1)
    return torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[-1] - 1)[..., 0]  # (...)


def gather_rows(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """values (B, V), tokens (B,) -> (B,) values[b, tokens[b]]."""
    return values.gather(-1, tokens[:, None]).squeeze(-1)
