"""Command-line flags generated from frozen config dataclasses.

Each dataclass field becomes `--field-name`; its `metadata["help"]` is the help text, so the config
and the CLI can never drift apart. Booleans become `--flag` / `--no-flag`; tuples take several values.
Usage:

    @dataclass(frozen=True)
    class SamplingConfig:
        temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy"})

    add_config_flags(parser, SamplingConfig)
    cfg = config_from_args(SamplingConfig, parser.parse_args())
"""
from __future__ import annotations

import argparse
import dataclasses
import typing


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (), group: str | None = None):
    """Add one flag per field of `cls` (a dataclass type) to `parser`."""
    target = parser.add_argument_group(group or cls.__name__) if group is not False else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if default is not None else help_text
        kind, inner = _kind(hint)
        if kind is bool:
            target.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif kind is tuple:
            target.add_argument(_flag(f.name), dest=f.name, nargs="+", type=inner, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            # A non-Optional field whose default is None (or missing) must be given on the command line.
            required = default is None and type(None) not in typing.get_args(hint)
            target.add_argument(_flag(f.name), dest=f.name, type=kind, default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"), help=help_text, required=required)


def _kind(hint):
    """Map a type hint to (argparse type, element type for tuples)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _kind(args[0])
    if origin is tuple:
        return tuple, args[0] if args else str
    if hint in (bool, int, float, str):
        return hint, None
    return str, None


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """Build `cls` from the parsed flags that were given; fields not given keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {k: v for k, v in vars(args).items() if k in names}
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    values.update(overrides)
    return cls(**values)
