"""The concurrency-aware controller formula on hand-computed cases (paper defaults)."""
import pytest

from fastgrpo.rollout.controller import ControllerConfig, SpecPolicy, adaptive_tree
from fastgrpo.rollout.speculative.drafter import TreeShape

DEFAULTS = ControllerConfig()  # C_peak 160, N_max 160, K_max 8, L 3..5, alpha 0.75


@pytest.mark.parametrize(
    "B,expected",
    [
        # N = min(160 // 1, 160) = 160; K = min(159, 8) = 8; L = clamp(floor(log2(213.3)) = 7, 3, 5) = 5
        (1, TreeShape(8, 5, 160)),
        # N = 20; K = 8; L = floor(log2(26.7)) = 4
        (8, TreeShape(8, 4, 20)),
        # N = 5; K = 4; L = floor(log2(6.67)) = 2 -> clamped up to 3
        (32, TreeShape(4, 3, 5)),
        # N = 1 < 2: off
        (160, None),
        # N = 0: off
        (200, None),
    ],
)
def test_adaptive_tree_by_hand(B, expected):
    assert adaptive_tree(B, DEFAULTS) == expected


def test_tree_capped_by_what_k_and_l_hold():
    # N = 100 but K_max 2, L_max 3 hold only 2 + 2*4 = 10 candidates: N_verify = 11
    cfg = ControllerConfig(c_peak=100, k_max=2, l_max=3)
    assert adaptive_tree(1, cfg) == TreeShape(2, 3, 11)


def test_modes():
    policy = SpecPolicy("adaptive", DEFAULTS, TreeShape(4, 5, 16))
    assert policy.tree_for(8) == TreeShape(8, 4, 20)
    assert policy.tree_for(8, "static") == TreeShape(4, 5, 16)
    assert policy.tree_for(8, "off") is None
    assert SpecPolicy("static", DEFAULTS, TreeShape(4, 5, 16)).tree_for(500) == TreeShape(4, 5, 16)
    assert policy.max_nodes() == 160
