"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): `<|image_pad|>` / `<|video_pad|>` runs between vision
start/end tokens; M-RoPE position ids are computed by the model.

Layout: the true `(grid_h / merge, grid_w / merge)` token grid from `image_grid_thw` (never a square guessed from
the token count), over the resized image un-patchified from `pixel_values` (the patches of all images of a batch
are concatenated). The vision tower: fused `qkv`, 2-D RoPE, one attention per `cu_seqlens` chunk;
`spatial_merge_size²` consecutive patches merge into one LLM token. 3-D M-RoPE positions have no 1-D position to
remap.
Source: transformers 5.x `models/qwen2_vl/modeling_qwen2_vl.py`; shared/specs/hf_integration.md §2.2.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.contract import VisionTower
from ..core.geometry import Grid, Placed, View, to_image
from ..errors import InputError
from .base import FamilyAdapter, register


def find(model: Any) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """`(tower, attention modules)` of a Qwen2-VL / 2.5-VL vision tower."""
    tower = model.model.visual
    return tower, [block.attn for block in tower.blocks]


def qk(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[tuple]:
    """One vision attention call on the packed `(patches, dim)` sequence: `(q, k, scaling, None)` per chunk."""
    hidden = args[0] if args else kwargs["hidden_states"]
    length = hidden.shape[0]
    q, k, _ = module.qkv(hidden).reshape(length, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = kwargs["position_embeddings"]
    rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
    q, k = rotate(q, k, cos, sin)
    bounds = kwargs["cu_seqlens"].tolist()
    return [(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], module.scaling, None)
            for a, b in itertools.pairwise(bounds)]


def merged_tokens(model: Any, scores: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Patch scores summed onto the LLM tokens their merge units become, in the tower's order."""
    if inputs.get("grid_thw") is None:
        raise InputError("paint: the Qwen vision tower was called without grid_thw")
    return scores.view(-1, model.model.visual.spatial_merge_size ** 2).sum(-1)


def split_images(model: Any, tokens: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
    """Token scores of each image, in the order the model fills the image positions."""
    unit = model.model.visual.spatial_merge_size ** 2
    return list(tokens.split((inputs["grid_thw"].prod(-1) // unit).tolist()))


@dataclass(frozen=True)
class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL's layout (Qwen2.5-VL extends it)."""

    multi_axis_positions: bool = True
    _per_image_input = "image_grid_thw"

    def image_count(self, inputs: Mapping[str, Any], method: str) -> int:
        if inputs.get("image_grid_thw") is None:
            raise InputError(f"{method}: {self.name} needs image_grid_thw among the generate inputs")
        return int(inputs["image_grid_thw"].shape[0])

    def pixel_view(self, config: Any, image_processor: Any, inputs: Mapping[str, Any], method: str) -> View:
        pixels = self._one_image(inputs, method)
        t, h, w = (int(v) for v in inputs["image_grid_thw"][0])
        if t != 1:
            raise InputError(f"{method}: a video (temporal grid > 1) is not an image {method} can refine")
        merge, patch = config.vision_config.spatial_merge_size, image_processor.patch_size
        flat = pixels[:h * w].detach().float()
        # the processor's layout: (h/m, w/m, m, m, C, T, P, P) flattened; keep temporal copy 0
        x = flat.view(h // merge, w // merge, merge, merge, 3, -1, patch, patch)[:, :, :, :, :, 0]
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * patch, w * patch)
        return View(to_image(x, image_processor), (Placed(Grid(h // merge, w // merge)),))

    def sample_pixels(self, inputs: Mapping[str, Any], sample: int, batch: int, method: str) -> dict[str, Any]:
        own = super().sample_pixels(inputs, sample, batch, method)
        sizes = inputs["image_grid_thw"].prod(-1).tolist()  # the patches of all images are concatenated
        start = int(sum(sizes[:sample]))
        own["pixel_values"] = inputs["pixel_values"][start:start + int(sizes[sample])]
        return own

    def vision_tower(self) -> VisionTower | None:
        return VisionTower(find, cls_token=False, summary_layer=-1, qk=qk, units=self.units)

    def units(self, model: Any, scores: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
        """Token scores of each image from the patch scores of one tower pass."""
        return split_images(model, merged_tokens(model, scores, inputs), inputs)


QWEN2_VL = register(Qwen2VLAdapter(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    has_images=True,
    boundary_token_attrs=("vision_start_token_id", "vision_end_token_id"),
    visual_token_attrs=("image_token_id", "video_token_id"),
    source="transformers models/qwen2_vl/modeling_qwen2_vl.py",
))
