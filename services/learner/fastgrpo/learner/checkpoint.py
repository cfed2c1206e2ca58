"""Checkpoint and resume: model (or LoRA adapters), optimizer, step, prompt order and RNG states.

Layout of `<output_dir>/step-<N>/`: `model/` (save_pretrained, safetensors), `optimizer.pt`
(written by this learner, read back with weights_only=True), `rng.safetensors` (torch RNG state),
`state.json` (step, served version, prompt order, Python RNG state). `latest` names the newest.
Checkpoints are local files the learner wrote itself; nothing here reads data from the network.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(learner, output_dir: str | Path) -> Path:
    out = Path(output_dir)
    final = out / f"step-{learner.step_index}"
    tmp = out / f".step-{learner.step_index}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    learner.model.save_pretrained(tmp / "model", safe_serialization=True)
    torch.save(learner.optimizer.state_dict(), tmp / "optimizer.pt")
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    version, internal, gauss = learner.rng.getstate()
    state = {
        "step": learner.step_index,
        "served_version": learner.pusher.version,
        "order": learner.order,
        "python_rng": [version, list(internal), gauss],
    }
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (out / "latest").write_text(final.name)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    marker = Path(output_dir) / "latest"
    if not marker.exists():
        return None
    path = Path(output_dir) / marker.read_text().strip()
    return path if path.exists() else None


@torch.no_grad()
def load_checkpoint(learner, path: str | Path) -> int:
    """Restores learner state from `path`; returns the step to continue from."""
    path = Path(path)
    model_dir = path / "model"
    if learner.cfg.lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file as load_adapter

        set_peft_model_state_dict(learner.model, load_adapter(str(model_dir / "adapter_model.safetensors")))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        learner.model.load_state_dict(saved.state_dict())
    learner.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
    state = json.loads((path / "state.json").read_text())
    version, internal, gauss = state["python_rng"]
    learner.rng.setstate((version, tuple(internal), gauss))
    learner.order = list(state["order"])
    learner.step_index = int(state["step"])
    return learner.step_index
