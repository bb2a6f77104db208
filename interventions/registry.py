"""One small registry class for every kind of plugin (methods, families)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Named, duplicate-free mapping from a short lowercase key to a plugin.

    Args:
        kind (`str`): what the registry holds, used in error messages ("method", "family").
    """

    def __init__(self, kind: str, error: type[ValueError] = ConfigError) -> None:
        self.kind = kind
        self._error = error
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a second registration of the same name raises."""

        def add(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Return the plugin called ``name`` or raise a `ValueError` listing the available names."""
        if not isinstance(name, str) or name not in self._items:
            hint = did_you_mean(name, self._items) if isinstance(name, str) else ""
            raise self._error(f"unknown {self.kind} {name!r}{hint} available: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
