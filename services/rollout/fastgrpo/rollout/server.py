"""gRPC side of the rollout service: servicer (validate, convert, delegate), health, reflection, auth."""
from __future__ import annotations

import logging
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoTokenizer

from fastgrpo.common.cli import help_field
from fastgrpo.common.http import HttpSide
from fastgrpo.rollout import convert
from fastgrpo.rollout.engine.engine import Engine, EngineConfig
from fastgrpo.rollout.engine.model_runner import ModelRunner
from fastgrpo.rollout.engine.types import InvalidRequest
from fastgrpo.rollout.metrics import RolloutMetrics
from fastgrpo.rollout.calibration import DEFAULT_SWEEP, Calibration, knee, knee_past_sweep, profile
from fastgrpo.rollout.controller import ControllerConfig, SpecPolicy
from fastgrpo.rollout.online_calibration import OnlineCalibrator, RefineConfig
from fastgrpo.rollout.draft_learning.online import OnlineConfig, OnlineDraftLearner
from fastgrpo.rollout.speculative.decode import VERIFY_RULES
from fastgrpo.rollout.speculative.draft import DraftHead
from fastgrpo.rollout.speculative.drafter import Drafter, TreeShape
from fastgrpo.rollout.weights import WeightStore
from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.v1 import rollout_pb2_grpc as pb_grpc
from fastgrpo.wire.tensors import WireError, dtype_name

log = logging.getLogger("fastgrpo.rollout")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RolloutService"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a 4 MiB data chunk plus a manifest of thousands of tensors


