"""Small validators for hand-written documents: each error names the file and field."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .errors import InputError, did_you_mean
from .formats import Format, FormatError, element_format, parse_format


class Fields:
    """A mapping being validated: knows its source file and its dotted path."""

    def __init__(self, source: str, path: str, value: Any, allowed: Iterable[str] | None = None) -> None:
        self.source = source
        self.path = path
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(f"must be a mapping, got {_kind(value)}")
        self.value: dict[str, Any] = value
        if allowed is not None:
            allowed = list(allowed)
            for key in value:
                if key not in allowed:
                    self.fail(f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}",
                              field=self.sub(key))

    def sub(self, key: Any) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def fail(self, message: str, field: str | None = None) -> None:
        raise InputError(self.source, self.path if field is None else field, message)

    def has(self, key: str) -> bool:
        return key in self.value

    def section(self, key: str, allowed: Iterable[str] | None = None, required: bool = False) -> Fields:
        if required and key not in self.value:
            self.fail("missing", field=self.sub(key))
        return Fields(self.source, self.sub(key), self.value.get(key), allowed)

    def number(self, key: str, default: float | None = None, *, low: float | None = None,
               high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
        value = self._required(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"must be a number, got {_kind(value)}", field=self.sub(key))
        value = float(value)
        if not math.isfinite(value):
            self.fail(f"must be finite, got {value}", field=self.sub(key))
        self._in_range(key, value, low, high, low_open, high_open)
        return value

    def integer(self, key: str, default: int | None = None, *, low: int | None = None,
                high: int | None = None) -> int:
        value = self._required(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"must be an integer, got {_kind(value)}", field=self.sub(key))
        self._in_range(key, value, low, high, False, False)
        return value

    def boolean(self, key: str, default: bool | None = None) -> bool:
        value = self._required(key, default)
        if not isinstance(value, bool):
            self.fail(f"must be true or false, got {_kind(value)}", field=self.sub(key))
        return value

    def string(self, key: str, default: str | None = None, choices: Iterable[str] | None = None) -> str:
        value = self._required(key, default)
        if not isinstance(value, str) or not value:
            self.fail(f"must be a non-empty string, got {_kind(value)}", field=self.sub(key))
        if choices is not None:
            choices = list(choices)
            if value not in choices:
                self.fail(f"must be one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}",
                          field=self.sub(key))
        return value

    def format(self, key: str, default: str | None = None, blocks: bool = False) -> Format:
        """A format; a block (MX) format only with ``blocks`` (a GEMM operand's role)."""
        value = self._required(key, default)
        try:
            return parse_format(value) if blocks else element_format(value)
        except FormatError as exc:
            self.fail(str(exc), field=self.sub(key))
            raise  # unreachable

    def _required(self, key: str, default: Any) -> Any:
        if key in self.value and self.value[key] is not None:
            return self.value[key]
        if default is None:
            self.fail("missing", field=self.sub(key))
        return default

    def _in_range(self, key: str, value: float, low: float | None, high: float | None,
                  low_open: bool, high_open: bool) -> None:
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            self.fail(f"must be {' and '.join(p for p in (lo, hi) if p)}, got {value:g}", field=self.sub(key))


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return f"{type(value).__name__} {value!r}"
