"""Field metadata for generation options: what an option is, once.

Each `SamplingSettings` field is declared with `option(...)`, which puts an `OptionSpec` in the
dataclass field's metadata: the type callers pass, the help text, the bounds, which
surfaces (command line, HTTP) offer it and under which names. The options table (`options.GENERATION_OPTIONS`), the
HTTP schemas, the CLI flags and `SamplingSettings.validate` are all read from it, so a new
option is one new field, and a bound cannot disagree between the surfaces.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any

INT64 = 2**63 - 1
MAX_TOKENS = 1 << 20
MAX_STOPS = 4
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class OptionSpec:
    """One option as callers see it. `type` is what they pass (a list where the settings keep a
    tuple); `nullable` lets None through validation (None meaning "off")."""

    type: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    nullable: bool = False
    cli: bool = True  # offered by `jaonnx generate`
    http: bool = True  # accepted by `/v1/generate`
    flags: tuple[str, ...] = ()  # `jaonnx generate`'s flags (default: --the-name)
    openai: str | None = None  # OpenAI's name for it, where OpenAI has one under another name

    def rule(self) -> str:
        """The bound in words, for error messages: 'an integer >= 1', 'a number in (0, 1]'."""
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(self.type, "a value")
        if self.type is bool:
            return kind
        low = f"({_num(self.gt)}" if self.gt is not None else f"[{_num(self.ge)}" if self.ge is not None else None
        if low is not None and self.le is not None:
            text = f"{kind} in {low}, {_num(self.le)}]"
        elif low is not None:
            text = f"{kind} {'>' if self.gt is not None else '>='} {low[1:]}"
        elif self.le is not None:
            text = f"{kind} <= {_num(self.le)}"
        else:
            text = kind
        return text + (" or None" if self.nullable else "")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def option(default: Any = MISSING, *, help: str, type: Any, **spec: Any) -> Any:
    """A dataclass field carrying its `OptionSpec` (see the module docstring)."""
    meta = {"option": OptionSpec(type=type, help=help, **spec)}
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)
