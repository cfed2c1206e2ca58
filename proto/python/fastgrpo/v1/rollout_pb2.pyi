from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]

class ModelTarget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_TARGET_UNSPECIFIED: _ClassVar[ModelTarget]
    MODEL_TARGET_POLICY: _ClassVar[ModelTarget]
    MODEL_TARGET_DRAFT: _ClassVar[ModelTarget]

class UpdateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_KIND_UNSPECIFIED: _ClassVar[UpdateKind]
    UPDATE_KIND_FULL: _ClassVar[UpdateKind]
    UPDATE_KIND_DENSE_DELTA: _ClassVar[UpdateKind]
    UPDATE_KIND_LORA_DELTA: _ClassVar[UpdateKind]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
MODEL_TARGET_UNSPECIFIED: ModelTarget
MODEL_TARGET_POLICY: ModelTarget
MODEL_TARGET_DRAFT: ModelTarget
UPDATE_KIND_UNSPECIFIED: UpdateKind
UPDATE_KIND_FULL: UpdateKind
UPDATE_KIND_DENSE_DELTA: UpdateKind
UPDATE_KIND_LORA_DELTA: UpdateKind
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "seed", "has_seed", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    has_seed: bool
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: TokenIds
    text: str
    def __init__(self, token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompts", "num_samples", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompts: _containers.RepeatedCompositeFieldContainer[Prompt]
    num_samples: int
    sampling: SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., prompts: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., num_samples: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class SpecStats(_message.Message):
    __slots__ = ("drafted_tokens", "accepted_tokens", "verify_steps", "accepted_per_depth", "accepted_siblings", "accepted_history")
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PER_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SIBLINGS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_HISTORY_FIELD_NUMBER: _ClassVar[int]
    drafted_tokens: int
    accepted_tokens: int
    verify_steps: int
    accepted_per_depth: _containers.RepeatedScalarFieldContainer[int]
    accepted_siblings: int
    accepted_history: int
    def __init__(self, drafted_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., verify_steps: _Optional[int] = ..., accepted_per_depth: _Optional[_Iterable[int]] = ..., accepted_siblings: _Optional[int] = ..., accepted_history: _Optional[int] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("request_id", "prompt_index", "sample_index", "token_ids", "logprobs", "finish_reason", "policy_version", "spec", "text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_index: int
    sample_index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: FinishReason
    policy_version: int
    spec: SpecStats
    text: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_index: _Optional[int] = ..., sample_index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., policy_version: _Optional[int] = ..., spec: _Optional[_Union[SpecStats, _Mapping]] = ..., text: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "byte_length", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_length: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., byte_length: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class LoraSpec(_message.Message):
    __slots__ = ("scale",)
    SCALE_FIELD_NUMBER: _ClassVar[int]
    scale: float
    def __init__(self, scale: _Optional[float] = ...) -> None: ...

class WeightHeader(_message.Message):
    __slots__ = ("target", "kind", "base_version", "new_version", "tensors", "lora")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    target: ModelTarget
    kind: UpdateKind
    base_version: int
    new_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    lora: LoraSpec
    def __init__(self, target: _Optional[_Union[ModelTarget, str]] = ..., kind: _Optional[_Union[UpdateKind, str]] = ..., base_version: _Optional[int] = ..., new_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: WeightHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[WeightHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateWeightsReply(_message.Message):
    __slots__ = ("target", "version", "checksum", "seconds", "bytes_received")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    target: ModelTarget
    version: int
    checksum: str
    seconds: float
    bytes_received: int
    def __init__(self, target: _Optional[_Union[ModelTarget, str]] = ..., version: _Optional[int] = ..., checksum: _Optional[str] = ..., seconds: _Optional[float] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "num_parameters", "vocab_size", "max_context", "dtype", "device", "eos_token_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    num_parameters: int
    vocab_size: int
    max_context: int
    dtype: str
    device: str
    eos_token_id: int
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., num_parameters: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_context: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., eos_token_id: _Optional[int] = ...) -> None: ...

class TrainDraftRequest(_message.Message):
    __slots__ = ("run_now", "set_policy", "every_n_batches")
    RUN_NOW_FIELD_NUMBER: _ClassVar[int]
    SET_POLICY_FIELD_NUMBER: _ClassVar[int]
    EVERY_N_BATCHES_FIELD_NUMBER: _ClassVar[int]
    run_now: bool
    set_policy: bool
    every_n_batches: int
    def __init__(self, run_now: _Optional[bool] = ..., set_policy: _Optional[bool] = ..., every_n_batches: _Optional[int] = ...) -> None: ...

class TrainDraftReply(_message.Message):
    __slots__ = ("draft_version", "every_n_batches", "rounds", "steps", "last_loss", "last_top1", "samples_seen", "seconds", "buffer_sequences", "buffer_bytes", "dropped_sequences")
    DRAFT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVERY_N_BATCHES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_TOP1_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_SEEN_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    BUFFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    draft_version: int
    every_n_batches: int
    rounds: int
    steps: int
    last_loss: float
    last_top1: float
    samples_seen: int
    seconds: float
    buffer_sequences: int
    buffer_bytes: int
    dropped_sequences: int
    def __init__(self, draft_version: _Optional[int] = ..., every_n_batches: _Optional[int] = ..., rounds: _Optional[int] = ..., steps: _Optional[int] = ..., last_loss: _Optional[float] = ..., last_top1: _Optional[float] = ..., samples_seen: _Optional[int] = ..., seconds: _Optional[float] = ..., buffer_sequences: _Optional[int] = ..., buffer_bytes: _Optional[int] = ..., dropped_sequences: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("policy_version", "policy_checksum", "running_sequences", "queued_sequences", "model", "max_running_sequences", "draft_version", "speculation", "kv_cache")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    policy_checksum: str
    running_sequences: int
    queued_sequences: int
    model: ModelInfo
    max_running_sequences: int
    draft_version: int
    speculation: SpeculationStatus
    kv_cache: KVCacheStatus
    def __init__(self, policy_version: _Optional[int] = ..., policy_checksum: _Optional[str] = ..., running_sequences: _Optional[int] = ..., queued_sequences: _Optional[int] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., max_running_sequences: _Optional[int] = ..., draft_version: _Optional[int] = ..., speculation: _Optional[_Union[SpeculationStatus, _Mapping]] = ..., kv_cache: _Optional[_Union[KVCacheStatus, _Mapping]] = ...) -> None: ...

class KVCacheStatus(_message.Message):
    __slots__ = ("block_size", "blocks_total", "bytes_total", "blocks_used", "blocks_cached", "blocks_free", "preemptions", "shared_prompt_tokens")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    SHARED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    blocks_total: int
    bytes_total: int
    blocks_used: int
    blocks_cached: int
    blocks_free: int
    preemptions: int
    shared_prompt_tokens: int
    def __init__(self, block_size: _Optional[int] = ..., blocks_total: _Optional[int] = ..., bytes_total: _Optional[int] = ..., blocks_used: _Optional[int] = ..., blocks_cached: _Optional[int] = ..., blocks_free: _Optional[int] = ..., preemptions: _Optional[int] = ..., shared_prompt_tokens: _Optional[int] = ...) -> None: ...

class SpeculationStatus(_message.Message):
    __slots__ = ("mode", "c_peak", "c_peak_source", "batch_size", "n_verify", "width", "depth", "c_peak_start", "c_peak_start_source", "c_peak_updates", "alpha", "alpha_start", "alpha_updates", "sources", "accepted_head", "accepted_siblings", "accepted_history", "history_tokens", "history_prompts", "steps_head", "steps_text", "steps_plain", "way_rates")
    MODE_FIELD_NUMBER: _ClassVar[int]
    C_PEAK_FIELD_NUMBER: _ClassVar[int]
    C_PEAK_SOURCE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    N_VERIFY_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    C_PEAK_START_FIELD_NUMBER: _ClassVar[int]
    C_PEAK_START_SOURCE_FIELD_NUMBER: _ClassVar[int]
    C_PEAK_UPDATES_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_START_FIELD_NUMBER: _ClassVar[int]
    ALPHA_UPDATES_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_HEAD_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SIBLINGS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_HISTORY_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_HEAD_FIELD_NUMBER: _ClassVar[int]
    STEPS_TEXT_FIELD_NUMBER: _ClassVar[int]
    STEPS_PLAIN_FIELD_NUMBER: _ClassVar[int]
    WAY_RATES_FIELD_NUMBER: _ClassVar[int]
    mode: str
    c_peak: float
    c_peak_source: str
    batch_size: int
    n_verify: int
    width: int
    depth: int
    c_peak_start: float
    c_peak_start_source: str
    c_peak_updates: int
    alpha: float
    alpha_start: float
    alpha_updates: int
    sources: str
    accepted_head: int
    accepted_siblings: int
    accepted_history: int
    history_tokens: int
    history_prompts: int
    steps_head: int
    steps_text: int
    steps_plain: int
    way_rates: _containers.RepeatedCompositeFieldContainer[WayRate]
    def __init__(self, mode: _Optional[str] = ..., c_peak: _Optional[float] = ..., c_peak_source: _Optional[str] = ..., batch_size: _Optional[int] = ..., n_verify: _Optional[int] = ..., width: _Optional[int] = ..., depth: _Optional[int] = ..., c_peak_start: _Optional[float] = ..., c_peak_start_source: _Optional[str] = ..., c_peak_updates: _Optional[int] = ..., alpha: _Optional[float] = ..., alpha_start: _Optional[float] = ..., alpha_updates: _Optional[int] = ..., sources: _Optional[str] = ..., accepted_head: _Optional[int] = ..., accepted_siblings: _Optional[int] = ..., accepted_history: _Optional[int] = ..., history_tokens: _Optional[int] = ..., history_prompts: _Optional[int] = ..., steps_head: _Optional[int] = ..., steps_text: _Optional[int] = ..., steps_plain: _Optional[int] = ..., way_rates: _Optional[_Iterable[_Union[WayRate, _Mapping]]] = ...) -> None: ...

class WayRate(_message.Message):
    __slots__ = ("with_history", "batch_size", "way", "tokens_per_second", "step_seconds", "measured")
    WITH_HISTORY_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    WAY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_FIELD_NUMBER: _ClassVar[int]
    with_history: bool
    batch_size: int
    way: str
    tokens_per_second: float
    step_seconds: float
    measured: bool
    def __init__(self, with_history: _Optional[bool] = ..., batch_size: _Optional[int] = ..., way: _Optional[str] = ..., tokens_per_second: _Optional[float] = ..., step_seconds: _Optional[float] = ..., measured: _Optional[bool] = ...) -> None: ...
