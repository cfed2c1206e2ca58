"""The concurrency-aware controller formula on hand-computed cases (paper defaults)."""
import math

import pytest

from fastgrpo.rollout.speculative.calibration import DEFAULT_SWEEP
from fastgrpo.rollout.speculative.controller import ControllerConfig, SpecController, adaptive_tree
from fastgrpo.rollout.speculative.knee import knee
from fastgrpo.rollout.speculative.online_calibration import OnlineCalibrator, OnlineCalibrationConfig, refined_depth_shift
from fastgrpo.rollout.speculative.tree import TreeShape

pytestmark = pytest.mark.unit

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
    controller = SpecController("adaptive", DEFAULTS, TreeShape(4, 5, 16))
    assert controller.tree_for(8) == TreeShape(8, 4, 20)
    assert controller.tree_for(8, "static") == TreeShape(4, 5, 16)
    assert controller.tree_for(8, "off") is None
    assert SpecController("static", DEFAULTS, TreeShape(4, 5, 16)).tree_for(500) == TreeShape(4, 5, 16)
    assert controller.max_nodes() == 160


HALF_OCTAVES = (2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724, 1024)


def test_knee_by_hand():
    from fastgrpo.rollout.speculative.knee import elasticity, knee_past_sweep

    # a GPU-like roofline, flat at 10 ms, then 0.5 ms per token: the knee is 10 / 0.5 = 20 tokens,
    # and a window centred there is half flat, half proportional: slope 1/2
    roof = [(t, max(0.010, 0.0005 * t)) for t in HALF_OCTAVES]
    assert knee(roof) == pytest.approx(20.0, rel=0.05)
    assert elasticity(roof, 4.0) == pytest.approx(0.0, abs=1e-9)  # flat all through the window
    assert elasticity(roof, 400.0) == pytest.approx(1.0, abs=1e-9)  # proportional all through
    # the same roofline with its knee at 100 tokens, and the whole curve 3x slower: only shape counts
    assert knee([(t, 3 * max(0.010, 0.0001 * t)) for t in HALF_OCTAVES]) == pytest.approx(100.0, rel=0.05)
    # a CPU: flat, then affine with an intercept; odd counts 6% slower (a GEMM kernel's taste for
    # multiples of 4) and one-token forwards a third faster must not move the answer much
    cpu = [(t, 0.030 + 0.0009 * max(0, t - 12)) for t in HALF_OCTAVES]
    bumpy = [(t, sec * (1.06 if t % 4 else 1.0)) for t, sec in cpu] + [(1, 0.020)]
    assert knee(bumpy) == pytest.approx(knee(cpu), rel=0.1)
    assert 12 < knee(cpu) < 64  # inside the bend: after latency leaves 30 ms, before it doubles
    # never leaves the flat level: the largest centre the sweep can read; proportional: the smallest
    assert knee([(t, 0.01) for t in HALF_OCTAVES[:13]]) == pytest.approx(128 / 2**2.5, rel=0.01)
    assert knee([(t, 0.001 * t) for t in HALF_OCTAVES[4:]]) == pytest.approx(8 * 2**2.5, rel=0.01)
    # ... and only the first of them says that C_peak lies past the sweep
    flat = [(t, 0.01) for t in HALF_OCTAVES[:13]]
    assert knee_past_sweep(flat, knee(flat))
    assert not knee_past_sweep(roof, knee(roof)) and not knee_past_sweep(cpu, knee(cpu))
    with pytest.raises(ValueError):
        knee([(1, 0.01), (2, 0.01), (3, 0.01)])  # one-token forwards never count: 2 points left


def test_profile_cli_writes_a_keyed_calibration(tiny_dir, tmp_path):
    from fastgrpo.rollout.speculative.calibration import Calibration
    from fastgrpo.rollout.service.cli import main

    out = tmp_path / "cal.json"
    assert main(["profile", "--model", str(tiny_dir), "--out", str(out), "--max-tokens", "16", "--budget-s", "20"]) == 0
    cal = Calibration.load(out, str(tiny_dir), "cpu", "float32")
    assert cal is not None and cal.c_peak >= 1 and [t for t, _ in cal.points] == [t for t in DEFAULT_SWEEP if t <= 16]
    assert Calibration.load(out, str(tiny_dir), "cuda:0", "bfloat16") is None