@dataclass(frozen=True)
class ServeConfig:
    model: str = help_field(None, "HF model directory (config.json, safetensors, tokenizer) of the policy")
    host: str = help_field("127.0.0.1", "address to bind; 0.0.0.0 exposes the service to the network")
    port: int = help_field(50051, "gRPC port (0 picks a free one)")
    http_port: int = help_field(-1, "HTTP side on --host: /metrics (Prometheus), /healthz, /readyz; 0 picks a free port, -1 = off")
    device: str = help_field("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    dtype: str = help_field("auto", "weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    max_running: int = help_field(64, "most sequences decoding at once (KV-cache slots)")
    max_context: int = help_field(0, "longest prompt + completion in tokens; 0 = the model's max_position_embeddings")
    max_prefill_tokens: int = help_field(4096, "prompt tokens admitted into one prefill step")
    auth_token: str = help_field("", "require 'authorization: Bearer <token>' metadata on every call (also $FASTGRPO_AUTH_TOKEN)")
    tls_cert: str = help_field("", "PEM certificate chain; with --tls-key serves TLS instead of plaintext")
    tls_key: str = help_field("", "PEM private key for --tls-cert")
    workers: int = help_field(32, "gRPC worker threads (each streaming Generate call holds one)")
    draft: str = help_field("", "draft head directory (draft.safetensors + draft_config.json); enables speculative decoding")
    spec_mode: str = help_field("static", "speculation with --draft: static (fixed K, L, N_verify), adaptive (from the live batch size and --c-peak), off")
    spec_width: int = help_field(4, "static K: children per tree node and nodes expanded per level")
    spec_depth: int = help_field(5, "static L: tree depth (draft steps per verify step)")
    spec_n_verify: int = help_field(16, "static N_verify: tree nodes (root included) verified per sequence and step")
    spec_verify: str = help_field("rrs", "how sampled sequences verify: rrs (children drawn from the draft, recursive rejection sampling) or match (top-K children, sample-matching); greedy always matches exactly")
    c_peak: float = help_field(160.0, "adaptive: tokens per target forward at the compute knee (160 is the paper's GPU figure; measure yours)")
    calibration: str = help_field("", "adaptive: calibration file from `fastgrpo-rollout profile`; its entry for this model, device and dtype sets C_peak (missing: profiled at start and saved)")
    c_peak_refine: bool = help_field(True, "adaptive: refine C_peak online from the latencies of the decode steps served, and alpha from how deep accepted paths reach (GetStatus shows both beside their start values)")
    c_peak_explore_every: int = help_field(2, "adaptive, online refinement: every n-th step sizes its trees up to 4x above or below C_peak to see both sides of the knee (0 = never)")
    profile_budget_s: float = help_field(60.0, "adaptive: time bound of the start-up profile when the calibration file lacks this model")
    n_max: int = help_field(160, "adaptive: largest N_verify")
    k_max: int = help_field(8, "adaptive: largest K")
    l_min: int = help_field(3, "adaptive: smallest L")
    l_max: int = help_field(5, "adaptive: largest L")
    alpha: float = help_field(0.75, "adaptive: L = floor(log2(N_verify / alpha)); the start value when --c-peak-refine refines it")
    draft_learning: bool = help_field(True, "with --draft: keep training the draft online on the pairs verification captures")
    draft_every_n_batches: int = help_field(1, "online draft learning: a round after every N finished Generate requests (0 = only on TrainDraft)")
    draft_buffer_bytes: int = help_field(256 * 1024 * 1024, "online draft learning: capture buffer bound in bytes")
    draft_lr: float = help_field(3e-4, "online draft learning: AdamW learning rate")
    draft_warmup_steps: int = help_field(16, "online draft learning: optimiser steps over which the learning rate ramps up")
    draft_batch_size: int = help_field(16, "online draft learning: sequences per optimiser step")
    draft_max_steps: int = help_field(64, "online draft learning: optimiser steps per round at most")
    draft_time_fraction: float = help_field(0.05, "online draft learning: scheduled rounds use at most this fraction of serving time (0 = unbounded; TrainDraft rounds are not bounded)")


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"--dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return device, table[dtype]


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    def __init__(self, engine: Engine, policy: WeightStore, tokenizer, model_info: pb.ModelInfo,
                 draft: WeightStore | None = None, metrics: RolloutMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or RolloutMetrics()
        self.policy = policy
        self.draft = draft
        self.tokenizer = tokenizer
        self.model_info = model_info

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        request_id = request.request_id or uuid.uuid4().hex
        try:
            req = convert.request_from_pb(request, request_id, self._tokenize)
            handle = self.engine.submit(req)
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OverflowError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        self.metrics.requests.inc()
        context.add_callback(handle.cancel)  # client gone or deadline hit: free its slots
        for result in handle:
            text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True) if self.tokenizer else ""
            yield convert.completion_to_pb(result, text)

    def _tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("prompts.text", "this model has no tokenizer; send token_ids")
        return self.tokenizer(text)["input_ids"]

    def UpdateWeights(self, request_iterator, context: grpc.ServicerContext):
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("payload") != "header":
                raise WireError("the first message of the stream must carry the header")
            header = first.header
            store = self._store(header.target)
            pending = store.begin(header)
            for msg in request_iterator:
                if msg.WhichOneof("payload") != "data":
                    raise WireError("only data chunks may follow the header")
                pending.receive(msg.data)
            pending.finish()
            result = self.engine.run_exclusive(lambda: self._commit(store, pending))
        except WireError as exc:
            log.warning("weight update refused: %s", exc)
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        log.info("weights updated to version %d in %.3fs (%d bytes)", result.version, result.seconds, result.bytes_received)
        self.metrics.weights_updated("policy" if store is self.policy else "draft", result.seconds, result.bytes_received)
        return pb.UpdateWeightsReply(
            target=header.target,
            version=result.version,
            checksum=result.checksum,
            seconds=result.seconds,
            bytes_received=result.bytes_received,
        )

    def _commit(self, store: WeightStore, pending):
        # runs on the engine thread, so sequences admitted from the next step on carry the new version
        result = store.commit(pending)
        if store is self.policy:
            self.engine.policy_version = result.version
        elif self.engine.draft_learner is not None:  # a draft pushed from outside replaces the shadow too
            self.engine.draft_learner.sync_from_live()
        return result

    def _store(self, target: int) -> WeightStore:
        if target == pb.MODEL_TARGET_POLICY:
            return self.policy
        if target == pb.MODEL_TARGET_DRAFT:
            if self.draft is None:
                raise WireError("header.target: this server hosts no draft model (start it with --draft)",
                                "FAILED_PRECONDITION")
            return self.draft
        raise WireError(f"header.target: unknown target {target}")

    def TrainDraft(self, request: pb.TrainDraftRequest, context: grpc.ServicerContext):
        learner = self.engine.draft_learner
        if learner is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "draft learning is not enabled (start the server with --draft and --draft-learning)")
        if request.set_policy:
            if request.every_n_batches < 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"every_n_batches: must be >= 0, got {request.every_n_batches}")
            learner.set_policy(request.every_n_batches)
        if request.run_now:
            fut = self.engine.train_draft_now()
            try:
                fut.result(timeout=context.time_remaining())
            except TimeoutError:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the draft round did not finish before the deadline")
        st = learner.stats()
        return pb.TrainDraftReply(
            draft_version=st.draft_version, every_n_batches=st.every_n_batches, rounds=st.rounds, steps=st.steps,
            last_loss=st.last_loss, last_top1=st.last_top1, samples_seen=st.samples_seen, seconds=st.seconds,
            buffer_sequences=st.buffer_sequences, buffer_bytes=st.buffer_bytes, dropped_sequences=st.dropped_sequences,
        )

    def GetStatus(self, request, context):
        return self.status()

    def status(self) -> pb.StatusReply:
        """What GetStatus answers; the metrics layer reads it at every scrape."""
        snap = self.engine.snapshot()
        return pb.StatusReply(
            policy_version=self.policy.version,
            policy_checksum=self.policy.checksum,
            running_sequences=snap["running"],
            queued_sequences=snap["queued"],
            model=self.model_info,
            max_running_sequences=self.engine.config.max_running,
            draft_version=self.draft.version if self.draft is not None else 0,
            speculation=self._speculation(),
        )

    def _speculation(self) -> pb.SpeculationStatus:
        policy = self.engine.policy
        if policy is None:
            return pb.SpeculationStatus()
        tree = self.engine.last_tree
        cal = policy.calibrator
        c_peak, source = cal.snapshot()
        return pb.SpeculationStatus(
            mode=policy.mode, c_peak=c_peak, c_peak_source=source,
            batch_size=self.engine.last_batch_size, n_verify=tree.n_verify if tree else 0,
            width=tree.width if tree else 0, depth=tree.depth if tree else 0,
            c_peak_start=cal.initial[0], c_peak_start_source=cal.initial[1], c_peak_updates=cal.updates,
            alpha=policy.alpha, alpha_start=policy.controller.alpha, alpha_updates=cal.alpha_updates,
        )


