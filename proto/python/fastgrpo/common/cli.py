"""Command-line flags derived from config dataclasses, so options are declared once.

Each field becomes `--field-name`, typed from its annotation, with the help text taken from
`field(metadata={"help": ...})` and the default shown. Booleans become `--flag / --no-flag`.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def help_field(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with a help string (and a default, or default_factory via kwargs)."""
    if "default_factory" in kwargs:
        return dataclasses.field(metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _base_type(tp: Any) -> Any:
    """int | None -> int; Literal[...] stays; plain types stay."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        help_text = f.metadata.get("help", "")
        if default is not None and default is not dataclasses.MISSING:
            help_text += f" (default: {default})"
        # argparse %-formats help strings: a literal % in a help text (or a default) must be doubled
        kwargs: dict[str, Any] = {"dest": prefix.replace("-", "_") + f.name, "help": help_text.replace("%", "%%"),
                                  "default": default}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, choices=list(typing.get_args(tp)), **kwargs)
        elif tp in (int, float, str):
            parser.add_argument(flag, type=tp, **kwargs)
        else:
            parser.add_argument(flag, type=str, **kwargs)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            parser._option_string_actions[flag].required = True


def from_args(cls: type[T], args: argparse.Namespace, prefix: str = "") -> T:
    values = {}
    for f in dataclasses.fields(cls):
        if f.init:
            values[f.name] = getattr(args, prefix.replace("-", "_") + f.name)
    return cls(**values)
