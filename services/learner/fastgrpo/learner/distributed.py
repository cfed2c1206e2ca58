"""The learner over several processes: torchrun's world, FSDP2 sharding, and the collectives of a step.

`torchrun --nproc-per-node N -m fastgrpo.learner.cli train ...` starts N ranks. Every rank builds the
same policy and shards it with FSDP2 (each decoder layer, then the root); rank 0 alone talks to the
rollout services. What the other ranks need from rank 0 (the step's batch, whether the weights
changed, the step's figures) arrives by broadcast of tensors, never of pickled objects. Without
WORLD_SIZE (or with 1) the learner is one plain process: no process group, no FSDP, and every
broadcast and reduction here returns its input.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class World:
    """This process's place among the learner's ranks."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this rank's model and its collectives' tensors live

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's items of n: every size-th one, so that the ranks' shares differ by at most one
        and a run of zero-advantage groups is spread over all of them."""
        return range(self.rank, n, self.size)

    def max_int(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)  # (1,)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sum_floats(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # (k,)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def world_from_env(device: str = "cpu") -> World:
    """The world torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (one process without them)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if size > 1 and torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per rank
    return World(rank, size, local_rank, device)


def init_world(device: str = "cpu") -> World:
    """The world, with its process group started when there is more than one rank: NCCL between
    GPUs, gloo between CPU processes."""
    world = world_from_env(device)
    if world.distributed and not dist.is_initialized():
        cuda = torch.device(world.device).type == "cuda"
        if cuda:
            torch.cuda.set_device(world.device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return world


def close_world() -> None:
    """Ends the process group, if one was started (torch warns at exit about one left open)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """Shards `model` in place with FSDP2: every decoder layer its own unit, the rest in the root.

    Gradients are summed across ranks, not averaged (FSDP's default): each rank's loss already
    carries the whole batch's normalisation (see GRPOLearner._train), so the sum is the gradient
    one process computes on the whole batch.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(torch.device(world.device).type, (world.size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # a plain SUM: gloo has no pre-multiplied sum, and a factor of 1 needs no scaling
            module.set_force_sum_reduction_for_comms(True)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, as transformers names them (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    return layers


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value made whole on every rank; a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's full weights, on the CPU of rank 0 ({} on the other ranks). Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def scatter_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor], world: World) -> None:
    """Loads rank 0's full weights `state` into every rank's shards (others pass {}). Collective."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state if world.is_main else {}, options=options)


# ---------------------------------------------------------------- what rank 0 sends the others
@dataclass(frozen=True)
class TrainBatch:
    """What a rank needs of a step's rollouts to train on them (rank 0 alone holds the Completions)."""

    prompts: list[list[int]]  # N rows: the prompt's token ids, once per completion
    completions: list[list[int]]  # N rows: the completion's token ids
    logprobs: list[list[float]]  # N rows: the rollout's logprob of each completion token
    advantages: torch.Tensor  # (N,) float32

    def __len__(self) -> int:
        return len(self.completions)


def share_batch(batch: TrainBatch | None, world: World) -> TrainBatch:
    """Rank 0's batch, whole, on every rank (the others pass None); each then trains on its share.

    The whole batch travels, not only each rank's share: a rank needs the batch's sequence and
    token counts for its loss normalisers, and a batch is small next to the weights."""
    if not world.distributed:
        return batch
    main = world.is_main
    prompts = broadcast_rows(batch.prompts if main else None, torch.int64, world)
    completions = broadcast_rows(batch.completions if main else None, torch.int64, world)
    logprobs = broadcast_rows(batch.logprobs if main else None, torch.float32, world)
    advantages = broadcast_tensor(batch.advantages.float() if main else None, world)  # (N,)
    return batch if main else TrainBatch(prompts, completions, logprobs, advantages)


def _broadcast(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, world: World) -> torch.Tensor:
    buf = t.to(world.device, dtype) if world.is_main else torch.empty(shape, dtype=dtype, device=world.device)
    dist.broadcast(buf, src=0)
    return buf.cpu()


def broadcast_rows(rows: list[list] | None, dtype: torch.dtype, world: World) -> list[list]:
    """Rank 0's ragged rows (token ids, logprobs) on every rank: their lengths, then one flat tensor."""
    if not world.distributed:
        return rows
    n = int(_broadcast(torch.tensor([len(rows)]) if world.is_main else None, (1,), torch.int64, world))
    if n == 0:
        return []
    lengths = _broadcast(torch.tensor([len(r) for r in rows]) if world.is_main else None, (n,), torch.int64, world)
    flat = torch.tensor([x for r in rows for x in r], dtype=dtype) if world.is_main else None  # (sum(lengths),)
    flat = _broadcast(flat, (int(lengths.sum()),), dtype, world)
    return [row.tolist() for row in flat.split(lengths.tolist())]


def broadcast_flag(flag: bool | None, world: World) -> bool:
    """Rank 0's yes or no on every rank."""
    if not world.distributed:
        return flag
    return bool(_broadcast(torch.tensor([int(bool(flag))]) if world.is_main else None, (1,), torch.int64, world))


def broadcast_tensor(t: torch.Tensor | None, world: World) -> torch.Tensor:
    """Rank 0's 1-D float tensor on every rank."""
    if not world.distributed:
        return t
    n = int(_broadcast(torch.tensor([t.numel()]) if world.is_main else None, (1,), torch.int64, world))
    return _broadcast(t, (n,), torch.float32, world)


def broadcast_record(record, cls, world: World):
    """Rank 0's dataclass of numbers (a step's figures) on every rank; the others pass None."""
    if not world.distributed:
        return record
    fields = dataclasses.fields(cls)
    values = torch.tensor([float(getattr(record, f.name)) for f in fields], dtype=torch.float64) if world.is_main else None
    values = _broadcast(values, (len(fields),), torch.float64, world).tolist()
    if world.is_main:
        return record
    return cls(**{f.name: int(v) if f.type in (int, "int") else v for f, v in zip(fields, values)})
