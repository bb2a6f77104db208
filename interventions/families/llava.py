"""LLaVA-1.5 (`LlavaForConditionalGeneration`): 576 `<image>` tokens per image, expanded by the processor.

Layout: one `N × N` grid per image (`N = image_size // patch_size`, 24 for LLaVA-1.5) over the resized,
centre-cropped square; a CLIP tower with a CLS token, features from its penultimate layer, one feature per patch.
Source: transformers 5.x `models/llava/modeling_llava.py`; shared/specs/hf_integration.md §2.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.contract import VisionTower
from ..core.geometry import Grid, Placed, View
from .base import FamilyAdapter, register
from .clip import clip_tower, patch_grid_side


def _features(model: Any, crops: int, patches: int, image_sizes: Any) -> list[torch.Tensor]:
    """One LLM image feature per patch, in patch order (a kept CLS feature, strategy "full", has none: -1)."""
    index = torch.arange(crops * patches, dtype=torch.long).view(crops, patches)
    if model.config.vision_feature_select_strategy == "full":
        index = torch.cat([torch.full((crops, 1), -1, dtype=torch.long), index], 1)
    return list(index)


@dataclass(frozen=True)
class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5's layout."""

    def fixed_grid(self, config: Any, method: str) -> Grid | None:
        n = patch_grid_side(config, method)
        return Grid(n, n)

    def on_original(self, view: View, image_processor: Any, size: tuple[int, int]) -> tuple[Placed, ...]:
        """LLaVA's centre crop (a resize of the shortest edge, then a crop) saw only a centred box of the original;
        pixels outside that box take the nearest edge cell's value."""
        if not getattr(image_processor, "do_center_crop", False):
            return view.placed
        height, width = size
        scale = image_processor.size["shortest_edge"] / min(height, width)
        crop_h, crop_w = image_processor.crop_size["height"], image_processor.crop_size["width"]
        top, left = (1 - crop_h / (height * scale)) / 2, (1 - crop_w / (width * scale)) / 2
        bottom, right = 1 - top, 1 - left
        placed = []
        for p in view.placed:
            g_top, g_left, g_bottom, g_right = p.box
            span_h, span_w = (g_bottom - g_top) / (bottom - top), (g_right - g_left) / (right - left)
            placed.append(Placed(p.grid, (g_top - top * span_h, g_left - left * span_w,
                                          g_top + (1 - top) * span_h, g_left + (1 - left) * span_w)))
        return tuple(placed)

    def vision_tower(self) -> VisionTower | None:
        return clip_tower(_features)


LLAVA = register(LlavaAdapter(
    name="llava",
    model_types=("llava",),
    has_images=True,
    visual_token_attrs=("image_token_id|image_token_index",),
    source="transformers models/llava/modeling_llava.py",
))
