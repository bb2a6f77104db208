"""Exception hierarchy. Every user-fixable error is also a `ValueError`, so `except ValueError` keeps working."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterventionError(Exception):
    """Base class of every error raised by `interventions`."""


class ConfigError(InterventionError, ValueError):
    """A method name, parameter name, type or value is invalid."""


class UnsupportedFamilyError(InterventionError, ValueError):
    """The model's family has no adapter."""


class AlreadyWrappedError(InterventionError, ValueError):
    """The model is already wrapped; unwrap it first or pass a stack."""


class InputError(InterventionError, ValueError):
    """The model inputs do not fit the wrapped methods (for example no image tokens where a method needs them)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
