"""Declarative parameter fields: type, default, range, help and source live beside each field.

A method config is a frozen dataclass whose fields are made with `param(...)`. `MethodConfig.__post_init__`
runs each field's check, so the same metadata drives validation, error messages and documentation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ..errors import ConfigError, did_you_mean

Check = Callable[[str, str, Any], Any]  # (method, parameter, value) -> normalised value


def param(default: Any, help: str, source: str, check: Check) -> Any:
    """A config field with its documentation and its check."""
    return dataclasses.field(default=default, metadata={"help": help, "source": source, "check": check})


def _fail(method: str, name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{method}: {name}={value!r} is invalid; expected {expected}.")


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False) -> Check:
    """A real (or integer) number within ``[lo, hi]``; ``*_open`` makes a bound strict."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    kind = "an integer" if integer else "a number"
    expected = f"{kind} in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def check(method: str, name: str, value: Any) -> Any:
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
            raise _fail(method, name, value, expected)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise _fail(method, name, value, expected)
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise _fail(method, name, value, expected)
        return int(value) if integer else float(value)

    return check


def choice(*options: str) -> Check:
    """One of the given strings."""

    def check(method: str, name: str, value: Any) -> Any:
        if value not in options:
            raise _fail(method, name, value, "one of " + ", ".join(repr(o) for o in options))
        return value

    return check


def optional(inner: Check) -> Check:
    """``None`` or a value accepted by ``inner``."""

    def check(method: str, name: str, value: Any) -> Any:
        return None if value is None else inner(method, name, value)

    return check


def int_list(lo: int = 0) -> Check:
    """A non-empty list of distinct integers >= ``lo``, returned sorted as a tuple."""

    def check(method: str, name: str, value: Any) -> Any:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise _fail(method, name, value, f"a list of integers >= {lo}")
        items = list(value)
        if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < lo for v in items):
            raise _fail(method, name, value, f"a non-empty list of integers >= {lo}")
        if len(set(items)) != len(items):
            raise _fail(method, name, value, "a list without duplicates")
        return tuple(sorted(items))

    return check


def head_list(method: str, name: str, value: Any) -> Any:
    """(layer, head) pairs: a list of pairs, a ``{layer: [heads]}`` mapping, or a path to a JSON file holding
    either (optionally under a ``"heads"`` key). Returned as a sorted tuple of pairs, so configs stay data."""
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value) as f:
                value = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{method}: {name}: cannot read head list {str(value)!r}: {e}") from e
        if isinstance(value, Mapping) and "heads" in value:
            value = value["heads"]
    if isinstance(value, Mapping):
        try:
            value = [(int(layer), head) for layer, heads in value.items() for head in heads]
        except (TypeError, ValueError) as e:
            raise _fail(method, name, value, "a mapping {layer: [head, ...]}") from e
    expected = "a list of [layer, head] pairs of integers >= 0, a {layer: [heads]} mapping, or a JSON file path"
    if isinstance(value, (bytes, int, float)) or not hasattr(value, "__iter__"):
        raise _fail(method, name, value, expected)
    pairs = []
    for item in value:
        if (not hasattr(item, "__len__") or len(item) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in item)):
            raise _fail(method, name, item, expected)
        pairs.append((int(item[0]), int(item[1])))
    if len(set(pairs)) != len(pairs):
        raise _fail(method, name, value, "(layer, head) pairs without duplicates")
    return tuple(sorted(pairs))


def boolean(method: str, name: str, value: Any) -> Any:
    """A bool."""
    if not isinstance(value, bool):
        raise _fail(method, name, value, "True or False")
    return value


def text(method: str, name: str, value: Any) -> Any:
    """A string."""
    if not isinstance(value, str):
        raise _fail(method, name, value, "a string")
    return value


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config: validated on construction, immutable, JSON-serialisable.

    Subclasses set `NAME` (registry name), `STRENGTH` (the strength parameter) and `NEUTRAL` (its value that
    leaves the model bit-identical).
    """

    NAME: ClassVar[str]
    STRENGTH: ClassVar[str]
    NEUTRAL: ClassVar[Any]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = f.metadata["check"](self.NAME, f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> MethodConfig:
        """Build from user parameters; unknown names raise a `ConfigError` that lists the allowed ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in params:
            if key not in names:
                raise ConfigError(
                    f"{cls.NAME}: unknown parameter {key!r}{did_you_mean(key, names)} allowed: {', '.join(names)}"
                )
        return cls(**params)

    def to_params(self) -> dict[str, Any]:
        """All parameters as plain JSON types (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def is_neutral(self) -> bool:
        """True when the strength parameter has its neutral value."""
        return getattr(self, self.STRENGTH) == self.NEUTRAL

    @classmethod
    def describe(cls) -> str:
        """One line per parameter: name, default, help and source (used by docs and the CLI)."""
        lines = [f"{cls.NAME} (strength {cls.STRENGTH}, neutral {cls.NEUTRAL!r})"]
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name} = {f.default!r}: {f.metadata['help']} [{f.metadata['source']}]")
        return "\n".join(lines)


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
