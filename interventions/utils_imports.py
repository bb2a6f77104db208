"""Optional dependencies: cached availability checks and a `require` that names the pip extra."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def is_available(package: str) -> bool:
    """True when `package` can be imported (checked without importing it)."""
    return importlib.util.find_spec(package) is not None


def require(package: str, feature: str, extra: str) -> None:
    """Raise an `ImportError` naming the pip extra when `package` is missing."""
    if not is_available(package):
        raise ImportError(f"{feature} needs {package}: pip install 'interventions[{extra}]'")
