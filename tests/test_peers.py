"""fastgrpo-bench peers: what decides its figures (useful-token counts, the long-tail lengths, the
bandwidth floor, goals and the table), and that HF's side generates what the bench counts."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import tiny_config

from fastgrpo.bench.peers import (ENGINE_VARIANTS, GOALS, PeersBenchConfig, base_flags, comparison, effective,
                                  floor_tokens_per_s, hf_group, length_stats, markdown, other_cpu_share, paired,
                                  spec_flags, tail_lengths, useful_lengths)

pytestmark = pytest.mark.unit


def test_useful_lengths_count_up_to_and_including_the_first_eos():
    eos, pad = 0, 1
    new = torch.tensor([[5, 6, 0, 1, 1],   # EOS third: 3
                        [0, 1, 1, 1, 1],   # EOS first: 1
                        [5, 6, 7, 8, 9],   # no EOS: ran to the budget, 5
                        [5, 0, 7, 0, 1]])  # a second EOS does not count: 2
    assert pad != eos and useful_lengths(new, eos) == [3, 1, 5, 2]


def test_tail_lengths_are_log_uniform_within_bounds_and_reproducible():
    lengths = tail_lengths(4000, 16, 256, seed=0)
    assert lengths == tail_lengths(4000, 16, 256, seed=0) != tail_lengths(4000, 16, 256, seed=1)
    assert 16 <= min(lengths) and max(lengths) <= 256
    # log-uniform: the median is the geometric mean sqrt(16 * 256) = 64 (a uniform draw would give
    # 136); with 4000 draws its standard error is ~1.5 %, so 10 % is > 6 sigma
    assert statistics.median(lengths) == pytest.approx(64, rel=0.1)
    # a quarter of the draws below 16 * 16^0.25 = 32: the long tail the scenario is for
    assert sum(x < 32 for x in lengths) / len(lengths) == pytest.approx(0.25, abs=0.03)


def test_length_stats():
    assert length_stats([3, 1, 10, 2]) == {"n": 4, "min": 1, "median": 2.5, "max": 10, "mean": 4.0}


def test_bandwidth_floor_is_bytes_per_second_over_weight_bytes():
    # 10 GB/s over 250 MB of weights: 40 full reads, so 40 decode steps of one token per second
    assert floor_tokens_per_s(10e9, 250_000_000) == pytest.approx(40.0)
    assert floor_tokens_per_s(10e9, 500_000_000) == pytest.approx(20.0)


def test_other_cpu_share_is_busy_time_not_ours_over_the_machines_cpu_time():
    # 2 CPUs for 10 s: 20 CPU-seconds; 15 busy, 12 of them ours: others took 3, 15 %
    assert other_cpu_share(15.0, 12.0, 10.0, 2) == pytest.approx(0.15)
    assert other_cpu_share(12.0, 12.5, 10.0, 2) == 0.0  # tick rounding never makes it negative


def test_comparison_states_the_ratio_and_the_goal_for_ours_only():
    met = comparison("grpo", "plain", "ours", 300.0, "HF generate", 200.0)
    assert met["ratio"] == pytest.approx(1.5) and met["met"] is True and met["goal"] == GOALS["grpo"].text
    missed = comparison("grpo-tail", "plain", "ours", 500.0, "HF generate", 200.0)
    assert missed["ratio"] == pytest.approx(2.5) and missed["met"] is False
    floor = comparison("b1-floor", "plain", "ours", 30.0, "bandwidth floor", 44.0)
    assert floor["met"] is True  # 0.68 of the floor: within 1.5x of it
    assert comparison("b1-floor", "plain", "ours", 29.0, "bandwidth floor", 44.0)["met"] is False
    peer = comparison("b1-floor", "plain", "HF generate", 40.0, "bandwidth floor", 44.0)
    assert peer["goal"] is None and peer["met"] is None


def test_markdown_table_marks_missed_goals_and_lists_memory():
    records = [comparison("b1", "plain", "ours", 33.0, "HF generate", 40.0),
               comparison("spec-greedy", "compiled", "ours", 150.0, "HF assisted", 70.0),
               {"scenario": "spec-sampled", "variant": "plain", "skipped": "HF assisted: no sampling"},
               {"scenario": "memory", "process": "rollout server (plain)", "vm_hwm_bytes": 1300 * 2**20}]
    table = markdown(records, ["# title"]).splitlines()
    assert table[0] == "# title"
    assert "| b1 | plain | ours | 33.0 | HF generate | 40.0 | 0.82x | >= 1.1x HF generate | **no** |" in table
    assert "| spec-greedy | compiled | ours | 150.0 | HF assisted | 70.0 | 2.14x | >= 2x HF assisted | yes |" in table
    assert any("spec-sampled" in line and "no sampling" in line for line in table)
    assert "| rollout server (plain) | 1300 MiB |" in table


def test_paired_alternates_the_sides_and_which_goes_first():
    calls = []
    ours, peer = paired(lambda r: calls.append(("ours", r)) or {"r": r}, lambda r: calls.append(("hf", r)) or {"r": -r}, 3)
    assert calls == [("ours", 0), ("hf", 0), ("hf", 1), ("ours", 1), ("ours", 2), ("hf", 2)]
    assert [x["r"] for x in ours] == [0, 1, 2] and [x["r"] for x in peer] == [0, -1, -2]


def test_paired_runs_a_disturbed_pair_again_and_keeps_the_least_disturbed():
    # other processes' CPU share during HF's successive runs: pair 0 clean at once; pair 1 clean at
    # its second attempt; pair 2 never clean (0.5, 0.3, 0.4): the 0.3 attempt counts
    shares = iter([0.0, 0.6, 0.05, 0.5, 0.3, 0.4])
    n_ours = []
    ours, peer = paired(lambda r: n_ours.append(r) or {"r": r, "other_cpu_share": 0.0},
                        lambda r: {"r": r, "other_cpu_share": next(shares)}, 3, max_other=0.1, retries=2)
    assert n_ours == [0, 1, 1, 2, 2, 2]  # both sides run again: a pair stays a pair
    assert [p["other_cpu_share"] for p in peer] == [0.0, 0.05, 0.3]
    assert [p["attempts"] for p in peer] == [1, 2, 2] == [o["attempts"] for o in ours]


def test_every_engine_variant_is_a_valid_serve_command_line():
    """A variant's flags (and the speculative server's on top) parse as `fastgrpo-rollout serve`'s."""
    from fastgrpo.rollout.service.cli import serve_config

    cfg = PeersBenchConfig()
    for name, flags in ENGINE_VARIANTS.items():
        serve = serve_config(["--model", "m", *base_flags(cfg), *flags])
        assert serve.limits.long_calls >= cfg.prompts * cfg.group_size, name  # grpo-tail's calls at once
        spec = serve_config(["--model", "m", *base_flags(cfg), *flags, *spec_flags(cfg, "d")])
        assert spec.draft == "d" and spec.spec.mode == "static" and not spec.draft_learning.enabled, name


