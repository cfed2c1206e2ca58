"""The records that travel between the rollout service and its clients, defined once.

Plain frozen dataclasses whose field names are those of the proto messages they travel as
(`fastgrpo.wire.convert` maps them, by name, in one place). The rollout engine produces them, the
service sends them, the clients return them to the trainer. Nothing here imports protobuf or torch,
so any layer may use them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "unspecified"]


@dataclass(frozen=True)
class Sampling:
    """How to sample one Generate call's completions (SamplingParams in rollout.proto)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # None: a fresh random seed per request
    ignore_eos: bool = False


@dataclass(frozen=True)
class SpecStats:
    """Speculative-decoding counts of one sequence, or summed over many (zero while speculation is off)."""

    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    accepted_per_depth: tuple[int, ...] = ()  # [d]: draft tokens accepted at tree depth d + 1
    accepted_siblings: int = 0  # of accepted_tokens, proposed from the sibling samples' text
    accepted_history: int = 0  # of accepted_tokens, proposed from the prompt's earlier completions

    @property
    def accepted_head(self) -> int:
        """Of accepted_tokens, those the draft head proposed."""
        return self.accepted_tokens - self.accepted_siblings - self.accepted_history

    @property
    def acceptance_length(self) -> float:
        """Tokens emitted per verify step (accepted draft tokens plus the target's own token)."""
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    @staticmethod
    def total(stats: "list[SpecStats]") -> "SpecStats":
        """Counts summed over completions (acceptance_length of the total weights steps, not sequences)."""
        depth = max((len(s.accepted_per_depth) for s in stats), default=0)
        return SpecStats(sum(s.drafted_tokens for s in stats), sum(s.accepted_tokens for s in stats),
                         sum(s.verify_steps for s in stats),
                         tuple(sum(s.accepted_per_depth[d] for s in stats if d < len(s.accepted_per_depth))
                               for d in range(depth)),
                         sum(s.accepted_siblings for s in stats), sum(s.accepted_history for s in stats))


@dataclass(frozen=True)
class Completion:
    """One finished sequence: sample `sample_index` of prompt `prompt_index` of a Generate call."""

    request_id: str
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]  # log p(token | prefix) under softmax(logits / T) (T = 1 when greedy)
    finish_reason: FinishReason
    policy_version: int  # oldest policy version that produced any of the tokens
    spec: SpecStats = SpecStats()
    text: str = ""  # the completion decoded by the server's tokenizer ("" without one)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    num_parameters: int
    vocab_size: int
    max_context: int
    dtype: str
    device: str
    eos_token_id: int


@dataclass(frozen=True)
class KVCache:
    """The paged KV cache now (GetStatus): blocks of block_size tokens, used / cached / free,
    preemptions and prompt tokens served from shared blocks since the start."""

    block_size: int = 0
    blocks_total: int = 0
    bytes_total: int = 0
    blocks_used: int = 0
    blocks_cached: int = 0
    blocks_free: int = 0
    preemptions: int = 0
    shared_prompt_tokens: int = 0


@dataclass(frozen=True)
class WayRate:
    """One way's figures in one bin of the step chooser: steps with history or without, of
    batch_size to 2 batch_size - 1 sequences, by way ("head", "text", "plain"): tokens per second
    per sequence and seconds a step (moving averages); measured False while they are borrowed from
    a neighbouring bin or the other regime."""

    with_history: bool = False
    batch_size: int = 0
    way: str = ""
    tokens_per_second: float = 0.0
    step_seconds: float = 0.0
    measured: bool = False


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding now: mode, C_peak and its source, live B and the latest tree (0 = plain),
    the C_peak the server started with (the online estimate moves away from it), and alpha live and at start.
    All zero / empty when the service runs without a draft."""

    mode: str = ""
    c_peak: float = 0.0
    c_peak_source: str = ""
    batch_size: int = 0
    n_verify: int = 0
    width: int = 0
    depth: int = 0
    c_peak_start: float = 0.0
    c_peak_start_source: str = ""
    c_peak_updates: int = 0
    alpha: float = 0.0  # depth scaling, L = log2(N_verify / alpha): live, as started, and moves so far
    alpha_start: float = 0.0
    alpha_updates: int = 0
    sources: str = ""  # --spec-sources
    accepted_head: int = 0  # draft tokens accepted since start, by source
    accepted_siblings: int = 0
    accepted_history: int = 0
    history_tokens: int = 0  # completion tokens and prompts the history store holds
    history_prompts: int = 0
    steps_head: int = 0  # steps with a tree since start, by the way they ran (head, text chains alone, plain)
    steps_text: int = 0
    steps_plain: int = 0
    way_rates: tuple[WayRate, ...] = ()  # what the step chooser compares, per regime, bin and way


@dataclass(frozen=True)
class Status:
    """What GetStatus answers: served weights, load, model and speculation."""

    policy_version: int
    policy_checksum: str
    running_sequences: int
    queued_sequences: int
    max_running_sequences: int
    draft_version: int
    model: ModelInfo
    speculation: Speculation
    kv_cache: KVCache = KVCache()


@dataclass(frozen=True)
class DraftTraining:
    """State of the service's online draft learning (TrainDraftReply)."""

    draft_version: int
    every_n_batches: int  # a round after every N finished Generate requests (0 = only on TrainDraft)
    rounds: int
    steps: int
    last_loss: float
    last_top1: float
    samples_seen: int  # pairs trained on, over all rounds
    seconds: float  # time spent in draft training
    buffer_sequences: int
    buffer_bytes: int
    dropped_sequences: int


@dataclass(frozen=True)
class UpdateResult:
    """A committed weight update (UpdateWeightsReply): the version and checksum now served. A client
    fills in `address`, the replica that answered."""

    version: int
    checksum: str
    seconds: float  # header received -> weights committed, on the server
    bytes_received: int
    address: str = ""

    @property
    def bytes_sent(self) -> int:
        """The tensor bytes of the update (what the client sent is what the server received)."""
        return self.bytes_received
