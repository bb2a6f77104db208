"""What every method shares: the registry, the contract it implements (re-exported from `core.contract`), layer
validation and preset loading."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from ..core.call import AttentionCall, RowRequest
from ..core.contract import Capability, Method, ModelInfo
from ..errors import ConfigError
from ..registry import Registry

__all__ = ["METHODS", "AttentionCall", "Capability", "Method", "ModelInfo", "RowRequest", "layer_range", "preset",
           "register"]

METHODS: Registry[type[Method]] = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under its config's `NAME` (a method states its name once)."""
    return METHODS.register(cls.config_class.NAME)(cls)


@functools.cache
def preset(name: str) -> Any:
    """The parsed preset file `interventions/presets/<name>.json` (data with its sources; read once)."""
    return json.loads(resources.files("interventions").joinpath("presets", f"{name}.json").read_text())


def layer_range(model: ModelInfo, method: str, layers: tuple[int, ...] | None, default: range) -> frozenset[int]:
    """Validate explicit layers against the model, or use `default`."""
    if layers is None:
        return frozenset(default)
    bad = [layer for layer in layers if layer >= model.num_layers]
    if bad:
        raise ConfigError(
            f"{method}: layers={list(layers)} out of range; this model has layers 0..{model.num_layers - 1}"
        )
    return frozenset(layers)