def test_quick_shrinks_the_workloads():
    quick = effective(PeersBenchConfig(quick=True))
    assert quick.repeats == 1 and quick.tail_max_tokens <= 128 and quick.prompts < PeersBenchConfig().prompts
    assert effective(PeersBenchConfig()) == PeersBenchConfig()


def test_hf_group_counts_budgets_with_eos_ignored_and_stops_at_eos_otherwise():
    """A tiny model that emits EOS at every step: grpo's rows end at their first token; grpo-tail's
    run on to the longest budget, each counting its own (EOS stops nothing there)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    always_eos = torch.nn.Linear(64, 97)  # (H -> V): logits of EOS (id 0) 50 above every other token
    torch.nn.init.zeros_(always_eos.weight)
    torch.nn.init.zeros_(always_eos.bias)
    always_eos.bias.data[0] = 50.0
    model.lm_head = always_eos
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0}
    prompts = [[5, 6, 7], [8, 9]]
    budgets = [3, 9, 1, 5]
    tail = hf_group(model, prompts, 2, 0, sampling, 0, budgets)
    assert tail["lengths"] == budgets and tail["tokens"] == sum(budgets) and tail["steps"] == max(budgets)
    grpo = hf_group(model, prompts, 2, 6, sampling, 0)
    assert grpo["lengths"] == [1, 1, 1, 1] and grpo["steps"] == 1 and math.isfinite(grpo["seconds"])
