"""Records <-> proto messages, for both sides of the wire: the one module that maps them.

Fields map by name (a record's fields are named as its message's), nested records and repeated
fields included. The few places where proto3 cannot say what a record says are listed here and
nowhere else: enums travel as numbers, an unset seed as has_seed = false, and an unset top_p / top_k
(proto3's 0) means "no truncation".
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, TypeVar

from fastgrpo.v1 import rollout_pb2 as pb
from fastgrpo.wire import records as rec

R = TypeVar("R")

MESSAGES: dict[type, type] = {
    rec.Sampling: pb.SamplingParams,
    rec.SpecStats: pb.SpecStats,
    rec.Completion: pb.Completion,
    rec.ModelInfo: pb.ModelInfo,
    rec.Speculation: pb.SpeculationStatus,
    rec.WayRate: pb.WayRate,
    rec.KVCache: pb.KVCacheStatus,
    rec.Status: pb.StatusReply,
    rec.DraftTraining: pb.TrainDraftReply,
    rec.UpdateResult: pb.UpdateWeightsReply,
}

FINISH_REASONS = {"unspecified": pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                  "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
UPDATE_KINDS = {"full": pb.UPDATE_KIND_FULL, "dense_delta": pb.UPDATE_KIND_DENSE_DELTA,
                "lora_delta": pb.UPDATE_KIND_LORA_DELTA}
TARGETS = {"policy": pb.MODEL_TARGET_POLICY, "draft": pb.MODEL_TARGET_DRAFT}


def name_of(table: dict[str, int], number: int) -> str | None:
    """The name an enum number has in one of the tables above (None: not a known value)."""
    return next((name for name, n in table.items() if n == number), None)


def to_pb(record: Any):
    """A record -> its proto message (fields the message lacks, like a client-side address, stay behind)."""
    message = MESSAGES[type(record)]
    known = message.DESCRIPTOR.fields_by_name
    values = {}
    for f in dataclasses.fields(record):
        if f.name not in known:
            continue
        value = getattr(record, f.name)
        if dataclasses.is_dataclass(value):
            value = to_pb(value)
        elif isinstance(value, tuple):  # a repeated field, of scalars or of messages
            value = [to_pb(v) if dataclasses.is_dataclass(v) else v for v in value]
        values[f.name] = value
    if isinstance(record, rec.Sampling):
        values["seed"], values["has_seed"] = record.seed or 0, record.seed is not None
    if isinstance(record, rec.Completion):
        values["finish_reason"] = FINISH_REASONS[record.finish_reason]
    return message(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A record's field types, resolved once (from_pb runs for every streamed completion)."""
    return typing.get_type_hints(cls)


def from_pb(cls: type[R], message: Any) -> R:
    """A proto message -> the record `cls`, field by field."""
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in message.DESCRIPTOR.fields_by_name:
            continue  # a client-side field: its default
        value = getattr(message, f.name)
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            value = from_pb(kind, value)
        elif typing.get_origin(kind) is tuple:  # a repeated field, of scalars or of messages
            item = typing.get_args(kind)[0]
            value = tuple(from_pb(item, v) for v in value) if dataclasses.is_dataclass(item) else tuple(value)
        elif typing.get_origin(kind) is list:
            value = list(value)
        values[f.name] = value
    if cls is rec.Sampling:
        values["seed"] = message.seed if message.has_seed else None
        values["top_p"] = message.top_p or 1.0
        values["top_k"] = message.top_k or -1
    if cls is rec.Completion:
        values["finish_reason"] = name_of(FINISH_REASONS, message.finish_reason) or "unspecified"
    return cls(**values)
