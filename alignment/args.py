"""Command-line parsing of config dataclasses: every field becomes ``--field-name`` with its default."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _parser_type(tp):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        return _parser_type(inner[0]) if len(inner) == 1 else (str, None)
    if origin in (tuple, list):
        return args[0] if args and args[0] is not Ellipsis else str, "+"
    if tp is bool:
        return "bool", None
    return tp, None


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Build ``cls`` (a dataclass) from command-line flags; ``dict`` fields are skipped."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, nargs = _parser_type(hints[f.name])
        if tp is dict or typing.get_origin(tp) is dict:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if tp == "bool":
            parser.add_argument(
                flag,
                type=lambda v: v.lower() in ("1", "true", "yes"),
                default=default,
                metavar="BOOL",
                help=f"(default: {default})",
            )
        else:
            parser.add_argument(flag, type=tp, nargs=nargs, default=default, help=f"(default: {default})")
    ns = parser.parse_args(argv)
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(ns).items()}
    return cls(**values)
