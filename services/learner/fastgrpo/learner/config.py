"""Learner configuration: one dataclass, help text per field; the CLI flags are derived from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastgrpo.common.config import help_field


@dataclass(frozen=True)
class LearnerConfig:
    # ---- where things are
    rollout: str = help_field("127.0.0.1:50051", "rollout service address(es) HOST:PORT, comma-separated for several replicas")
    model: str = help_field(None, "HF model directory of the policy; must hold the weights the rollout service serves")
    auth_token: str = help_field("", "bearer token for the rollout service (also $FASTGRPO_AUTH_TOKEN)")
    output_dir: str = help_field("", "directory for checkpoints; empty = no checkpoints")
    resume: bool = help_field(False, "resume from the latest checkpoint in --output-dir")
    save_every: int = help_field(0, "save a checkpoint every N steps (0 = only at the end)")
    http_host: str = help_field("127.0.0.1", "address of the HTTP side; 0.0.0.0 exposes it to the network")
    http_port: int = help_field(-1, "HTTP side: /metrics (Prometheus), /healthz, /readyz while training; 0 picks a free port, -1 = off")
    # ---- task
    task: str = help_field("synthetic", "'synthetic' (built-in templated math) or a GSM8K-format JSONL path")
    test_task: str = help_field("", "GSM8K-format JSONL for evaluation (with a JSONL --task); empty = none")
    train_size: int = help_field(0, "train on the first N problems of the task only (0 = all): a small set comes back every epoch, as in multi-epoch GRPO")
    task_seed: int = help_field(0, "seed of the synthetic task (must match the fixture's to share its split)")
    format_reward: float = help_field(0.1, "weight of the format reward (well-formed '#### N' ending); 0 = off")
    # ---- GRPO
    steps: int = help_field(20, "GRPO steps to run")
    prompts_per_step: int = help_field(16, "Q: prompts per step")
    group_size: int = help_field(8, "G: completions per prompt")
    temperature: float = help_field(1.0, "sampling temperature of rollouts")
    top_p: float = help_field(1.0, "nucleus sampling mass of rollouts")
    max_new_tokens: int = help_field(64, "most tokens per completion")
    advantage_scale: Literal["group", "batch", "none"] = help_field("group", "advantage scaling: by group std, batch std, or none (Dr. GRPO)")
    loss_mode: Literal["grpo", "dr_grpo", "dapo"] = help_field("grpo", "loss aggregation over tokens")
    eps_low: float = help_field(0.2, "clip range below 1 for the importance ratio")
    eps_high: float = help_field(0.2, "clip range above 1 for the importance ratio (DAPO clip-higher: 0.28)")
    beta: float = help_field(0.0, "KL coefficient to the frozen reference policy (k3 estimator); 0 = no reference")
    max_staleness: int = help_field(0, "refuse completions whose policy version lags the learner's by more than this")
    # ---- optimiser
    lr: float = help_field(5e-5, "AdamW learning rate")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    grad_clip: float = help_field(1.0, "max gradient norm (0 = off)")
    micro_batch: int = help_field(32, "sequences per forward/backward pass (gradient accumulation)")
    lora: bool = help_field(False, "train LoRA adapters (peft) instead of every parameter; pushes LoRA deltas")
    lora_r: int = help_field(8, "LoRA rank")
    lora_alpha: float = help_field(16.0, "LoRA alpha (scale = alpha / r)")
    lora_targets: str = help_field("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "modules LoRA adapts")
    push_kind: Literal["dense_delta", "full"] = help_field("dense_delta", "how full-parameter changes are pushed")
    # ---- evaluation and misc
    eval_size: int = help_field(200, "test problems for greedy accuracy at start and end (0 = skip)")
    seed: int = help_field(0, "seed of prompt sampling, rollouts and training")
    device: str = help_field("cpu", "torch device of the learner")
    timeout: float = help_field(600.0, "deadline in seconds of each rollout call")

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (a group needs a baseline), got {self.group_size}")
        if self.prompts_per_step < 1 or self.steps < 0 or self.micro_batch < 1:
            raise ValueError("--prompts-per-step and --micro-batch must be >= 1, --steps >= 0")


@dataclass(frozen=True)
class DemoConfig:
    """`fastgrpo-learner demo`'s flags."""

    preset: str = help_field("default", "fixture preset of the policy: 'default' (the tests' 2.4M-parameter policy: a few CPU minutes to build once) or 'bench' (59M parameters in 12 layers, where a draft step costs far less than a target forward: about an hour to build here, and every GRPO step is slower)")
    steps: int = help_field(20, "GRPO steps")
    prompts_per_step: int = help_field(16, "Q: prompts per step")
    group_size: int = help_field(8, "G: completions per prompt")
    train_size: int = help_field(64, "problems trained on: a prompt comes back every train-size / Q steps, and its earlier completions draft for it")
    eval_size: int = help_field(200, "test problems evaluated (greedy) at start and end")
    cache_dir: str = help_field("", "fixture cache (empty: $FASTGRPO_CACHE or ~/.cache/fastgrpo)")
    http_port: int = help_field(-1, "learner's HTTP side on 127.0.0.1 (/metrics, /healthz, /readyz); 0 picks a free port, -1 = off")
    rollout_http_port: int = help_field(-1, "rollout service's HTTP side on 127.0.0.1; 0 picks a free port, -1 = off")
    baseline: bool = help_field(True, "also generate every step's prompts on a plain service (no draft), timed apart: the measured baseline")
