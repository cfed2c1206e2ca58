"""Pushing policy changes to the rollout replicas after each step, verified by checksum.

The pusher keeps a `WeightMirror` of what the replicas serve. Full-parameter training pushes
new - served as a dense delta (or the full values) and then adopts the served values bit for bit,
so learner and rollout never drift by rounding. LoRA training pushes the change of the adapters'
product since the last push as one low-rank delta:
    s (B A - B' A') = s [B | -B'] @ [A ; A']      (rank 2r; B', A' = factors at the last push)
which the server applies as W += s B'' A'' — the same operation the mirror applies.

Replicas that come and go: a replica that fails a call is set aside by the client and the others
carry the step. While it is away the learner probes it at the start of each step; once it answers,
`resync` pushes it the mirror in full, at the mirror's version (the weights and version every replica
in service holds), and only then does it get work again. Its draft is not pushed: no call reads a
replica's draft and the learner keeps no copy of one, so a rejoining replica drafts with its own
(the draft it started with), which its online draft learning then trains on its own rollouts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
import torch

from fastgrpo.client import RolloutClient, RolloutError, Status, WeightMirror
from fastgrpo.wire.tensors import unique_state

log = logging.getLogger("fastgrpo.learner")


@dataclass(frozen=True)
class PushResult:
    version: int
    checksum: str
    bytes_sent: int
    kind: str


def served_names_state(model: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The weights as the rollout names them: for a peft model, the base weights without adapters."""
    if not lora:
        return unique_state(model.state_dict())
    state = unique_state(model.get_base_model().state_dict())
    return {n.replace(".base_layer", ""): t for n, t in state.items() if ".lora_" not in n}


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Served weight name ('model.layers.0.self_attn.q_proj.weight') -> the peft LoRA layer adapting it."""
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    return {f"{name}.weight": m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}


class Pusher:
    def __init__(self, client: RolloutClient, model: torch.nn.Module, lora: bool, push_kind: str = "dense_delta"):
        self.client = client
        self.model = model
        self.lora = lora
        self.push_kind = push_kind
        status = client.status()
        self.dtype = status.model.dtype
        self.served_checksum = status.policy_checksum
        self.mirror = WeightMirror.of(served_names_state(model, lora), self.dtype, version=status.policy_version)
        self._last_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def check_in_sync(self) -> None:
        """Raises unless the replicas serve what the learner's model holds (fresh start)."""
        if self.mirror.checksum != self.served_checksum:
            raise RuntimeError(
                f"the rollout service serves different weights than --model (checksum {self.served_checksum[:12]} "
                f"vs {self.mirror.checksum[:12]}); start both from the same model directory, or --resume"
            )

    def sync(self) -> PushResult:
        """Makes the replicas serve exactly the learner's current weights (after a resume): one full push."""
        status = self.client.status()
        if self.lora:
            base = WeightMirror.of(served_names_state(self.model, lora=True), self.dtype)
            tensors, scale, factors = self._lora_delta(since_last=False)
            merged = {**base.state, **base.preview("lora_delta", tensors, scale)}
        else:
            merged, factors = unique_state(self.model.state_dict()), {}
        results = self.client.push_weights(merged, "full", base_version=status.policy_version)
        self.mirror = WeightMirror.of(merged, self.dtype, version=results[0].version)
        self._last_factors = factors
        if not self.lora:
            self._adopt_served()
        r = results[0]
        return PushResult(r.version, r.checksum, sum(x.bytes_sent for x in results), "full")

    @property
    def version(self) -> int:
        return self.mirror.version

    # ---------------------------------------------------------------- replicas that come and go
    def rejoin_answering(self) -> list[int]:
        """Probes every set-aside replica; each one that answers is re-synced and back in service.
        Returns those that rejoined."""
        back = []
        for replica, state in enumerate(self.client.replica_states()):
            if not state.in_service:
                served = self.client.probe(replica)
                if served is not None and self.resync(replica, served):
                    back.append(replica)
        return back

    def resync(self, replica: int, served: Status) -> bool:
        """Makes `replica` (which serves `served`) serve what every replica in service does -- the
        mirror, at its version -- by a full push of every tensor (none when it serves them already),
        and puts it in service. False, and the replica set aside, when that fails."""
        mirror, address = self.mirror, self.client.replicas[replica].address
        if (served.policy_checksum, served.policy_version) != (mirror.checksum, mirror.version):
            log.warning("replica %s serves version %d (checksum %s), not the learner's %d: pushing it the learner's "
                        "weights in full", address, served.policy_version, served.policy_checksum[:12], mirror.version)
            try:
                if served.policy_version >= mirror.version:  # UpdateWeights only moves a version forward
                    raise RolloutError(grpc.StatusCode.FAILED_PRECONDITION, f"{address} serves version "
                                       f"{served.policy_version}, ahead of the learner's {mirror.version}", "resync")
                self.client.push_weights(mirror.state, "full", base_version=served.policy_version,
                                         new_version=mirror.version, replicas=[replica])
            except RolloutError as exc:
                log.warning("replica %s stays aside: %s", address, exc)
                self.client.set_aside(replica, exc)
                return False
        self.client.rejoin(replica)
        return True

    def push(self) -> PushResult:
        if self.lora:
            tensors, scale, factors = self._lora_delta()
            results = self.client.push_weights(tensors, "lora_delta", lora_scale=scale, mirror=self.mirror)
            self._last_factors = factors  # only once the replicas hold them
            kind = "lora_delta"
        else:
            if self.push_kind == "full":
                tensors = {n: t.detach() for n, t in unique_state(self.model.state_dict()).items()}
            else:
                tensors = self.mirror.dense_delta(self.model)
            if not tensors:  # nothing moved (every advantage was zero): the replicas already serve it
                return PushResult(self.mirror.version, self.mirror.checksum, 0, "none")
            results = self.client.push_weights(tensors, self.push_kind, mirror=self.mirror)
            self._adopt_served()
            kind = self.push_kind
        r = results[0]
        return PushResult(r.version, r.checksum, sum(x.bytes_sent for x in results), kind)

    @torch.no_grad()
    def _adopt_served(self) -> None:
        """Learner weights := served weights (they differ from old + delta by float rounding)."""
        state = unique_state(self.model.state_dict())
        for name, served in self.mirror.state.items():
            state[name].copy_(served.to(state[name].device, state[name].dtype))

    @torch.no_grad()
    def _lora_delta(self, since_last: bool = True) -> tuple[dict[str, torch.Tensor], float, dict]:
        tensors, scales, factors = {}, set(), {}
        for weight_name, layer in lora_modules(self.model).items():
            a = layer.lora_A["default"].weight.detach().float().cpu()  # (r, in)
            b = layer.lora_B["default"].weight.detach().float().cpu()  # (out, r)
            scales.add(float(layer.scaling["default"]))
            prev = self._last_factors.get(weight_name) if since_last else None
            if prev is None:
                a_cat, b_cat = a, b
            else:
                a_cat = torch.cat([a, prev[0]], dim=0)  # (2r, in)
                b_cat = torch.cat([b, -prev[1]], dim=1)  # (out, 2r)
            tensors[f"{weight_name}.lora_A"] = a_cat
            tensors[f"{weight_name}.lora_B"] = b_cat
            factors[weight_name] = (a.clone(), b.clone())
        if len(scales) != 1:
            raise RuntimeError(f"LoRA layers use different scales {sorted(scales)}; one push needs one scale")
        return tensors, scales.pop(), factors
