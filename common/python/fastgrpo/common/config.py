"""Command-line flags derived from config dataclasses, so that every option is declared once.

Each field becomes `--<prefix><field-name>`, typed from its annotation, with the help text from
`help_field` and the default shown; booleans become `--flag / --no-flag`, Literal types a choice.
A field made with `nested(Config, prefix)` contributes the fields of that config under its prefix,
so a service's config is a tree of the configs of its parts (ServeConfig holds EngineConfig, ...),
each default declared in the part that uses it. `help_field(..., flag="name")` names a flag
outright where the derived name would read badly (`--c-peak-refine` rather than
`--c-peak-enabled`). A field without a default is a required flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def help_field(default: Any, help: str, *, flag: str | None = None, **kwargs) -> Any:
    """A dataclass field with a help string and a default (or default_factory via kwargs); `flag`
    overrides the derived flag name (without the leading dashes and without any prefix)."""
    metadata = {"help": help, "flag": flag}
    if "default_factory" in kwargs:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def nested(cls: type, prefix: str = "") -> Any:
    """A dataclass field holding a config of its own; its flags get `prefix` (e.g. "spec-")."""
    return dataclasses.field(default_factory=cls, metadata={"nested": cls, "prefix": prefix})


def _base_type(tp: Any) -> Any:
    """int | None -> int; Literal[...] stays; plain types stay."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _dest(path: str, name: str) -> str:
    return f"{path}__{name}" if path else name


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "", _path: str = "") -> None:
    """Adds a flag for every field of `cls` (and of the configs nested in it) to `parser`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if "nested" in f.metadata:
            add_dataclass_args(parser, f.metadata["nested"], prefix + f.metadata["prefix"], _dest(_path, f.name))
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + (f.metadata.get("flag") or prefix + f.name.replace("_", "-"))
        default = _default(f)
        help_text = f.metadata.get("help", "")
        if default is not dataclasses.MISSING and default is not None:
            help_text += f" (default: {default})"
        # argparse %-formats help strings: a literal % in a help text (or a default) must be doubled
        kwargs: dict[str, Any] = {"dest": _dest(_path, f.name), "help": help_text.replace("%", "%%")}
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, choices=list(typing.get_args(tp)), **kwargs)
        else:  # shown as the field's own name, not the dest's path
            parser.add_argument(flag, type=tp if tp in (int, float, str) else str, metavar=f.name.upper(), **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, _path: str = "") -> T:
    """The config `cls` (nested configs included) from parsed flags."""
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if "nested" in f.metadata:
            values[f.name] = from_args(f.metadata["nested"], args, _dest(_path, f.name))
        else:
            values[f.name] = getattr(args, _dest(_path, f.name))
    return cls(**values)

