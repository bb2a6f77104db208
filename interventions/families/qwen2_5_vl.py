"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the Qwen2-VL token layout with a windowed vision tower,
whose merge units are held in window order (un-permuted before they meet the LLM's image positions).

Source: transformers 5.x `models/qwen2_5_vl/modeling_qwen2_5_vl.py`; shared/specs/hf_integration.md §2.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import register
from .qwen2_vl import Qwen2VLAdapter, merged_tokens, split_images


@dataclass(frozen=True)
class Qwen2_5VLAdapter(Qwen2VLAdapter):
    """Qwen2-VL's layout, with the window-ordered tower."""

    def units(self, model: Any, scores: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
        from transformers.vision_utils import get_vision_window_index

        tower = model.model.visual
        tokens = merged_tokens(model, scores, inputs)
        window_index, _ = get_vision_window_index(inputs["grid_thw"], spatial_merge_size=tower.spatial_merge_size,
                                                  window_size=tower.window_size, patch_size=tower.patch_size)
        return split_images(model, tokens[torch.argsort(window_index.to(tokens.device))], inputs)


QWEN2_5_VL = register(Qwen2_5VLAdapter(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    has_images=True,
    boundary_token_attrs=("vision_start_token_id", "vision_end_token_id"),
    visual_token_attrs=("image_token_id", "video_token_id"),
    source="transformers models/qwen2_5_vl/modeling_qwen2_5_vl.py",
))