def _adaptive_client(tiny_dir, tmp_path, start_service, profiled_c_peak: float, **flags):
    """A service in adaptive mode whose calibration file holds `profiled_c_peak` for the tiny model."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastgrpo.client import RolloutClient
    from fastgrpo.rollout.speculative.calibration import Calibration
    from fastgrpo.rollout.speculative.draft_head import DraftHead

    cal = tmp_path / "cal.json"
    Calibration(profiled_c_peak, str(tiny_dir), "cpu", "float32", [(1, 0.01), (2, 0.01), (64, 0.03)]).save(cal)
    torch.manual_seed(0)
    DraftHead.for_target(AutoModelForCausalLM.from_pretrained(str(tiny_dir))).save(tmp_path / "draft")
    app = start_service(tiny_dir, draft=str(tmp_path / "draft"), spec_mode="adaptive", calibration=str(cal), max_running=4,
                        **flags)
    return RolloutClient(f"127.0.0.1:{app.port}")


@pytest.mark.service
def test_status_reports_profiled_c_peak_and_the_live_tree(tiny_dir, tmp_path, start_service):
    from fastgrpo.client import Sampling

    client = _adaptive_client(tiny_dir, tmp_path, start_service, 24.0)
    client.generate_batch([[1, 2, 3]], 1, Sampling(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    spec = client.status().speculation
    # C_peak 24 from the profile; B = 1: N = 24, K = 8, L = clamp(floor(log2(32)) = 5, 3, 5) = 5
    assert (spec.mode, spec.c_peak, spec.c_peak_source) == ("adaptive", 24.0, "profile")
    assert (spec.batch_size, spec.n_verify, spec.width, spec.depth) == (1, 24, 8, 5)
    assert (spec.c_peak_start, spec.c_peak_start_source, spec.c_peak_updates) == (24.0, "profile", 0)
    assert (spec.alpha, spec.alpha_start, spec.alpha_updates) == (0.75, 0.75, 0)  # 5 verify steps: too few to move


@pytest.mark.service
def test_status_shows_the_online_estimate_beside_the_profile(tiny_dir, tmp_path, start_service):
    """A real server refines C_peak from its own decode steps: after enough of them GetStatus
    reports the online value with its source, and still the profile's value it started from."""
    from fastgrpo.client import Sampling

    # (trees as sized: a random draft loses to plain decoding, and where plain decoding is measured
    # fastest the calibrator does not probe -- trees are not used there)
    client = _adaptive_client(tiny_dir, tmp_path, start_service, 96.0, spec_choose=False)
    client.generate_batch([[1, 2, 3], [4, 5]], 1, Sampling(temperature=0.0, max_new_tokens=200, ignore_eos=True))
    spec = client.status().speculation
    assert (spec.c_peak_start, spec.c_peak_start_source) == (96.0, "profile")
    assert spec.c_peak_source == "online" and spec.c_peak_updates >= 1 and spec.c_peak != 96.0


@pytest.mark.service
def test_missing_calibration_is_profiled_at_start_and_saved(tiny_dir, tmp_path, start_service):
    import torch
    from transformers import AutoModelForCausalLM

    from fastgrpo.client import RolloutClient
    from fastgrpo.rollout.speculative.calibration import Calibration
    from fastgrpo.rollout.speculative.draft_head import DraftHead

    torch.manual_seed(0)
    DraftHead.for_target(AutoModelForCausalLM.from_pretrained(str(tiny_dir))).save(tmp_path / "draft")
    cal_file = tmp_path / "cal.json"
    app = start_service(tiny_dir, draft=str(tmp_path / "draft"), spec_mode="adaptive", calibration=str(cal_file),
                        profile_budget_s=5.0, max_running=2)
    saved = Calibration.load(cal_file, str(tiny_dir), "cpu", "float32")
    assert saved is not None and len(saved.points) >= 3
    spec = RolloutClient(f"127.0.0.1:{app.port}").status().speculation
    assert spec.c_peak_source == "profile" and spec.c_peak == saved.c_peak


# ------------------------------------------------------------------ online refinement of C_peak
def _roofline_ms(tokens: int, knee_tokens: float = 24.0, noise: float = 0.05) -> float:
    """A device whose forward costs 20 ms up to `knee_tokens` tokens, then grows linearly, with a
    deterministic +-noise wobble (so medians, not luck, carry the estimate)."""
    wobble = 1 + noise * math.sin(tokens * 12.9898 + 78.233)
    return 0.020 * max(1.0, tokens / knee_tokens) * wobble


def _run_online(start: float, steps: int, batch_size: int = 1) -> list[float]:
    """Drives the calibrator the way the engine does: each step's trees are sized from
    step_c_peak() (N = C / B per sequence), and the forward's tokens and latency are observed."""
    cal = OnlineCalibrator(start, "configured", OnlineCalibrationConfig())
    trace = []
    for _ in range(steps):
        n = max(1, math.floor(cal.step_c_peak() / batch_size))
        tokens = batch_size * n
        cal.observe(tokens, _roofline_ms(tokens))
        trace.append(cal.c_peak)
    assert cal.source == "online" and cal.initial == (start, "configured")
    return trace


@pytest.mark.parametrize("factor", [4.0, 0.25])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_online_c_peak_converges_from_a_wrong_start(factor, batch_size):
    # the offline profile's answer on the same device: a full sweep through the same knee rule
    profiled = knee([(t, _roofline_ms(t)) for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)])
    assert abs(profiled / 24.0 - 1) < 0.1
    trace = _run_online(profiled * factor, 200, batch_size)
    within = [abs(c / profiled - 1) <= 0.25 for c in trace]
    first = next((step for step, ok in enumerate(within) if ok), None)
    assert first is not None, f"not within 25% of {profiled:.1f} in 200 steps: {trace[::10]}"
    assert all(within[first:]), f"left the 25% band after step {first}: {trace[first:]}"


