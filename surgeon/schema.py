"""Parameter schemas of the actions a policy can name: `ParamSpec` and `ActionSchema`.

At the bottom of the package so that rewrites can declare their parameters and the policy loader
can validate them without either importing the other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from surgeon.errors import describe_value, show_value

__all__ = ["TYPE_NAMES", "ActionSchema", "ParamSpec", "ParamType", "coerce_param"]

ParamType: TypeAlias = "type[int] | type[float] | type[str] | type[bool]"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of an action: its type, default and allowed values.

    `choices` restricts the value to a fixed set; `min`/`max` (inclusive) bound numbers.
    A `default` of None makes the parameter optional with no value unless a policy sets one.
    """

    name: str
    type: ParamType
    default: Any
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.type not in (int, float, str, bool):
            raise ValueError(f"ParamSpec {self.name!r}: type must be int, float, str or bool")
        if self.default is not None:
            _, problem = coerce_param(self, self.default)
            if problem is not None:
                raise ValueError(f"ParamSpec {self.name!r}: default {problem}")


@dataclass(frozen=True)
class ActionSchema:
    """An action a policy may name, with the parameters it accepts."""

    name: str
    params: Mapping[str, ParamSpec] = field(default_factory=dict, hash=False)
    help: str = ""

    def __post_init__(self) -> None:
        for key, spec in self.params.items():
            if key != spec.name:
                raise ValueError(f"ActionSchema {self.name!r}: key {key!r} holds {spec.name!r}")

    @classmethod
    def of(cls, name: str, *params: ParamSpec, help: str = "") -> ActionSchema:
        """A schema from its parameters, keyed by their names."""
        return cls(name, {spec.name: spec for spec in params}, help)

    def defaults(self) -> dict[str, Any]:
        """Every parameter's default value, by name."""
        return {name: spec.default for name, spec in self.params.items()}


TYPE_NAMES: dict[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
}


def coerce_param(spec: ParamSpec, value: Any) -> tuple[Any, str | None]:
    """The value as the parameter's type, or a problem description (one line)."""
    if value is None and spec.default is None:
        return None, None
    wanted = spec.type
    ok = (
        isinstance(value, bool)
        if wanted is bool
        else (
            isinstance(value, int | float) and not isinstance(value, bool)
            if wanted is float
            else isinstance(value, wanted) and not isinstance(value, bool)
        )
    )
    if not ok:
        return value, f"expected {TYPE_NAMES[wanted]}, got {describe_value(value)}"
    if wanted is float:
        value = float(value)
        if not math.isfinite(value):
            return value, f"expected a finite number, got {value}"
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(show_value(c) for c in spec.choices)
        return value, f"{show_value(value)} is not allowed (choose from {allowed})"
    too_low = spec.min is not None and value < spec.min
    too_high = spec.max is not None and value > spec.max
    if too_low or too_high:
        if spec.min is not None and spec.max is not None:
            allowed = f"{show_value(spec.min)}..{show_value(spec.max)}"
        elif spec.min is not None:
            allowed = f">= {show_value(spec.min)}"
        else:
            allowed = f"<= {show_value(spec.max)}"
        return value, f"{show_value(value)} is out of range (allowed {allowed})"
    return value, None
