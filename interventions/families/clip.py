"""The CLIP vision tower the LLaVA families share: where its attention modules are (a helper of the family files)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.contract import VisionTower
from ..errors import ConfigError


def clip_find(model: Any) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """`(tower, attention modules)` of a LLaVA-style model's CLIP tower (CLS first in every sequence).

    Raises:
        ConfigError: the tower is not CLIP (no CLS token).
    """
    vision = model.config.vision_config
    if vision.model_type != "clip_vision_model":
        raise ConfigError(f"this model's vision tower is {vision.model_type!r}, not CLIP (no CLS token)")
    tower = model.model.vision_tower
    return tower, [layer.self_attn for layer in getattr(tower, "vision_model", tower).encoder.layers]


def clip_tower(features: Callable[[Any, int, int, Any], list[torch.Tensor]]) -> VisionTower:
    """A CLIP tower read at its CLS row, LLaVA's features from its penultimate layer, mapped to LLM image tokens by
    `features`."""
    return VisionTower(clip_find, cls_token=True, summary_layer=-2, features=features)


def patch_grid_side(config: Any, method: str) -> int:
    """Patches per side of a CLIP crop, refusing a feature strategy that keeps the CLS feature as a token.

    Raises:
        ConfigError: `vision_feature_select_strategy` is not `"default"`.
    """
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise ConfigError(f"{method}: vision_feature_select_strategy={config.vision_feature_select_strategy!r} "
                          "keeps the CLS feature, which has no cell in the patch grid; allowed: 'default'")
    return config.vision_config.image_size // config.vision_config.patch_size
