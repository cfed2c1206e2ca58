"""Assembling a serving rollout service from a ServeConfig: model, C_peak, speculation, draft
learning, engine, the gRPC server (with health, reflection and auth) and the HTTP side."""
from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoTokenizer

from fastgrpo.common.http import HttpSide, Startup
from fastgrpo.rollout.draft_learning.online import OnlineDraftLearner
from fastgrpo.rollout.runtime.model_runner import ModelRunner, resolve_placement
from fastgrpo.rollout.runtime.steps import compiled_batch, profile_compiled
from fastgrpo.rollout.runtime.threads import single_threaded
from fastgrpo.rollout.scheduler.engine import Engine
from fastgrpo.rollout.service.config import ServeConfig
from fastgrpo.rollout.service.interceptors import BearerAuth, MalformedRequests, auth_token
from fastgrpo.rollout.service.metrics import RolloutMetrics
from fastgrpo.rollout.service.servicer import RolloutServicer
from fastgrpo.rollout.service.weights import WeightStore
from fastgrpo.rollout.speculative.calibration import DEFAULT_SWEEP, Calibration, profile
from fastgrpo.rollout.speculative.controller import SpecController, max_tree_nodes
from fastgrpo.rollout.speculative.draft_head import DraftHead
from fastgrpo.rollout.speculative.draft_runner import Drafter
from fastgrpo.rollout.speculative.knee import knee, knee_past_sweep
from fastgrpo.rollout.speculative.online_calibration import OnlineCalibrator
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc
from fastgrpo.wire.dtypes import dtype_name
from fastgrpo.wire.records import ModelInfo

log = logging.getLogger("fastgrpo.rollout")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RolloutService"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a 4 MiB data chunk plus a manifest of thousands of tensors


