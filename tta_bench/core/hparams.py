"""Declared, typed, validated options for methods and tasks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from tta_bench.core.errors import TTAError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
SEEDS = "[0, 4294967295]"  # the seeds numpy and torch accept


@dataclass(frozen=True)
class HParam:
    """One option: its default, type, allowed values and an optional extra check. A number is
    always finite, and a method's numbers declare their range as an `interval`, e.g. "(0, 1)",
    "[1, 256]" or "(0, inf)" (any finite positive value)."""

    default: Any
    type: type = float
    help: str = ""
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = None
    check_msg: str = ""
    nullable: bool = False  # "none" is a valid value
    interval: str | None = None

    def bounds(self) -> tuple[float, float, bool, bool]:
        """(low, high, low included, high included) of `interval`."""
        text = (self.interval or "(-inf, inf)").strip()
        low, high = (float(x) for x in text[1:-1].split(","))
        return low, high, text[0] == "[", text[-1] == "]"

    def parse(self, name: str, value: Any) -> Any:
        """Convert (from a string, if need be) and validate; raise TTAError otherwise."""
        if self.nullable and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        try:
            value = _convert(self.type, value)
        except (TypeError, ValueError):
            raise TTAError(f"{name}={value!r} is not a valid {self.type.__name__}") from None
        if self.type in (int, float) and not self.within(value):
            kind = "an integer" if self.type is int else "a finite number"
            raise TTAError(f"{name}={value!r} is out of range: it must be {kind} in {self.interval}"
                           if self.interval else f"{name}={value!r} is not {kind}")
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise TTAError(f"{name}={value!r} is not allowed; choose one of: {allowed}")
        if self.check is not None and not self.check(value):
            raise TTAError(f"{name}={value!r} is invalid: {self.check_msg}")
        return value

    def within(self, value: float) -> bool:
        low, high, closed_low, closed_high = self.bounds()
        return ((isinstance(value, int) or math.isfinite(value)) and (low < value or closed_low and low == value)
                and (value < high or closed_high and value == high))


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if isinstance(value, bool):  # a bool is not a number, a string or a path
        raise ValueError(value)
    return kind(value)


def resolve(owner: str, spec: Mapping[str, HParam], given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overridden by `given`; unknown names and bad values raise a clear TTAError."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        allowed = ", ".join(f"{k} (default {p.default!r})" for k, p in spec.items()) or "none"
        raise TTAError(f"{owner} has no option {', '.join(unknown)}; its options are: {allowed}")
    values = {name: p.default for name, p in spec.items()}
    for name, value in given.items():
        values[name] = spec[name].parse(f"{owner}: {name}", value)
    return values


def parse_assignments(items: list[str]) -> dict[str, str]:
    """['a=1', 'b=x,c=2'] -> {'a': '1', 'b': 'x', 'c': '2'}."""
    out: dict[str, str] = {}
    for item in items:
        for part in filter(None, item.split(",")):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise TTAError(f"expected KEY=VALUE, got {part!r} (e.g. --hparam weighted=false)")
            out[key.strip().replace("-", "_")] = value.strip()
    return out
