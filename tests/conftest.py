"""Shared test fixtures (real HF checkpoints, real rollout services on 127.0.0.1) and the test tiers.

Every test has a tier, its closest `pytest.mark.unit / service / system` (a module's `pytestmark`, or
the test's own mark where it differs):
  unit     seconds each; pure functions, and engines in this process on tiny random models; no
           subprocess, no trained fixture, no gRPC server (`make test-unit`, the inner loop);
  service  real rollout services over real gRPC on 127.0.0.1 (in this process or their own), and
           whatever needs the trained fixture policy;
  system   a real Prometheus, compose validation, fixture builds, the example and CLI smoke runs.
`make test` runs all three, `pytest --tier unit` (make test-unit) one of them. A test without a
tier, or a unit test that asks for a service, the trained fixture or a subprocess, is an error.
"""
from __future__ import annotations

import contextlib
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from fastgrpo.client.local import ServiceProcess

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)


def tiny_config(arch: str = "qwen2", vocab_size: int = 97, layers: int = 2, tie: bool = False, max_pos: int = 256):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=tie,
    )


def save_random_model(path: Path, arch: str = "qwen2", seed: int = 0, **kwargs) -> Path:
    """A random-init HF checkpoint (config + safetensors; no tokenizer) that transformers loads."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs))
    model.save_pretrained(path)
    return path


BUILD_FIXTURES = "run `make test-fixtures` (make test does), or `fastgrpo-fixture draft`"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The trained fixture policy, as `make test-fixtures` built it (no test trains it)."""
    from fastgrpo.fixture import cached_fixture

    path = cached_fixture("default")
    if path is None:
        pytest.fail(f"the default fixture policy is not built: {BUILD_FIXTURES}")
    return path


@pytest.fixture(scope="session")
def draft_dir(fixture_dir) -> Path:
    """The fixture policy's bootstrapped draft head, as `make test-fixtures` built it."""
    from fastgrpo.fixture.draft import cached_draft

    path = cached_draft(fixture_dir)
    if path is None:
        pytest.fail(f"the fixture policy's draft is not built: {BUILD_FIXTURES}")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny-qwen2-tied"), "qwen2", seed=1, tie=True)


@pytest.fixture
def start_service():
    """Factory: start_service(model_dir, port=0, interceptors=(), **flags) -> RolloutApp serving in
    this process. flags are `fastgrpo-rollout serve` flags by name, parsed by its own parser:
    max_running=4 -> --max-running 4, draft_learning=False -> --no-draft-learning."""
    from fastgrpo.rollout.service.app import build_app
    from fastgrpo.rollout.service.cli import serve_config

    apps = []

    def start(model_dir, port: int = 0, interceptors=(), **flags):
        argv = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        for name, value in flags.items():
            flag = name.replace("_", "-")
            argv += [f"--{flag}"] if value is True else [f"--no-{flag}"] if value is False else [f"--{flag}", str(value)]
        app = build_app(serve_config(argv), interceptors)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop(grace=0.5)


@pytest.fixture
def service_process():
    """Factory: service_process(model_dir, *serve_flags, port=0, http=False) -> a rollout service in its
    own OS process (ServiceProcess; http=True also starts its HTTP side), stopped after the test."""
    procs = []

    def start(model_dir, *extra, port: int = 0, http: bool = False):
        p = ServiceProcess(model_dir, *extra, port=port, threads=1, http_port=0 if http else None)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop(timeout=5)


@pytest.fixture
def stubs():
    """Factory: stubs(address) -> probes.Stubs on a channel of its own, closed after the test."""
    from probes import Stubs

    opened = []

    def open_(address: str):
        s = Stubs(address)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.channel.close()


@contextlib.contextmanager
def engine_held(engine):
    """Holds `engine` between two steps for the block (run_exclusive): nothing decodes, no update is
    applied, queued work waits; it goes on once the block ends, however it ends."""
    held, gate = threading.Event(), threading.Event()
    holder = threading.Thread(target=engine.run_exclusive, args=(lambda: (held.set(), gate.wait()),), daemon=True)
    holder.start()
    try:
        assert held.wait(30), "the engine never ran the held function"
        yield
    finally:
        gate.set()
        holder.join(30)


TIERS = ("unit", "service", "system")
NOT_FOR_UNIT = {"fixture_dir", "draft_dir", "start_service", "service_process"}  # services, the trained fixture


def tier_of(item: pytest.Item) -> str | None:
    marker = next((m for m in item.iter_markers() if m.name in TIERS), None)  # the closest one
    return marker.name if marker else None


def pytest_addoption(parser):
    parser.addoption("--tier", action="append", choices=TIERS, default=[],
                     help="run only the tests of this tier (repeatable; default: every tier)")


def pytest_collection_modifyitems(config, items):
    chosen = set(config.getoption("--tier")) or set(TIERS)
    keep, drop = [], []
    for item in items:
        tier = tier_of(item)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid} has no tier: mark it unit, service or system (tests/conftest.py)")
        wanted = NOT_FOR_UNIT & set(getattr(item, "fixturenames", ()))
        if tier == "unit" and wanted:
            raise pytest.UsageError(f"{item.nodeid} is a unit test but uses {sorted(wanted)}: mark it service")
        (keep if tier in chosen else drop).append(item)
    if drop:  # (-m unit would also pick a service test in a unit module: a test's closest tier counts)
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """A unit test that starts a subprocess fails: that test belongs to another tier."""
    if tier_of(request.node) == "unit":
        def refuse(*args, **kwargs):
            raise AssertionError(f"unit test {request.node.nodeid} started a subprocess: mark it service or system")

        monkeypatch.setattr(subprocess, "Popen", refuse)
