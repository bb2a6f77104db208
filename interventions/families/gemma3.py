"""Gemma3 (`Gemma3ForConditionalGeneration`): 256 `<image_soft_token>` per image between BOI/EOI; image tokens
attend bidirectionally within their image (the mask arrives materialised); sliding-window layers.

Layout: one `√m × √m` grid per image (`mm_tokens_per_image` pooled tokens, 16 × 16 for the released models) over the
resized square; a SigLIP tower whose patch scores merge onto tokens through the projector's average pooling.
Pan-and-scan crops are more than one image. The processor takes one list of images per prompt.
The processor's `image_token_id` is the BOI id: the model config's `image_token_id` is the soft token.
Source: transformers 5.x `models/gemma3/modeling_gemma3.py`; shared/specs/hf_integration.md §2.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core.contract import VisionTower
from ..core.geometry import Grid
from ..errors import ConfigError
from . import siglip
from .base import FamilyAdapter, register


def _units(model: Any, scores: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
    projector = model.model.multi_modal_projector
    side = projector.patches_per_image
    pooled = projector.avg_pool(scores.view(-1, 1, side, side))  # a mean of kernel² patches: the same ranking
    return list(pooled.flatten(1))


@dataclass(frozen=True)
class Gemma3Adapter(FamilyAdapter):
    """Gemma3's layout."""

    nests_images: bool = True

    def fixed_grid(self, config: Any, method: str) -> Grid | None:
        n = math.isqrt(config.mm_tokens_per_image)
        if n * n != config.mm_tokens_per_image:
            raise ConfigError(f"{method}: gemma3 mm_tokens_per_image={config.mm_tokens_per_image} is not a square "
                              "grid")
        return Grid(n, n)

    def vision_tower(self) -> VisionTower | None:
        return VisionTower(siglip.encoder_find("vision_tower"), cls_token=False, summary_layer=-1, qk=siglip.qk,
                           units=_units)


GEMMA3 = register(Gemma3Adapter(
    name="gemma3",
    model_types=("gemma3",),
    has_images=True,
    boundary_token_attrs=("boi_token_id|boi_token_index", "eoi_token_id|eoi_token_index"),
    visual_token_attrs=("image_token_id|image_token_index",),
    source="transformers models/gemma3/modeling_gemma3.py",
))
