"""Shared test fixtures: real HF checkpoints and real rollout services on 127.0.0.1."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastgrpo.rollout.process import ServiceProcess

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


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The trained fixture policy (built once, cached by recipe hash)."""
    from fastgrpo.fixture import build_fixture

    return build_fixture("default")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("tiny-qwen2-tied"), "qwen2", seed=1, tie=True)


@pytest.fixture
def start_service():
    """Factory: start_service(model_dir, **ServeConfig overrides) -> RolloutApp serving in this process."""
    from fastgrpo.rollout.server import ServeConfig, build_app

    apps = []

    def start(model_dir, **overrides):
        app = build_app(ServeConfig(model=str(model_dir), host="127.0.0.1", port=overrides.pop("port", 0), **overrides))
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop(grace=0.5)


@pytest.fixture
def service_process():
    procs = []

    def start(model_dir, *extra, port: int = 0):
        p = ServiceProcess(model_dir, *extra, port=port, threads=1)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()