@dataclass
class RolloutApp:
    server: grpc.Server
    port: int
    engine: Engine
    servicer: RolloutServicer
    health: health.HealthServicer
    http: HttpSide | None = None

    def stop(self, grace: float = 2.0) -> None:
        """Health turns NOT_SERVING and new calls are refused at once; calls in flight get `grace`
        seconds to finish, then are cancelled; the engine stops last."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.engine.shutdown()
        if self.http is not None:
            self.http.stop()


def calibrated_c_peak(cfg: ServeConfig, runner: ModelRunner, device: str, dtype: torch.dtype) -> tuple[float, str]:
    """C_peak from the calibration file's entry for this model, device and dtype; when the entry is
    missing, a profile bounded by --profile-budget-s is run now and saved; without a file, --c-peak.
    With --compile, the profile and the entry are of compiled forwards (profile_compiled)."""
    if not cfg.calibration:
        return cfg.controller.c_peak, "configured"
    key = (str(cfg.model), str(torch.device(device)), dtype_name(dtype))
    compiled = profile_compiled(cfg.engine.compile, runner.device)
    cal = Calibration.load(cfg.calibration, *key, compiled)
    if cal is None:
        log.info("no calibration for %s in %s: profiling%s (at most %.0fs)", key, cfg.calibration,
                 " compiled forwards" if compiled else "", cfg.profile_budget_s)
        points = profile(runner, DEFAULT_SWEEP, budget_s=cfg.profile_budget_s, compiled=compiled)
        cal = Calibration(knee(points), *key, points, compiled=compiled)
        cal.save(cfg.calibration)
        if knee_past_sweep(points, cal.c_peak):
            log.warning("latency never bent within %d tokens: C_peak %.0f is a lower bound (the online refinement "
                        "raises it; `fastgrpo-rollout profile --max-tokens` measures further)", max(t for t, _ in points),
                        cal.c_peak)
    return cal.c_peak, "profile"


def build_app(cfg: ServeConfig, interceptors: tuple[grpc.ServerInterceptor, ...] = ()) -> RolloutApp:
    """Loads the model and starts serving on cfg.host:cfg.port (and the HTTP side on cfg.http_port).
    `interceptors` run after authentication, on every call."""
    # the deepest tree any mode can draft bounds the depth labels
    metrics = RolloutMetrics(max(cfg.spec.depth, cfg.controller.l_max) if speculates(cfg) else 0)
    startup = Startup()
    if cfg.http_port < 0:
        return _load_and_serve(cfg, metrics, interceptors, startup)
    # up before the model loads, so that probes see a live process that is not ready yet, and what it does
    http = HttpSide(metrics.registry, startup.is_ready, cfg.host, cfg.http_port, status=startup.body)
    try:
        app = _load_and_serve(cfg, metrics, interceptors, startup)
    except BaseException:
        http.stop()
        raise
    app.http = http
    startup.ready()
    return app


def speculates(cfg: ServeConfig) -> bool:
    """Whether the service decodes speculatively: with a draft head (--draft), or from text alone
    (--spec-sources without head). Refuses a draft head that --spec-sources leaves out."""
    if cfg.draft and not cfg.spec.head:
        raise ValueError(f"--draft is given but --spec-sources {cfg.spec.sources!r} leaves the head out; "
                         "add head, or drop --draft to draft from text alone")
    return bool(cfg.draft) or not cfg.spec.head


def _load_and_serve(cfg: ServeConfig, metrics: RolloutMetrics, interceptors: tuple[grpc.ServerInterceptor, ...],
                    startup: Startup) -> RolloutApp:
    if not cfg.model:
        raise ValueError("--model is required")
    startup.begin("loading the model")
    device, dtype = resolve_placement(cfg.device, cfg.dtype)
    # the largest tree any mode can verify bounds the cache headroom, whatever C_peak turns out to be
    headroom = max_tree_nodes(cfg.controller, cfg.spec.static_tree, cfg.refine.alpha_levels) if speculates(cfg) else 0
    runner = ModelRunner.load(cfg.model, dtype, device, cfg.max_context or None, headroom)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model) if (Path(cfg.model) / "tokenizer_config.json").exists() else None
    eos = runner.config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    controller = drafter = draft_store = learner = None
    if speculates(cfg):
        startup.begin("calibrating C_peak")
        c_peak, c_peak_source = calibrated_c_peak(cfg, runner, device, dtype)
        controller = SpecController.of(cfg.spec, cfg.controller, OnlineCalibrator(c_peak, c_peak_source, cfg.refine))
    if cfg.draft:
        head = DraftHead.load(cfg.draft, runner.model)
        drafter = Drafter(head)
        draft_store = WeightStore(head)
        if cfg.draft_learning.enabled:
            learner = OnlineDraftLearner(head, draft_store, cfg.draft_learning)
    observers = [metrics] + ([learner] if learner is not None else [])
    startup.begin("allocating the KV cache and compiling the decode step"
                  if compiled_batch(cfg.engine.compile, runner.device, cfg.engine.max_running) else "allocating the KV cache")
    engine = Engine(runner, eos_ids, cfg.engine, drafter, controller, observers,
                    cfg.spec.text_drafts() if controller is not None else None)
    if learner is not None:
        engine.add_background(learner)
    info = ModelInfo(
        name=str(cfg.model),
        architecture=(runner.config.architectures or [type(runner.model).__name__])[0],
        num_parameters=runner.num_parameters(),
        vocab_size=runner.vocab_size,
        max_context=runner.max_len,
        dtype=dtype_name(dtype),
        device=str(runner.device),
        eos_token_id=eos_ids[0] if eos_ids else -1,
    )
    servicer = RolloutServicer(engine, WeightStore(runner.model), tokenizer, info, draft_store, metrics, learner,
                               cfg.limits)
    metrics.watch(servicer.status, learner)
    token = auth_token(cfg)
    auth = (BearerAuth(token),) if token else ()
    server = grpc.server(
        # (torch on one thread in each: the engine thread's is the process's one OpenMP team, runtime.threads)
        futures.ThreadPoolExecutor(max_workers=cfg.limits.workers, initializer=single_threaded),
        interceptors=auth + (MalformedRequests(),) + tuple(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),  # a second server on the port fails to bind instead of sharing it
        ],
        # long calls never wait for a worker (the servicer refuses them past their limit); this bounds
        # the quick ones that may, so that a flood costs bounded memory
        maximum_concurrent_rpcs=cfg.limits.max_concurrent_rpcs,
    )
    pb_grpc.add_RolloutServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{cfg.host}:{cfg.port}"
    try:
        if cfg.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc says only "Failed to bind"
        port = 0
    if not port:
        engine.shutdown()
        raise OSError(f"cannot listen on {address}: the port is in use, or the address is not this machine's")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s (%s, %s on %s) at %s:%d", cfg.model, info.architecture, info.dtype, info.device, cfg.host, port)
    return RolloutApp(server, port, engine, servicer, health_servicer)