class BearerAuth(grpc.ServerInterceptor):
    """Rejects calls without 'authorization: Bearer <token>'. Health checks stay open for probes."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get("authorization") != self._expected:
            return self._deny
        return continuation(handler_call_details)


@dataclass
class RolloutApp:
    server: grpc.Server
    port: int
    engine: Engine
    servicer: RolloutServicer
    health: health.HealthServicer
    http: HttpSide | None = None

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.engine.shutdown()
        if self.http is not None:
            self.http.stop()


def calibrated_c_peak(cfg: ServeConfig, runner: ModelRunner, device: str, dtype: torch.dtype) -> tuple[float, str]:
    """C_peak from the calibration file's entry for this model, device and dtype; when the entry is
    missing, a profile bounded by --profile-budget-s is run now and saved; without a file, --c-peak."""
    if not cfg.calibration:
        return cfg.c_peak, "configured"
    key = (str(cfg.model), str(torch.device(device)), dtype_name(dtype))
    cal = Calibration.load(cfg.calibration, *key)
    if cal is None:
        log.info("no calibration for %s in %s: profiling (at most %.0fs)", key, cfg.calibration, cfg.profile_budget_s)
        points = profile(runner, DEFAULT_SWEEP, budget_s=cfg.profile_budget_s)
        cal = Calibration(knee(points), *key, points)
        cal.save(cfg.calibration)
        if knee_past_sweep(points, cal.c_peak):
            log.warning("latency never bent within %d tokens: C_peak %.0f is a lower bound (the online refinement "
                        "raises it; `fastgrpo-rollout profile --max-tokens` measures further)", max(t for t, _ in points),
                        cal.c_peak)
    return cal.c_peak, "profile"


def build_app(cfg: ServeConfig) -> RolloutApp:
    """Loads the model and starts serving on cfg.host:cfg.port (and the HTTP side on cfg.http_port)."""
    # the deepest tree any mode can draft bounds the depth labels
    metrics = RolloutMetrics(max(cfg.spec_depth, cfg.l_max) if cfg.draft else 0)
    if cfg.http_port < 0:
        return _load_and_serve(cfg, metrics)
    # up before the model loads, so that probes see a live process that is not ready yet
    ready = threading.Event()
    http = HttpSide(metrics.registry, ready.is_set, cfg.host, cfg.http_port)
    try:
        app = _load_and_serve(cfg, metrics)
    except BaseException:
        http.stop()
        raise
    app.http = http
    ready.set()
    return app


def _load_and_serve(cfg: ServeConfig, metrics: RolloutMetrics) -> RolloutApp:
    if not cfg.model:
        raise ValueError("--model is required")
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    if cfg.draft and cfg.spec_mode not in ("static", "adaptive", "off"):
        raise ValueError(f"--spec-mode must be static, adaptive or off; got {cfg.spec_mode!r}")
    if cfg.draft and cfg.spec_verify not in VERIFY_RULES:
        raise ValueError(f"--spec-verify must be one of {', '.join(VERIFY_RULES)}; got {cfg.spec_verify!r}")
    # the largest tree any mode can verify bounds the cache headroom, whatever C_peak turns out to be
    headroom = max(cfg.spec_n_verify, cfg.n_max) if cfg.draft else 0
    runner = ModelRunner.load(cfg.model, dtype, device, cfg.max_running, cfg.max_context or None, headroom)
    policy = None
    if cfg.draft:
        c_peak, c_peak_source = calibrated_c_peak(cfg, runner, device, dtype)
        refine = RefineConfig(enabled=cfg.c_peak_refine, explore_every=cfg.c_peak_explore_every)
        policy = SpecPolicy(
            cfg.spec_mode,
            ControllerConfig(c_peak, cfg.n_max, cfg.k_max, cfg.l_min, cfg.l_max, cfg.alpha),
            TreeShape(cfg.spec_width, cfg.spec_depth, cfg.spec_n_verify),
            cfg.spec_verify,
            OnlineCalibrator(c_peak, c_peak_source, refine),
        )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model) if (Path(cfg.model) / "tokenizer_config.json").exists() else None
    eos = runner.config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    drafter, draft_store = None, None
    if policy is not None:
        head = DraftHead.load(cfg.draft, runner.model)
        drafter = Drafter(head, cfg.max_running, runner.cache.max_len + policy.draft_headroom())
        draft_store = WeightStore(head)
    engine = Engine(runner, eos_ids, EngineConfig(max_running=cfg.max_running, max_prefill_tokens=cfg.max_prefill_tokens),
                    drafter, policy, metrics)
    info = pb.ModelInfo(
        name=str(cfg.model),
        architecture=(runner.config.architectures or [type(runner.model).__name__])[0],
        num_parameters=runner.num_parameters(),
        vocab_size=runner.vocab_size,
        max_context=runner.max_len,
        dtype=dtype_name(dtype),
        device=str(runner.device),
        eos_token_id=eos_ids[0] if eos_ids else -1,
    )
    if draft_store is not None and cfg.draft_learning:
        engine.attach_draft_learner(OnlineDraftLearner(drafter.head, draft_store, OnlineConfig(
            every_n_batches=cfg.draft_every_n_batches, buffer_bytes=cfg.draft_buffer_bytes,
            batch_size=cfg.draft_batch_size, max_steps_per_round=cfg.draft_max_steps, lr=cfg.draft_lr,
            warmup_steps=cfg.draft_warmup_steps,
            time_fraction=cfg.draft_time_fraction)))
    servicer = RolloutServicer(engine, WeightStore(runner.model), tokenizer, info, draft_store, metrics)
    metrics.watch(servicer.status, engine.draft_learner)
    interceptors = [BearerAuth(cfg.auth_token)] if cfg.auth_token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.workers),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_RolloutServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert:
        creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s (%s, %s on %s) at %s:%d", cfg.model, info.architecture, info.dtype, info.device, cfg.host, port)
    return RolloutApp(server, port, engine, servicer, health_servicer)
