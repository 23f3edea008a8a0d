"""Build dataclasses from JSON with every field's type checked.

`jaonnx.json` is user-editable and may be corrupt; a `model_file: null` or a string
`format_version` must become a one-line error, not a TypeError deep inside loading.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class FieldError(ValueError):
    """A JSON value that does not fit its dataclass field; the message names the field."""


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(hint))
    if hint is type(None):
        return "null"
    if origin is dict:
        return "an object"
    if origin is tuple or origin is list:
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "an object"
    return getattr(hint, "__name__", str(hint))


def check(value: Any, hint: Any, where: str) -> Any:
    """`value` converted to `hint` (lists to tuples, nested dataclasses built), or FieldError."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        if len(options) == 1:  # X | None with a value: X's own, more precise, error
            return check(value, options[0], where)
        for option in options:
            try:
                return check(value, option, where)
            except FieldError:
                continue
        raise FieldError(f"{where} must be {_describe(hint)}, not {value!r:.40}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if isinstance(value, str) and value in get_args(hint):
            return value
    elif origin is tuple:
        item = get_args(hint)[0]
        if isinstance(value, list):
            return tuple(check(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    elif origin is dict:
        key_type, value_type = get_args(hint)
        if isinstance(value, dict):
            return {check(k, key_type, where): check(v, value_type, f"{where}.{k}") for k, v in value.items()}
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module was not taught
        raise TypeError(f"typecheck cannot check {hint!r}")
    raise FieldError(f"{where} must be {_describe(hint)}, not {value!r:.40}")


def build(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass `cls` from a JSON object; unknown keys are ignored (newer writers)."""
    if not isinstance(data, dict):
        raise FieldError(f"{where} must be an object, not {type(data).__name__}")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = check(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FieldError(f"{where} has no {f.name!r}")
    return cls(**kwargs)
