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


def test_knee_by_hand():
    from fastgrpo.rollout.calibration import knee

    # flat at 10 ms up to the knee, then 0.5 ms per token: 10 = 0.5 * T -> T = 20
    pts = [(1, 0.010), (4, 0.010), (8, 0.011), (16, 0.010), (64, 0.032), (128, 0.064)]
    assert abs(knee(pts) - 20.0) < 1e-6
    # never leaves the flat regime: the knee is at least the largest count swept
    assert knee([(1, 0.01), (2, 0.01), (4, 0.01)]) == 4.0


def test_profile_cli_writes_a_keyed_calibration(tiny_dir, tmp_path):
    from fastgrpo.rollout.calibration import Calibration
    from fastgrpo.rollout.cli import main

    out = tmp_path / "cal.json"
    assert main(["profile", "--model", str(tiny_dir), "--out", str(out), "--max-tokens", "16", "--budget-s", "20"]) == 0
    cal = Calibration.load(out, str(tiny_dir), "cpu", "float32")
    assert cal is not None and cal.c_peak >= 1 and [t for t, _ in cal.points] == [1, 2, 4, 8, 16]
    assert Calibration.load(out, str(tiny_dir), "cuda:0", "bfloat16") is None


def test_status_reports_profiled_c_peak_and_the_live_tree(tiny_dir, tmp_path, start_service):
    import torch
    from transformers import AutoModelForCausalLM

    from fastgrpo.client import RolloutClient, Sampling
    from fastgrpo.rollout.calibration import Calibration
    from fastgrpo.rollout.speculative.draft import DraftHead

    Calibration(24.0, str(tiny_dir), "cpu", "float32", [(1, 0.01), (2, 0.01), (64, 0.03)]).save(tmp_path / "cal.json")
    torch.manual_seed(0)
    DraftHead.for_target(AutoModelForCausalLM.from_pretrained(str(tiny_dir))).save(tmp_path / "draft")
    app = start_service(tiny_dir, draft=str(tmp_path / "draft"), spec_mode="adaptive", calibration=str(tmp_path / "cal.json"),
                        max_running=4)
    client = RolloutClient(f"127.0.0.1:{app.port}")
    client.generate_batch([[1, 2, 3]], 1, Sampling(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    spec = client.status().speculation
    # C_peak 24 from the profile; B = 1: N = 24, K = 8, L = clamp(floor(log2(32)) = 5, 3, 5) = 5
    assert (spec.mode, spec.c_peak, spec.c_peak_source) == ("adaptive", 24.0, "profile")
    assert (spec.batch_size, spec.n_verify, spec.width, spec.depth) == (1, 24, 8, 5)


def test_missing_calibration_is_profiled_at_start_and_saved(tiny_dir, tmp_path, start_service):
    import torch
    from transformers import AutoModelForCausalLM

    from fastgrpo.client import RolloutClient
    from fastgrpo.rollout.calibration import Calibration
    from fastgrpo.rollout.speculative.draft import DraftHead

    torch.manual_seed(0)
    DraftHead.for_target(AutoModelForCausalLM.from_pretrained(str(tiny_dir))).save(tmp_path / "draft")
    cal_file = tmp_path / "cal.json"
    app = start_service(tiny_dir, draft=str(tmp_path / "draft"), spec_mode="adaptive", calibration=str(cal_file),
                        profile_budget_s=5.0, max_running=2)
    saved = Calibration.load(cal_file, str(tiny_dir), "cpu", "float32")
    assert saved is not None and len(saved.points) >= 3
    spec = RolloutClient(f"127.0.0.1:{app.port}").status().speculation
    assert spec.c_peak_source == "profile" and spec.c_peak == saved.c_peak
