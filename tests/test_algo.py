"""Pure-function tests of the GRPO math (fastgrpo.learner.algo) against float64 references.

The references are plain Python loops over lists (math module only), written independently of the
vectorised code; tensors are built by hand so that every branch (ragged masks, empty rows, groups
of equal rewards, mixed-sign rewards, clipping on both sides, negative advantages) is hit.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fastgrpo.learner.algo import (
    GRPOLossOutput,
    aggregate,
    group_advantages,
    group_reward_stats,
    grpo_loss,
    kl_k3,
    per_token_surrogate,
    token_logprobs,
)

pytestmark = pytest.mark.unit

F64 = torch.float64
TOL = 1e-12  # float64 implementation vs float64 reference


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


# ----------------------------------------------------------------------------- references (loops)


def ref_advantages(rewards: list[float], G: int, scale: str, eps: float = 1e-4) -> list[float]:
    def mean(xs):
        return sum(xs) / len(xs)

    def ustd(xs):  # unbiased (Bessel) std, as torch.std
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    out = []
    for q in range(len(rewards) // G):
        g = rewards[q * G : (q + 1) * G]
        for r in g:
            if all(x == g[0] for x in g):
                out.append(0.0)
            elif scale == "group":
                out.append((r - mean(g)) / (ustd(g) + eps))
            elif scale == "batch":
                out.append((r - mean(g)) / (ustd(rewards) + eps))
            else:
                out.append(r - mean(g))
    return out


def ref_surrogate(lp_new, lp_old, adv, eps_low, eps_high):
    out = []
    for b, (row_new, row_old) in enumerate(zip(lp_new, lp_old)):
        row = []
        for n, o in zip(row_new, row_old):
            ratio = math.exp(n - o)
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            row.append(-min(ratio * adv[b], clipped * adv[b]))
        out.append(row)
    return out


def ref_k3(lp_new, lp_ref):
    return [
        [math.exp(r - n) - (r - n) - 1 for n, r in zip(rn, rr)] for rn, rr in zip(lp_new, lp_ref)
    ]


def ref_aggregate(per_token, mask, mode, L=None):
    B, T = len(per_token), len(per_token[0])
    sums = [sum(x for x, m in zip(row, mrow) if m) for row, mrow in zip(per_token, mask)]
    lens = [sum(1 for m in mrow if m) for mrow in mask]
    if mode == "grpo":
        return sum(s / max(n, 1) for s, n in zip(sums, lens)) / B
    if mode == "dr_grpo":
        return sum(sums) / (B * (T if L is None else L))
    return sum(sums) / max(sum(lens), 1)


def ref_log_softmax_gather(logits: np.ndarray, tokens: np.ndarray, temp: float) -> list:
    out = []
    for b in range(logits.shape[0]):
        row = []
        for t in range(logits.shape[1]):
            z = [float(v) / temp for v in logits[b, t]]
            m = max(z)
            lse = m + math.log(sum(math.exp(v - m) for v in z))
            row.append(z[int(tokens[b, t])] - lse)
        out.append(row)
    return out


def close(actual: torch.Tensor, expected, tol: float = TOL) -> None:
    exp = torch.as_tensor(np.asarray(expected, dtype=np.float64))
    assert actual.shape == exp.shape, (actual.shape, exp.shape)
    torch.testing.assert_close(actual.to(F64), exp, rtol=0.0, atol=tol)


# Hand-built batch used by several tests: B=4 completions, T=5 token columns, ragged lengths
# (5, 3, 1, 0): the last row is all padding. Ratios exp(new - old) per row:
#   row 0, A=+1.0: 1.0, 1.5 (high-clipped), 0.5, 1.1, 0.7
#   row 1, A=-0.5: 0.5 (low-clipped), 1.5 (not clipped: A<0), 1.05, pad, pad
#   row 2, A=+2.0: 1.25 (high-clipped only when eps_high=0.2), pad...
#   row 3, A=-1.0: all padding
RATIOS = [
    [1.0, 1.5, 0.5, 1.1, 0.7],
    [0.5, 1.5, 1.05, 0.9, 3.0],
    [1.25, 1.0, 1.0, 1.0, 1.0],
    [0.3, 1.0, 1.0, 1.0, 1.0],
]
LP_OLD = [[-0.1 * (b + 1) - 0.05 * t for t in range(5)] for b in range(4)]
LP_NEW = [[o + math.log(r) for o, r in zip(ro, rr)] for ro, rr in zip(LP_OLD, RATIOS)]
LP_REF = [[o - 0.3 + 0.07 * t for t, o in enumerate(ro)] for ro in LP_OLD]
ADV = [1.0, -0.5, 2.0, -1.0]
LENS = [5, 3, 1, 0]
MASK = [[t < n for t in range(5)] for n in LENS]


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    # Group 0: [1, 0, 0, 1], mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.5773502691896258,
    # so A = +-0.5 / (0.57735... + 1e-4) = +-0.8658752...; group 1: all 2.0 -> exactly 0.
    rewards = t64([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)
    close(adv, [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    # A population std (sqrt(0.25) = 0.5) would give ~0.9998 instead: the std must be unbiased.
    assert abs(adv[0].item() - 0.5 / (0.5 + 1e-4)) > 0.1


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_reference(scale):
    # Mixed-sign rewards, one all-equal group, one group with a single outlier, G = 4.
    rewards = [-1.0, 3.0, 0.5, -2.5, 0.7, 0.7, 0.7, 0.7, 0.0, 0.0, 0.0, 5.0, -0.2, 0.1, 0.4, 0.3]
    adv = group_advantages(t64(rewards), group_size=4, scale=scale)
    close(adv, ref_advantages(rewards, 4, scale))
    assert torch.all(adv[4:8] == 0.0)
    # Centred per group whatever the scaling.
    assert torch.allclose(adv.view(4, 4).sum(dim=1), torch.zeros(4, dtype=F64), atol=1e-12)


def test_group_advantages_eps_and_float32():
    rewards = [0.2, -0.4, 1.3, 0.9, 0.0, 0.6]  # G = 3, two groups
    for eps in (0.0, 1e-4, 0.5):
        adv = group_advantages(t64(rewards), 3, "group", eps)
        close(adv, ref_advantages(rewards, 3, "group", eps))
    adv32 = group_advantages(torch.tensor(rewards, dtype=torch.float32), 3, "batch")
    assert adv32.dtype == torch.float32
    # float32 inputs are rounded first, so compare against the reference of the rounded values.
    rounded = torch.tensor(rewards, dtype=torch.float32).to(F64).tolist()
    close(adv32, ref_advantages(rounded, 3, "batch"), tol=1e-6)


def test_equal_rewards_give_exact_zero_despite_rounding():
    # mean(0.1, 0.1, 0.1) is 0.10000000000000002 in float64, so r - mean is -1.4e-17 and the
    # "group" scale would give -1.4e-17 / (1.7e-17 + 1e-4) = -1.4e-13 instead of exactly 0.
    for scale in ("group", "batch", "none"):
        adv = group_advantages(t64([0.1, 0.1, 0.1, 1.0, 0.0, 0.2]), 3, scale)
        assert torch.all(adv[:3] == 0.0), scale
        assert torch.all(adv[3:] != 0.0), scale


def test_group_reward_stats():
    rewards = t64([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, -3.0, -3.0, -3.0, 0.1, 0.1, 0.1])
    stats = group_reward_stats(rewards, 3)
    close(stats.group_mean, [1.0, 0.5, -3.0, 0.1])
    close(stats.group_std, [0.0, 0.5, 0.0, 0.0], tol=1e-15)  # (0.25+0.25+0)/2 = 0.25 -> 0.5
    assert stats.zero_std.tolist() == [True, False, True, True]
    assert stats.frac_zero_std.item() == 0.75
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.frac_zero_std = torch.tensor(0.0)  # frozen


@pytest.mark.parametrize(
    "rewards, G, scale",
    [
        (torch.zeros(6, dtype=F64), 1, "group"),  # one sample per group: no baseline
        (torch.zeros(7, dtype=F64), 2, "group"),  # not whole groups
        (torch.zeros(0, dtype=F64), 2, "group"),  # empty
        (torch.zeros(2, 4, dtype=F64), 4, "group"),  # not 1-D
        (torch.zeros(4, dtype=torch.int64), 2, "group"),  # not floating
        (torch.zeros(4, dtype=F64), 2, "std"),  # unknown scale
    ],
)
def test_group_advantages_rejects_bad_input(rewards, G, scale):
    with pytest.raises(ValueError):
        group_advantages(rewards, G, scale)


# ----------------------------------------------------------------------------- surrogate and KL


def test_per_token_surrogate_hand_computed():
    # eps 0.2 both sides, one token each:
    #   ratio 1.5, A=+1: -min(1.5, 1.2)   = -1.2   (high clip binds)
    #   ratio 1.5, A=-1: -min(-1.5, -1.2) = +1.5   (unclipped: the pessimistic branch)
    #   ratio 0.5, A=-1: -min(-0.5, -0.8) = +0.8   (low clip binds)
    #   ratio 0.5, A=+1: -min(0.5, 0.8)   = -0.5
    ratios = [[1.5], [1.5], [0.5], [0.5]]
    lp_new = t64([[math.log(r[0])] for r in ratios])
    lp_old = torch.zeros(4, 1, dtype=F64)
    out = per_token_surrogate(lp_new, lp_old, t64([1.0, -1.0, -1.0, 1.0]), 0.2, 0.2)
    close(out, [[-1.2], [1.5], [0.8], [-0.5]])


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.1, 0.28), (0.0, 0.0), (1.0, 5.0)])
def test_per_token_surrogate_matches_reference(eps_low, eps_high):
    out = per_token_surrogate(t64(LP_NEW), t64(LP_OLD), t64(ADV), eps_low, eps_high)
    close(out, ref_surrogate(LP_NEW, LP_OLD, ADV, eps_low, eps_high))


def test_kl_k3_matches_reference_and_hand_value():
    close(kl_k3(t64(LP_NEW), t64(LP_REF)), ref_k3(LP_NEW, LP_REF))
    # new = 0, ref = log 2: 2 - log 2 - 1 = 0.3068528194400547; equal log-probs give 0.
    close(kl_k3(t64([[0.0, -1.0]]), t64([[math.log(2.0), -1.0]])), [[1.0 - math.log(2.0), 0.0]])
    assert torch.all(kl_k3(t64(LP_NEW), t64(LP_REF)) >= 0)


# ----------------------------------------------------------------------------- aggregation

PT = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]]
PT_MASK = [[True, True, True, True], [True, True, False, False], [False, False, False, False]]


def test_aggregate_hand_computed():
    # Masked row sums 10, 11, 0; lengths 4, 2, 0 (clamped to 1); B = 3, T = 4.
    #   grpo:    (10/4 + 11/2 + 0/1) / 3 = (2.5 + 5.5 + 0) / 3 = 8/3
    #   dr_grpo: (10 + 11 + 0) / (3 * 4) = 21/12 = 1.75; with max_completion_length 6: 21/18
    #   dapo:    (10 + 11 + 0) / (4 + 2 + 0) = 21/6 = 3.5
    pt, mask = t64(PT), torch.tensor(PT_MASK)
    close(aggregate(pt, mask, "grpo"), 8.0 / 3.0)
    close(aggregate(pt, mask, "dr_grpo"), 1.75)
    close(aggregate(pt, mask, "dr_grpo", max_completion_length=6), 21.0 / 18.0)
    close(aggregate(pt, mask, "dapo"), 3.5)
    # A 0/1 float mask means the same; padding values never leak in.
    pt_dirty = pt.clone()
    pt_dirty[~mask] = 1e6
    for mode in ("grpo", "dr_grpo", "dapo"):
        close(aggregate(pt_dirty, mask.to(F64), mode), aggregate(pt, mask, mode).item())


def test_aggregate_all_padding_is_zero_not_nan():
    pt, mask = t64([[1.0, 2.0]]), torch.zeros(1, 2, dtype=torch.bool)
    for mode in ("grpo", "dr_grpo", "dapo"):
        assert aggregate(pt, mask, mode).item() == 0.0


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "dapo"])
def test_aggregate_matches_reference_ragged(mode):
    g = torch.Generator().manual_seed(0)
    pt = torch.randn(6, 9, generator=g, dtype=F64)
    lens = [9, 1, 4, 0, 7, 2]
    mask = torch.tensor([[t < n for t in range(9)] for n in lens])
    close(aggregate(pt, mask, mode), ref_aggregate(pt.tolist(), mask.tolist(), mode))
    if mode == "dr_grpo":
        close(aggregate(pt, mask, mode, 16), ref_aggregate(pt.tolist(), mask.tolist(), mode, 16))


# ----------------------------------------------------------------------------- grpo_loss


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_reference(mode, beta):
    eps_low, eps_high = 0.2, 0.28
    out = grpo_loss(
        t64(LP_NEW), t64(LP_OLD), t64(ADV), torch.tensor(MASK), eps_low=eps_low,
        eps_high=eps_high, beta=beta, logp_ref=t64(LP_REF), mode=mode, max_completion_length=8,
    )
    assert isinstance(out, GRPOLossOutput)
    sur = ref_surrogate(LP_NEW, LP_OLD, ADV, eps_low, eps_high)
    kl = ref_k3(LP_NEW, LP_REF)
    per_token = [[s + beta * k for s, k in zip(rs, rk)] for rs, rk in zip(sur, kl)]
    close(out.loss, ref_aggregate(per_token, MASK, mode, 8))

    # Token-level metrics over the 5 + 3 + 1 = 9 real tokens. With eps_high = 0.28 the clipped
    # ones are row 0's 1.5 (high, A>0) and row 1's 0.5 (low, A<0); row 2's 1.25 < 1.28 is not.
    real = [(b, t) for b in range(4) for t in range(5) if MASK[b][t]]
    assert len(real) == 9
    close(out.clip_high_fraction, 1.0 / 9.0)
    close(out.clip_low_fraction, 1.0 / 9.0)
    close(out.clip_fraction, 2.0 / 9.0)
    close(out.ratio_mean, sum(RATIOS[b][t] for b, t in real) / 9.0)
    close(out.kl_mean, sum(kl[b][t] for b, t in real) / 9.0 if beta > 0 else 0.0)
    for metric in (out.clip_fraction, out.kl_mean, out.ratio_mean):
        assert metric.ndim == 0 and not metric.requires_grad


def test_grpo_loss_float32_within_1e_6_of_float64_reference():
    f32 = dict(dtype=torch.float32)
    out = grpo_loss(
        torch.tensor(LP_NEW, **f32), torch.tensor(LP_OLD, **f32), torch.tensor(ADV, **f32),
        torch.tensor(MASK), beta=0.04, logp_ref=torch.tensor(LP_REF, **f32), mode="grpo",
    )
    assert out.loss.dtype == torch.float32
    sur = ref_surrogate(LP_NEW, LP_OLD, ADV, 0.2, 0.2)
    kl = ref_k3(LP_NEW, LP_REF)
    per_token = [[s + 0.04 * k for s, k in zip(rs, rk)] for rs, rk in zip(sur, kl)]
    close(out.loss, ref_aggregate(per_token, MASK, "grpo"), tol=1e-6)


def test_grpo_loss_gradients_zero_exactly_where_clipped():
    # "dapo" divides by the 9 real tokens, so d loss / d logp_new[b, t] = -ratio * A / 9 on tokens
    # where the unclipped branch is active, and 0 where the clip binds or on padding.
    lp_new = t64(LP_NEW).requires_grad_(True)
    lp_old = t64(LP_OLD).requires_grad_(True)  # must be treated as data
    out = grpo_loss(lp_new, lp_old, t64(ADV), torch.tensor(MASK), eps_low=0.2, eps_high=0.2,
                    mode="dapo")
    out.loss.backward()
    expected = [[0.0] * 5 for _ in range(4)]
    for b in range(4):
        for t in range(LENS[b]):
            r, a = RATIOS[b][t], ADV[b]
            clipped = (r > 1.2 and a > 0) or (r < 0.8 and a < 0)
            expected[b][t] = 0.0 if clipped else -r * a / 9.0
    close(lp_new.grad, expected)
    assert lp_old.grad is None
    # Inside the clip range the gradient is non-zero; the two clipped tokens (row 0's 1.5 with
    # A>0, row 1's 0.5 with A<0) and row 2's 1.25 (> 1.2, A>0) get exactly zero; row 1's 1.5 has
    # A<0 so the clip does not bind and its gradient survives.
    assert lp_new.grad[0, 0] != 0 and lp_new.grad[0, 3] != 0 and lp_new.grad[1, 2] != 0
    assert lp_new.grad[0, 1] == 0 and lp_new.grad[1, 0] == 0 and lp_new.grad[2, 0] == 0
    assert lp_new.grad[1, 1] != 0
    assert torch.all(lp_new.grad[3] == 0)


def test_grpo_loss_kl_gradient_survives_clipping():
    # d k3 / d new = 1 - exp(ref - new): the KL keeps pulling clipped tokens towards the
    # reference. "grpo" mode weighs row b's tokens by 1 / (B * len_b).
    beta = 0.5
    lp_new = t64(LP_NEW).requires_grad_(True)
    lp_ref = t64(LP_REF).requires_grad_(True)
    grpo_loss(lp_new, t64(LP_OLD), t64(ADV), torch.tensor(MASK), beta=beta, logp_ref=lp_ref,
              mode="grpo").loss.backward()
    expected = [[0.0] * 5 for _ in range(4)]
    for b in range(4):
        for t in range(LENS[b]):
            r, a = RATIOS[b][t], ADV[b]
            clipped = (r > 1.2 and a > 0) or (r < 0.8 and a < 0)
            g_sur = 0.0 if clipped else -r * a
            g_kl = 1.0 - math.exp(LP_REF[b][t] - LP_NEW[b][t])
            expected[b][t] = (g_sur + beta * g_kl) / (4 * LENS[b])
    close(lp_new.grad, expected)
    assert lp_ref.grad is None
    assert lp_new.grad[0, 1] != 0  # clipped surrogate, live KL


def test_clip_metrics_ignore_zero_advantage():
    # A = 0 (e.g. a group of equal rewards) makes both branches 0, so no clip binds even at ratios
    # 0.5 and 1.5 (TRL counts low clips only for A < 0 and high clips only for A > 0).
    lp_new = t64([[math.log(0.5), math.log(1.5)], [math.log(0.5), math.log(1.5)]])
    out = grpo_loss(lp_new, torch.zeros(2, 2, dtype=F64), t64([0.0, -1.0]),
                    torch.ones(2, 2, dtype=torch.bool))
    close(out.clip_low_fraction, 0.25)  # only row 1's 0.5
    close(out.clip_high_fraction, 0.0)  # row 1's 1.5 has A < 0, row 0's has A = 0
    close(out.clip_fraction, 0.25)


def test_grpo_loss_beta_zero_ignores_reference():
    args = (t64(LP_NEW), t64(LP_OLD), t64(ADV), torch.tensor(MASK))
    with_ref = grpo_loss(*args, beta=0.0, logp_ref=t64(LP_REF))
    without = grpo_loss(*args)
    assert with_ref.loss.item() == without.loss.item()
    assert with_ref.kl_mean.item() == 0.0


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(mode="ppo"), "mode"),
        (dict(beta=0.04), "logp_ref"),
        (dict(beta=-0.1), "beta"),
        (dict(eps_low=1.5), "eps_low"),
        (dict(eps_high=-0.1), "eps_high"),
        (dict(logp_old=torch.zeros(4, 4, dtype=F64)), "logp_old"),
        (dict(logp_new=torch.zeros(4, 5, 1, dtype=F64)), "logp_new"),
        (dict(advantages=torch.zeros(3, dtype=F64)), "advantages"),
        (dict(advantages=torch.zeros(4, 1, dtype=F64)), "advantages"),
        (dict(mask=torch.ones(4, 4, dtype=torch.bool)), "mask"),
        (dict(mask=torch.ones(4, 5, dtype=torch.int64)), "mask"),
        (dict(beta=0.04, logp_ref=torch.zeros(4, 6, dtype=F64)), "logp_ref"),
        (dict(mode="dr_grpo", max_completion_length=4), "max_completion_length"),
    ],
)
def test_grpo_loss_rejects_bad_arguments(change, match):
    kwargs = dict(logp_new=t64(LP_NEW), logp_old=t64(LP_OLD), advantages=t64(ADV),
                  mask=torch.tensor(MASK))
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        grpo_loss(**kwargs)


def test_aggregate_and_kl_reject_bad_arguments():
    pt, mask = t64(PT), torch.tensor(PT_MASK)
    with pytest.raises(ValueError, match="mode"):
        aggregate(pt, mask, "token")
    with pytest.raises(ValueError, match="mask"):
        aggregate(pt, mask[:, :3], "grpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(pt, mask, "dr_grpo", max_completion_length=3)
    with pytest.raises(ValueError, match="logp_ref"):
        kl_k3(pt, pt[:2])


# ----------------------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_token_logprobs_matches_reference(temperature):
    g = torch.Generator().manual_seed(1)
    logits = 3.0 * torch.randn(3, 4, 11, generator=g, dtype=F64)  # (B, T, V)
    tokens = torch.randint(0, 11, (3, 4), generator=g)  # (B, T)
    out = token_logprobs(logits, tokens, temperature)
    assert out.dtype == F64
    close(out, ref_log_softmax_gather(logits.numpy(), tokens.numpy(), temperature))


def test_token_logprobs_low_precision_computes_in_float32():
    g = torch.Generator().manual_seed(2)
    logits = 4.0 * torch.randn(2, 5, 37, generator=g)  # (B, T, V) float32
    tokens = torch.randint(0, 37, (2, 5), generator=g, dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        out = token_logprobs(x, tokens, 0.9)
        assert out.dtype == torch.float32
        # The reference sees the same (rounded) logits in float64; the rest is float32 rounding.
        close(out, ref_log_softmax_gather(x.to(F64).numpy(), tokens.numpy(), 0.9), tol=1e-6)


def test_token_logprobs_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, 0.8), (logits,))


def test_token_logprobs_rejects_bad_arguments():
    logits, tokens = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(logits, tokens, bad)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(logits, tokens[:, :2], 1.0)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(logits, tokens.float(), 1.0)
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits[0], tokens, 1.0)
