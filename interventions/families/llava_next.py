"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres base + grid + newline tokens, all `<image>` ids.

Layout, per image: the base crop `N × N` (the whole image squeezed to a square), then the any-resolution grid
`H × W` after unpadding, each row ending with a newline token; `H, W` follow from `image_sizes` exactly as
transformers packs them, or, under `generate` (which encodes images before prefill and drops `image_sizes`), from
the packed features. The pixels: the unpadded high-resolution view stitched from the tiles. A CLIP tower per crop.
Source: transformers 5.x `models/llava_next/modeling_llava_next.py`; shared/specs/hf_integration.md §2.2.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.contract import VisionTower
from ..core.geometry import Grid, Placed, View, to_image
from ..errors import InputError
from .base import FamilyAdapter, register
from .clip import clip_tower, patch_grid_side


def image_grids_of(config: Any, image_size: torch.Tensor) -> list[Grid]:
    """Base crop grid, then the unpadded any-resolution grid with one newline token per row, for one image of
    `image_size` (height, width), as `LlavaNextModel.pack_image_features` lays them out."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    n = vision.image_size // vision.patch_size
    tiles_h, tiles_w = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    rows, cols = unpad_image(torch.empty(0, tiles_h * n, tiles_w * n), image_size).shape[1:]
    return [Grid(n, n), Grid(rows, cols, newline=True)]


def _grid_from_newlines(grid: torch.Tensor, method: str) -> Grid:
    """`rows × cols` of a packed any-resolution grid `(rows·(cols+1), dim)`: every row ends with the same newline
    embedding, so the rows equal to the last one are the newlines."""
    newline = (grid == grid[-1]).all(-1).nonzero().flatten()
    width = int(newline[0]) + 1
    if grid.shape[0] % width or not torch.equal(newline, torch.arange(width - 1, grid.shape[0], width,
                                                                      device=newline.device)):
        raise InputError(f"{method}: cannot find the row layout (newline tokens) of a llava_next image; pass "
                         "image_sizes to the forward")
    return Grid(len(newline), width - 1, newline=True)


def _features(model: Any, crops: int, patches: int, image_sizes: Any) -> list[torch.Tensor]:
    """The model's own packing (unpad, newline per row) applied to the patch indices; newline features read -1."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    index = torch.arange(crops * patches, dtype=torch.float64).view(crops, patches, 1)
    if config.vision_feature_select_strategy == "full":  # the CLS feature is kept as an image token
        index = torch.cat([torch.full((crops, 1, 1), -1.0, dtype=torch.float64), index], 1)
    if image_sizes is None:
        raise InputError("paint: llava_next needs the image_sizes the processor returns, passed to the wrapped "
                         "model or its generate")
    counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
              for size in image_sizes]
    if sum(counts) != crops:
        raise InputError(f"paint: image_sizes give {sum(counts)} crops, the vision tower ran {crops}")
    packed, _ = model.model.pack_image_features(
        list(index.split(counts)), image_sizes, config.vision_feature_select_strategy,
        image_newline=torch.tensor([-1.0], dtype=torch.float64))
    return [p.flatten().long() for p in packed]


@dataclass(frozen=True)
class LlavaNextAdapter(FamilyAdapter):
    """LLaVA-NeXT's layout."""

    grid_inputs: tuple[str, ...] = ("image_sizes", "mm_encoder_outputs")

    def fixed_grid(self, config: Any, method: str) -> Grid | None:
        patch_grid_side(config, method)  # refuses a kept CLS feature
        return None

    def image_grids(self, config: Any, inputs: Mapping[str, Any], method: str) -> Iterator[list[Grid]]:
        """From `image_sizes` in a plain forward, or from the newline rows of the packed image features that
        `generate` encodes before prefill (it drops `image_sizes`)."""
        sizes = inputs.get("image_sizes")
        if sizes is not None:
            for size in sizes:
                yield image_grids_of(config, size)
            return
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        features = getattr(encoded, "pooler_output", None)
        if features is None:
            raise InputError(f"{method}: llava_next needs image_sizes among the forward inputs to know each image's "
                             "grid")
        vision = config.vision_config
        base = Grid(vision.image_size // vision.patch_size, vision.image_size // vision.patch_size)
        for packed in features:
            yield [base, _grid_from_newlines(packed[base.length:], method)]

    def image_count(self, inputs: Mapping[str, Any], method: str) -> int:
        if inputs.get("image_sizes") is None:
            raise InputError(f"{method}: {self.name} needs image_sizes among the generate inputs")
        return int(inputs["image_sizes"].shape[0])

    def pixel_view(self, config: Any, image_processor: Any, inputs: Mapping[str, Any], method: str) -> View:
        from transformers.image_processing_utils import select_best_resolution

        tiles = self._one_image(inputs, method)[0]
        image_size = inputs["image_sizes"][0]
        height, width = (int(v) for v in image_size)
        best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
        size = tiles.shape[-1]
        rows, cols = best_h // size, best_w // size
        canvas = tiles[1:1 + rows * cols].view(rows, cols, 3, size, size).permute(2, 0, 3, 1, 4)
        canvas = canvas.reshape(3, best_h, best_w)
        # the processor resized the image into (best_h, best_w) keeping its aspect ratio, then padded it centred
        if best_w / width < best_h / height:
            new_h, new_w = min(math.ceil(height * best_w / width), best_h), best_w
        else:
            new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        view = to_image(canvas[:, top:top + new_h, left:left + new_w], image_processor)
        base, grid = image_grids_of(config, image_size)
        return View(view, (Placed(base), Placed(grid)))

    def vision_tower(self) -> VisionTower | None:
        return clip_tower(_features)


LLAVA_NEXT = register(LlavaNextAdapter(
    name="llava_next",
    model_types=("llava_next",),
    has_images=True,
    visual_token_attrs=("image_token_id|image_token_index",),
    source="transformers models/llava_next/modeling_llava_next.py",
))
