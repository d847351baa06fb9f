"""Command-line flags generated from frozen config dataclasses, so a config and its CLI never drift.

Each field becomes `--field-name` and its `metadata["help"]` the help text. Booleans become `--flag` /
`--no-flag`; tuples take several values. A field whose type is itself a config dataclass (LoRAConfig,
SamplingConfig) contributes that dataclass's fields, prefixed with `metadata["prefix"]`; when the
field is optional (`lora: LoRAConfig | None`), `--lora` / `--no-lora` switches it on or off. Flags
whose field has no default (or a None default on a non-Optional type) are required, and are listed
first. Only train.py and tests import this: the configs themselves are plain dataclasses, so `data/`
needs nothing from `engine/`.

    @dataclass(frozen=True)
    class SamplingConfig:
        temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy"})

    add_config_flags(parser, SamplingConfig)
    cfg = config_from_args(SamplingConfig, parser.parse_args())
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import NamedTuple


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def config_parser(cls, **kwargs) -> argparse.ArgumentParser:
    """A parser whose help lists the required flags first, then the options (one heading each)."""
    parser = argparse.ArgumentParser(add_help=False, **kwargs)
    add_config_flags(parser, cls)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per field of `cls` (a dataclass type) to `parser`, required ones first."""
    flags = list(_field_flags(cls, prefix="", defaults=None))
    required = parser.add_argument_group("required")
    options = parser.add_argument_group("options")
    options.add_argument("-h", "--help", action="help", help="show this help and exit")
    for flag in sorted(flags, key=lambda flag: not flag.required):  # a stable sort: field order is kept
        (required if flag.required else options).add_argument(flag.name, **flag.kwargs)


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


class Flag(NamedTuple):
    required: bool
    name: str  # --field-name
    kwargs: dict  # for add_argument


def _field_flags(cls, prefix: str, defaults):
    """A Flag for each field of `cls`, nested configs flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        dest = prefix + f.name
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        hint, optional = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(hint):
            if optional:  # --lora / --no-lora: the nested config on (its default, or the one given) or off
                yield Flag(False, flag_name(dest), dict(dest=dest, action=argparse.BooleanOptionalAction,
                                                        default=argparse.SUPPRESS,
                                                        help=_with_default(help_text, default is not None)))
            yield from _field_flags(hint, f.metadata.get("prefix", f"{f.name}_"),
                                    default if default is not None else hint())
            continue
        must_give = default is None and not optional
        kw = dict(dest=dest, default=argparse.SUPPRESS, help=_with_default(help_text, default))
        if hint is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(hint) is tuple:
            kw.update(nargs="+", type=(typing.get_args(hint) or (str,))[0], metavar=f.name.upper(), required=must_give)
        else:
            choices = f.metadata.get("choices")
            kw.update(type=hint if hint in (int, float, str) else str, choices=choices, required=must_give,
                      metavar=None if choices else f.name.upper())
        yield Flag(must_give, flag_name(dest), kw)


def _unwrap_optional(hint):
    """(the type inside `X | None`, True) or (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _with_default(help_text: str, default) -> str:
    """The help text and the default as a user would type it (none shown for a required flag)."""
    if default is None or default == ():
        return help_text
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, tuple):
        shown = " ".join(map(str, default))
    else:
        shown = str(default)
    return f"{help_text} (default: {shown})"


def config_from_args(cls, args: argparse.Namespace, **overrides):
    """Build `cls` from the parsed flags that were given; fields not given keep their defaults."""
    return _build(cls, vars(args), prefix="", base=None, overrides=overrides)


def _build(cls, given: dict, prefix: str, base, overrides: dict):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        dest = prefix + f.name
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        hint, optional = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(hint):
            inner_prefix = f.metadata.get("prefix", f"{f.name}_")
            inner_given = [k for k in given if k.startswith(inner_prefix) and
                           k[len(inner_prefix):] in {g.name for g in dataclasses.fields(hint)}]
            default = getattr(base, f.name) if base is not None else _field_default(f)
            switched_on = given.get(dest, default is not None) if optional else True
            if not switched_on:
                if inner_given:
                    raise ValueError(f"{flag_name(inner_given[0])} has no effect with {flag_name('no_' + dest)}")
                values[f.name] = None
            elif inner_given or dest in given:
                values[f.name] = _build(hint, given, inner_prefix, default if default is not None else hint(), {})
            continue
        if dest in given:
            value = given[dest]
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(base, **values) if base is not None else cls(**values)