def test_online_refinement_waits_for_three_usable_token_counts():
    """Plain one-token steps (B = 1, speculation off) are observed but never fitted: no update, and
    above all no error inside the engine's forward."""
    cal = OnlineCalibrator(2.5, "configured", OnlineCalibrationConfig())
    for i in range(100):
        cal.observe(1 + i % 3, 0.02)  # token counts 1, 2, 3: three buckets, two of them fit
    assert (cal.c_peak, cal.updates) == (2.5, 0)


def test_online_refinement_climbs_from_below_two_token_explorations():
    """From C_peak 3 the half-size exploration would be a one-token forward, which is never fitted;
    exploring at 4x instead still finds the knee."""
    trace = _run_online(3.0, 200)
    assert abs(trace[-1] / 24.0 - 1) <= 0.25, trace[::10]


def test_online_refinement_off_keeps_c_peak():
    cal = OnlineCalibrator(96.0, "profile", OnlineCalibrationConfig(enabled=False))
    for _ in range(100):
        cal.observe(int(cal.step_c_peak()), 0.5)
    assert (cal.c_peak, cal.source, cal.updates) == (96.0, "profile", 0)


def test_depth_never_exceeds_what_n_verify_can_hold():
    # B=60 under C_peak 160: N=2 leaves room for one draft token, so L=1 (not L_min=3)
    assert adaptive_tree(60, DEFAULTS) == TreeShape(1, 1, 2)
    assert adaptive_tree(50, DEFAULTS) == TreeShape(2, 2, 3)


def test_exploration_backs_off_once_c_peak_settles():
    cal = OnlineCalibrator(24.0, "profile", OnlineCalibrationConfig())
    explored = []
    for _ in range(600):
        c = cal.step_c_peak()
        explored.append(c != cal.c_peak)
        cal.observe(max(1, math.floor(c)), _roofline_ms(max(1, math.floor(c))))
    assert sum(explored[:32]) == 16  # every 2nd step until updates show the estimate settled
    assert sum(explored[-200:]) <= 200 // 16  # settled: at most one step in 16 (the interval reaches 64)


def test_exploration_never_turns_speculation_on():
    """At B = 64 under C_peak 34 speculation is off (N_verify 0); a step exploring 4x C_peak would
    verify 2 tokens per sequence, a loss at that load, so it stays off."""
    controller = SpecController("adaptive", ControllerConfig(c_peak=34.0), TreeShape(4, 5, 16),
                        OnlineCalibrator(34.0, "profile", OnlineCalibrationConfig()))
    assert controller.tree_for(64) is None and controller.tree_for(64, c_peak=136.0) is None
    assert controller.tree_for(8, c_peak=136.0) == adaptive_tree(8, ControllerConfig(c_peak=136.0))


def test_alpha_moves_one_level_outside_the_target_band_by_hand():
    cfg = OnlineCalibrationConfig()  # a quarter of verify steps should reach the deepest node: band [1/8, 1/2]
    assert refined_depth_shift(0, 40, 64, cfg) == 1  # 62 % cut short by the depth: one level deeper
    assert refined_depth_shift(0, 7, 64, cfg) == -1  # 11 %: the deepest level is rarely used
    assert refined_depth_shift(2, 16, 64, cfg) == refined_depth_shift(2, 32, 64, cfg) == 2  # in band
    assert refined_depth_shift(4, 64, 64, cfg) == 4 and refined_depth_shift(-4, 0, 64, cfg) == -4  # +-alpha_levels


def test_saturated_trees_grow_deeper_and_unused_depth_shrinks_them():
    cal = OnlineCalibrator(21.0, "profile", OnlineCalibrationConfig())
    controller = SpecController("adaptive", ControllerConfig(c_peak=21.0, alpha=0.75), TreeShape(4, 5, 16), calibrator=cal)
    # B = 1: N = 21, K = 8, L = floor(log2(21 / 0.75) = 4.8) = 4
    assert controller.tree_for(1) == TreeShape(8, 4, 21)
    for _ in range(63):
        cal.observe_acceptance([4], [4])  # every accepted path reaches the deepest node
    assert controller.alpha == 0.75  # not yet 64 verify steps
    cal.observe_acceptance([4], [4])
    assert (controller.alpha, cal.alpha_updates) == (0.375, 1)
    assert controller.tree_for(1) == TreeShape(8, 5, 21)  # L = floor(log2(56)) = 5
    for _ in range(32):
        cal.observe_acceptance([5, 5], [1, 0])  # never past depth 1
    assert (controller.alpha, cal.alpha_updates) == (0.75, 2) and controller.tree_for(1).depth == 4
    # the cache headroom covers the deepest tree alpha may reach: N_max 160 nodes at L_max
    assert controller.max_nodes() == 160


def test_refinement_off_keeps_alpha():
    cal = OnlineCalibrator(21.0, "profile", OnlineCalibrationConfig(enabled=False))
    controller = SpecController("adaptive", ControllerConfig(c_peak=21.0, alpha=0.5), calibrator=cal)
    for _ in range(200):
        cal.observe_acceptance([4], [4])
    assert (controller.alpha, cal.alpha_updates) == (0.5, 0)
