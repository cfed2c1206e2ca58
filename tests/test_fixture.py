"""The fixture policy: HF-loadable, peaked, middling accuracy, cached by recipe hash, deterministic."""
from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fastgrpo.fixture.build as build_mod
from fastgrpo.fixture import (
    PRESETS,
    EvalConfig,
    FixtureRecipe,
    ModelConfig,
    TaskConfig,
    TrainConfig,
    build_fixture,
    fixture_name,
    load_fixture_info,
    recipe_hash,
)
from fastgrpo.fixture.evaluate import greedy_completions, mean_completion_entropy
from fastgrpo.fixture.train import encode_problems
from fastgrpo.learner.tasks import extract_final_answer, synthetic_math

# A recipe that builds in seconds, for the cache, lock and determinism machinery.
TINY = FixtureRecipe(
    model=ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64),
    task=TaskConfig(n_train=200, n_test=20),
    train=TrainConfig(steps=3, batch_size=8, warmup_steps=1),
    eval=EvalConfig(n_entropy=8, n_accuracy=4, max_new_tokens=8, batch_size=4),
)

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def default_dir(fixture_dir) -> Path:
    """The default fixture, from the shared cache (`make test-fixtures` builds it: ~3 CPU minutes)."""
    return fixture_dir


def test_default_fixture_loads_with_auto_classes(default_dir):
    model = AutoModelForCausalLM.from_pretrained(default_dir)
    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    assert model.dtype == torch.float32
    assert model.config.model_type == "qwen2"
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id == model.generation_config.pad_token_id
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model.config.vocab_size == len(tokenizer)
    assert 256 < len(tokenizer) <= 1024
    assert tokenizer.padding_side == "left"
    # Digits are single tokens, and any byte string round-trips (byte-level BPE).
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]
    text = "Tom has 17 apples. ünïcødé ☃"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_default_fixture_quality(default_dir):
    info = load_fixture_info(default_dir)
    assert info["hash"] == recipe_hash(PRESETS["default"])
    assert default_dir.name == fixture_name("default", PRESETS["default"])
    assert info["heldout_mean_entropy_nats"] < 1.0 < info["log_vocab_nats"]
    # Graded accuracy counts only "#### N" endings; the recipe's unmarked_answer_fraction lowers it.
    assert 0.02 <= info["greedy_test_accuracy"] <= 0.8

    # The saved weights (not only the recorded figures) are peaked and solve problems.
    model = AutoModelForCausalLM.from_pretrained(default_dir)
    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    test = synthetic_math(**dataclasses.asdict(PRESETS["default"].task)).test[:100]
    entropy = mean_completion_entropy(model, encode_problems(test[:40], tokenizer), tokenizer.pad_token_id)
    assert entropy < 1.0 < math.log(len(tokenizer))
    completions = greedy_completions(model, tokenizer, [p.question for p in test], max_new_tokens=48)
    # Every completion ends in one of the two answer formats of the SFT data; read either.
    finals = [re.search(r"(?:####|Answer:) (\d+)$", c) for c in completions]
    assert all(finals), completions
    arithmetic = sum(m.group(1) == p.answer for m, p in zip(finals, test)) / len(test)
    graded = sum(extract_final_answer(c) == p.answer for c, p in zip(completions, test)) / len(test)
    # Middling skill leaves GRPO room to improve; the graded reward never exceeds it.
    assert 0.2 <= arithmetic <= 0.8
    assert 0 < graded <= arithmetic


def test_second_build_is_a_cache_hit(default_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached fixture must not be rebuilt")

    monkeypatch.setattr(build_mod, "_build_into", no_training)
    assert build_fixture("default") == default_dir
    assert build_fixture("default", cache_dir=default_dir.parent) == default_dir


@pytest.mark.parametrize("command", ["build", "draft"])
def test_cli_prints_the_cached_directory_last(default_dir, draft_dir, command):
    script = Path(sys.executable).with_name("fastgrpo-fixture")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "fastgrpo.fixture.cli"]
    out = subprocess.run(
        cmd + [command, "--cache-dir", str(default_dir.parent)],
        check=True, capture_output=True, text=True, timeout=120,
    )
    assert Path(out.stdout.strip().splitlines()[-1]) == (default_dir if command == "build" else draft_dir)


@pytest.mark.unit
def test_recipe_hash_tracks_every_setting():
    base = PRESETS["default"]
    assert recipe_hash(base) == recipe_hash(dataclasses.replace(base))
    variants = [
        dataclasses.replace(base, train=dataclasses.replace(base.train, lr=base.train.lr * 2)),
        dataclasses.replace(base, train=dataclasses.replace(base.train, steps=base.train.steps + 1)),
        dataclasses.replace(base, model=dataclasses.replace(base.model, num_hidden_layers=3)),
        dataclasses.replace(base, tokenizer=dataclasses.replace(base.tokenizer, vocab_size=600)),
        dataclasses.replace(base, task=dataclasses.replace(base.task, seed=1)),
    ]
    hashes = {recipe_hash(v) for v in variants} | {recipe_hash(base)}
    assert len(hashes) == len(variants) + 1
    assert fixture_name("default", base) != fixture_name("default", variants[0])
    assert fixture_name("default", base).startswith("default-")


@pytest.mark.unit
def test_bench_preset_is_big():
    bench = PRESETS["bench"].model
    assert bench.num_hidden_layers >= 12
    h, kv = bench.hidden_size, bench.hidden_size // bench.num_attention_heads * bench.num_key_value_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * bench.intermediate_size
    assert per_layer * bench.num_hidden_layers >= 50e6


@pytest.mark.unit
def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown fixture preset 'huge'"):
        build_fixture("huge", cache_dir=tmp_path)


def test_tiny_build_is_deterministic_and_force_rebuilds(tmp_path):
    a = build_fixture("tiny", cache_dir=tmp_path / "a", recipe=TINY, log=lambda _: None)
    b = build_fixture("tiny", cache_dir=tmp_path / "b", recipe=TINY, log=lambda _: None)
    assert a.name == b.name == fixture_name("tiny", TINY)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert AutoModelForCausalLM.from_pretrained(a).config.num_hidden_layers == 1

    before = (a / "fixture.json").stat().st_mtime_ns
    assert build_fixture("tiny", cache_dir=tmp_path / "a", force=True, recipe=TINY, log=lambda _: None) == a
    assert (a / "fixture.json").stat().st_mtime_ns != before
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    # Only the fixture and its lock file remain: no temp or moved-aside directories.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([a.name, f".{a.name}.lock"])


def test_concurrent_builders_train_once(tmp_path, monkeypatch):
    calls = []
    real = build_mod._build_into

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "_build_into", counting)
    results: list[Path] = []

    def build():
        results.append(build_fixture("tiny", cache_dir=tmp_path, recipe=TINY, log=lambda _: None))

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert len(calls) == 1
