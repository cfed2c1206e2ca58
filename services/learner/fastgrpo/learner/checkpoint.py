"""Checkpoint and resume: model (or LoRA adapters), optimizer, step, prompt order and RNG states.

Layout of `<output_dir>/step-<N>/`: `model/` (save_pretrained, safetensors: the full weights, also
under FSDP), `optimizer.pt` (one process; written by this learner, read back with weights_only=True)
or `sharded/` (under torchrun: model and optimizer as torch.distributed.checkpoint writes them, one
file per rank), `rng.safetensors` (torch RNG state), `state.json` (step, served version, prompt
order, Python RNG state). `latest` names the newest.

Either kind resumes at any world size: `sharded/` is resharded on load (at world size 1 too, with
no process group), and a one-process checkpoint loads into FSDP shards from its full tensors.
Under torchrun every rank calls both functions; the output directory must be one all ranks see.
Checkpoints are local files the learner wrote itself; nothing here reads data from the network.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict


def save_checkpoint(learner, output_dir: str | Path) -> Path:
    world = learner.world
    out = Path(output_dir)
    final = out / f"step-{learner.step_index}"
    tmp = out / f".step-{learner.step_index}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # under FSDP rank 0's push_model holds the full weights of the shards between steps
        learner.push_model.save_pretrained(tmp / "model", safe_serialization=True)
    if world.distributed:
        world.barrier()  # tmp exists before any rank writes into it
        model_state, optim_state = get_state_dict(learner.model, learner.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "sharded"))
        world.barrier()  # every rank's shard is written before rank 0 publishes the checkpoint
    else:
        torch.save(learner.optimizer.state_dict(), tmp / "optimizer.pt")
    if world.is_main:
        _finish(learner, out, tmp, final)
    world.barrier()
    return final


def _finish(learner, out: Path, tmp: Path, final: Path) -> None:
    """Rank 0: the state files, then the checkpoint made visible under its name and in `latest`."""
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
    if (path / "sharded").exists():
        _load_sharded(learner, path)
    elif learner.world.distributed:
        _load_full_into_shards(learner, path)
    else:
        _load_one_process(learner, path)
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
    state = json.loads((path / "state.json").read_text())
    version, internal, gauss = state["python_rng"]
    learner.rng.setstate((version, tuple(internal), gauss))
    learner.order = list(state["order"])
    learner.step_index = int(state["step"])
    return learner.step_index


def _load_one_process(learner, path: Path) -> None:
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


def _load_sharded(learner, path: Path) -> None:
    """A torchrun checkpoint, resharded to this world size (one process reads every rank's file,
    with no process group)."""
    model_state, optim_state = get_state_dict(learner.model, learner.optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean, not a slip
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "sharded"), no_dist=not learner.world.distributed)
    set_state_dict(learner.model, learner.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load_full_into_shards(learner, path: Path) -> None:
    """A one-process checkpoint into FSDP shards: every rank reads the full tensors, keeps its shard."""
    from transformers import AutoModelForCausalLM

    model_state = AutoModelForCausalLM.from_pretrained(str(path / "model"), dtype=torch.float32).state_dict()
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    # optimizer.pt names parameters by their place in the optimizer; the sharded loader by name
    names = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    optim_state = {
        "state": {names[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_state_dict(learner.model, learner.optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
