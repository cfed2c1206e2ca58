"""The rollout service's configuration: one tree of the configs of its parts.

`fastgrpo-rollout serve`'s flags are derived from it (fastgrpo.common.config): the service's own
fields take plain flags, and each nested part's fields take that part's prefix: the engine's and the
adaptive formula's none (--max-running, --c-peak), the speculation's --spec-, C_peak refinement's
--c-peak-, online draft learning's --draft-. Each default is declared once, in the part that uses it.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastgrpo.common.config import help_field, nested
from fastgrpo.rollout.draft_learning.online import DraftLearningConfig
from fastgrpo.rollout.scheduler.engine import EngineConfig
from fastgrpo.rollout.service.limits import ServiceLimits
from fastgrpo.rollout.speculative.controller import ControllerConfig, SpecConfig
from fastgrpo.rollout.speculative.online_calibration import OnlineCalibrationConfig


@dataclass(frozen=True)
class ServeConfig:
    model: str = help_field(None, "HF model directory (config.json, safetensors, tokenizer) of the policy")
    host: str = help_field("127.0.0.1", "address to bind; 0.0.0.0 exposes the service to the network")
    port: int = help_field(50051, "gRPC port (0 picks a free one)")
    http_port: int = help_field(-1, "HTTP side on --host: /metrics (Prometheus), /healthz, /readyz; 0 picks a free port, -1 = off")
    device: str = help_field("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    dtype: str = help_field("auto", "weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    max_context: int = help_field(0, "longest prompt + completion in tokens; 0 = the model's max_position_embeddings")
    auth_token: str = help_field("", "require 'authorization: Bearer <token>' metadata on every call but health checks; shows in the process list: prefer $FASTGRPO_AUTH_TOKEN or --auth-token-file")
    auth_token_file: str = help_field("", "file whose content (surrounding whitespace stripped) is the bearer token")
    tls_cert: str = help_field("", "PEM certificate chain; with --tls-key serves TLS instead of plaintext")
    tls_key: str = help_field("", "PEM private key for --tls-cert")
    draft: str = help_field("", "draft head directory (draft.safetensors + draft_config.json); enables speculative decoding")
    calibration: str = help_field("", "adaptive: calibration file from `fastgrpo-rollout profile`; its entry for this model, device and dtype sets C_peak (missing: profiled at start and saved)")
    profile_budget_s: float = help_field(60.0, "adaptive: time bound of the start-up profile when the calibration file lacks this model")
    limits: ServiceLimits = nested(ServiceLimits)
    engine: EngineConfig = nested(EngineConfig)
    spec: SpecConfig = nested(SpecConfig, "spec-")
    controller: ControllerConfig = nested(ControllerConfig)
    refine: OnlineCalibrationConfig = nested(OnlineCalibrationConfig, "c-peak-")
    draft_learning: DraftLearningConfig = nested(DraftLearningConfig, "draft-")

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("--tls-cert", "--tls-key") if self.tls_cert else ("--tls-key", "--tls-cert")
            raise ValueError(f"{given} needs {missing}: TLS takes both (without either the service is plaintext)")
        if self.auth_token and self.auth_token_file:
            raise ValueError("give the bearer token once: --auth-token or --auth-token-file")
