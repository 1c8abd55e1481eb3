"""Values for every field of a config class, read from the fields' declarations, so that a test covering every
option needs no table that a new option would have to join."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from mochi_hub.config import _number_kind


def other_value(cls: type, field: dataclasses.Field, presets: dict[str, dict[str, Any]]) -> Any:
    """A value of the field's type, inside its declared range, that is not its default."""
    hint = typing.get_type_hints(cls)[field.name]
    default = field.default
    if field.name == "preset":
        return next(iter(presets))
    if typing.get_origin(hint) is Literal:
        return next(c for c in typing.get_args(hint) if c != default)
    if bool in (hint, *typing.get_args(hint)):  # bool or bool | None
        return not default
    kind, within = _number_kind(hint), field.metadata["within"]
    if kind is not None:
        start = default if default is not None else max(within.bounds[0], 0)
        candidates = (start + 1, start + 2) if kind is int else (start / 2, start + 0.5)
        return next(v for v in candidates if v in within and v != default)
    if isinstance(default, tuple):
        return tuple(v + 1 for v in default)
    return f"x-{field.name}"


def other_values(cls: type, presets: dict[str, dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """A non-default value for every field; `overrides` for fields whose values must agree with others."""
    return {
        f.name: overrides[f.name] if f.name in overrides else other_value(cls, f, presets)
        for f in dataclasses.fields(cls)
    }


def command_line(values: dict[str, Any]) -> list[str]:
    """The options that give these values: --name value, --flag / --no-flag, tuples as 1,2,3."""
    args = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            args += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return args
