"""Command lines derived from the config tree: every flag `fastgrpo-rollout serve` and `train-draft`
took before the config became one tree still works and lands in the field it always set."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from fastgrpo.common.config import add_dataclass_args, from_args, help_field, nested
from fastgrpo.rollout.service.cli import parser, serve_config
from fastgrpo.rollout.service.config import ServeConfig

pytestmark = pytest.mark.unit

# flag, value given, the config field it sets (a path in ServeConfig), the value that lands there
SERVE_FLAGS = [
    ("--model", "/m", "model", "/m"),
    ("--host", "0.0.0.0", "host", "0.0.0.0"),
    ("--port", "7", "port", 7),
    ("--http-port", "9", "http_port", 9),
    ("--device", "cpu", "device", "cpu"),
    ("--dtype", "bfloat16", "dtype", "bfloat16"),
    ("--max-running", "3", "engine.max_running", 3),
    ("--max-context", "77", "max_context", 77),
    ("--max-prefill-tokens", "99", "engine.max_prefill_tokens", 99),
    ("--auth-token", "t", "auth_token", "t"),
    ("--tls-cert", "c.pem", "tls_cert", "c.pem"),  # (each with the other: TLS takes both)
    ("--tls-key", "k.pem", "tls_key", "k.pem"),
    ("--workers", "5", "limits.workers", 5),
    ("--draft", "/d", "draft", "/d"),
    ("--spec-mode", "static", "spec.mode", "static"),
    ("--spec-width", "2", "spec.width", 2),
    ("--spec-depth", "3", "spec.depth", 3),
    ("--spec-n-verify", "6", "spec.n_verify", 6),
    ("--spec-verify", "match", "spec.verify", "match"),
    ("--spec-sources", "head,siblings,history", "spec.sources", "head,siblings,history"),
    ("--spec-history-tokens", "5000", "spec.history_tokens", 5000),
    ("--spec-history-max-age", "1", "spec.history_max_age", 1),
    ("--c-peak", "24", "controller.c_peak", 24.0),
    ("--calibration", "cal.json", "calibration", "cal.json"),
    ("--no-c-peak-refine", None, "refine.enabled", False),
    ("--c-peak-explore-every", "4", "refine.explore_every", 4),
    ("--profile-budget-s", "5", "profile_budget_s", 5.0),
    ("--n-max", "40", "controller.n_max", 40),
    ("--k-max", "4", "controller.k_max", 4),
    ("--l-min", "2", "controller.l_min", 2),
    ("--l-max", "6", "controller.l_max", 6),
    ("--alpha", "0.5", "controller.alpha", 0.5),
    ("--no-draft-learning", None, "draft_learning.enabled", False),
    ("--draft-every-n-batches", "0", "draft_learning.every_n_batches", 0),
    ("--draft-buffer-bytes", "1024", "draft_learning.buffer_bytes", 1024),
    ("--draft-lr", "0.01", "draft_learning.lr", 0.01),
    ("--draft-warmup-steps", "2", "draft_learning.warmup_steps", 2),
    ("--draft-batch-size", "8", "draft_learning.batch_size", 8),
    ("--draft-max-steps", "12", "draft_learning.max_steps", 12),
    ("--draft-time-fraction", "0.1", "draft_learning.time_fraction", 0.1),
]


def _get(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("flag, value, path, expected", SERVE_FLAGS, ids=[f[0] for f in SERVE_FLAGS])
def test_every_serve_flag_sets_its_field(flag, value, path, expected):
    argv = [flag] if value is None else [flag, value]
    partner = {"--tls-cert": ["--tls-key", "k.pem"], "--tls-key": ["--tls-cert", "c.pem"]}
    argv += partner.get(flag, [])
    cfg = serve_config(argv)
    assert _get(cfg, path) == expected
    assert _get(serve_config([]), path) != expected  # the flag changed it from the default


def test_no_flags_give_the_declared_defaults():
    assert serve_config([]) == ServeConfig()


def test_train_draft_flags():
    args = parser().parse_args(["train-draft", "--model", "m", "--prompts", "p", "--out", "o", "--samples-per-prompt",
                                "3", "--temperature", "0.5", "--max-new-tokens", "9", "--epochs", "1",
                                "--batch-size", "4", "--lr", "0.002", "--seed", "7"])
    from fastgrpo.rollout.draft_learning.offline import OfflineConfig

    assert from_args(OfflineConfig, args) == OfflineConfig(3, 0.5, 9, 1, 4, 0.002, 7)


def test_bad_values_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        serve_config(["--spec-mode", "fast"])
    assert "--spec-mode: invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="N_verify"):
        serve_config(["--spec-width", "1", "--spec-depth", "1", "--spec-n-verify", "9"])  # a tree of 2 nodes at most
    with pytest.raises(ValueError, match="--spec-sources takes a comma-separated list of head, siblings, history"):
        serve_config(["--spec-sources", "head,cousins"])
    with pytest.raises(ValueError, match="--spec-history-tokens and --spec-history-max-age must be >= 0"):
        serve_config(["--spec-history-tokens", "-5"])


@dataclass(frozen=True)
class Inner:
    rate: float = help_field(0.5, "a rate")
    on: bool = help_field(True, "a switch", flag="inner-switch")


@dataclass(frozen=True)
class Outer:
    path: str = field(metadata={"help": "no default: a required flag"})
    inner: Inner = nested(Inner, "in-")


def test_nested_configs_take_their_prefix_and_flags_can_be_named(capsys):
    p = argparse.ArgumentParser()
    add_dataclass_args(p, Outer)
    cfg = from_args(Outer, p.parse_args(["--path", "x", "--in-rate", "0.25", "--no-inner-switch"]))
    assert cfg == Outer("x", Inner(0.25, False))
    assert "a rate (default: 0.5)" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--in-rate", "0.25"])
    assert "the following arguments are required: --path" in capsys.readouterr().err
