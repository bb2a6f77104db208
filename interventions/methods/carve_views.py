"""The image a VLM saw and the image-token grids covering it, per family, for CARVE.

CARVE refines "the image the model saw": it is rebuilt from the processor's `pixel_values` by undoing the
rescale and normalisation (exact up to uint8 rounding in float32) and the family's patch layout. Grids come from
`cca_grids` (one geometry for the project); what each grid covers:

- llava: one `N × N` grid over the (resized, centre-cropped) square.
- llava_next: the base `N × N` grid (the whole image squeezed to a square) and the unpadded any-resolution grid
  (newline column carries no pixel), both over the unpadded high-resolution view stitched from the tiles.
- qwen2_vl / qwen2_5_vl: the true `(grid_h / merge, grid_w / merge)` grid from `image_grid_thw` (never a square
  guessed from the token count, spec §6.1), over the resized image un-patchified from `pixel_values`.
- idefics3 / smolvlm: one square grid per image over the padded canvas; the image is the part the
  `pixel_attention_mask` marks. Images split into crops are refused (one grid per crop: not mapped yet).
- gemma3: the `√m × √m` pooled grid over the resized square. Pan-and-scan crops are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..errors import InputError
from .carve_refine import Placed
from .cca_geometry import Grid
from .cca_grids import fixed_grid, llava_next_grids

#: forward inputs that describe the images (read from the user's `generate` call before it encodes them)
PIXEL_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")
_QWEN = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class View:
    """The image one sample's model saw, and the grids (in sequence order) that cover it."""

    image: PIL.Image.Image
    placed: tuple[Placed, ...]


def sample_view(family: str, config: Any, image_processor: Any, inputs: Mapping[str, Any]) -> View:
    """The view of the one image of a one-prompt batch.

    Raises:
        InputError: several images or crops, or missing pixel inputs.
    """
    if inputs.get("pixel_values") is None:
        raise InputError("carve: generate got no pixel_values; pass the processor's outputs (images) to generate")
    pixels = inputs["pixel_values"]
    if family in _QWEN:
        count = _count(inputs, "image_grid_thw", family)
    elif family == "llava_next":
        count = _count(inputs, "image_sizes", family)
    elif family in ("idefics3", "smolvlm"):
        mask = inputs.get("pixel_attention_mask")
        count = pixels.shape[1] if mask is None else int(mask[0].flatten(1).any(1).sum())
    else:
        count = pixels.shape[0]
    if count != 1:
        raise InputError(f"carve: the prompt has {count} images or crops; CARVE refines one image per prompt "
                         f"(crops, e.g. image splitting or pan-and-scan, are not mapped to a grid)")
    if family in _QWEN:
        return _qwen(config, image_processor, pixels, inputs["image_grid_thw"][0])
    if family == "llava_next":
        return _llava_next(config, image_processor, pixels[0], inputs["image_sizes"][0])
    grid = fixed_grid(family, config, method="carve")
    if family in ("idefics3", "smolvlm"):
        return _idefics3(grid, image_processor, pixels[0], inputs.get("pixel_attention_mask"))
    return View(_to_image(pixels[0], image_processor), (Placed(grid),))


def sample_pixels(family: str, inputs: Mapping[str, Any], sample: int, batch: int) -> dict[str, Any]:
    """The pixel inputs of one prompt of a batch whose prompts hold one image each.

    Raises:
        InputError: the inputs do not hold one image per prompt.
    """
    key = "image_grid_thw" if family in _QWEN else "pixel_values"
    if inputs.get(key) is None or inputs[key].shape[0] != batch:
        raise InputError(f"carve: a batch of {batch} prompts needs exactly one image per prompt")
    own = {name: value[sample:sample + 1] for name, value in inputs.items()}
    if family in _QWEN:  # patches of all images are concatenated
        sizes = inputs["image_grid_thw"].prod(-1).tolist()
        start = int(sum(sizes[:sample]))
        own["pixel_values"] = inputs["pixel_values"][start:start + int(sizes[sample])]
    return own


def _count(inputs: Mapping[str, Any], key: str, family: str) -> int:
    if inputs.get(key) is None:
        raise InputError(f"carve: {family} needs {key} among the generate inputs")
    return int(inputs[key].shape[0])


def _to_image(pixels: torch.Tensor, image_processor: Any) -> PIL.Image.Image:
    """`(3, H, W)` processor output back to an RGB image: undo normalisation and rescaling."""
    x = pixels.detach().float().cpu()
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        x = x * std + mean
    if getattr(image_processor, "do_rescale", True):
        x = x / image_processor.rescale_factor
    array = x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def _qwen(config: Any, image_processor: Any, pixels: torch.Tensor, grid_thw: torch.Tensor) -> View:
    t, h, w = (int(v) for v in grid_thw)
    if t != 1:
        raise InputError("carve: a video (temporal grid > 1) is not an image CARVE can refine")
    merge, patch = config.vision_config.spatial_merge_size, image_processor.patch_size
    flat = pixels[:h * w].detach().float()
    # the processor's layout: (h/m, w/m, m, m, C, T, P, P) flattened; keep temporal copy 0
    x = flat.view(h // merge, w // merge, merge, merge, 3, -1, patch, patch)[:, :, :, :, :, 0]
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * patch, w * patch)
    return View(_to_image(x, image_processor), (Placed(Grid(h // merge, w // merge)),))


def _llava_next(config: Any, image_processor: Any, tiles: torch.Tensor, image_size: torch.Tensor) -> View:
    from transformers.image_processing_utils import select_best_resolution

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
    view = _to_image(canvas[:, top:top + new_h, left:left + new_w], image_processor)
    base, grid = llava_next_grids(config, image_size)
    return View(view, (Placed(base), Placed(grid)))


def _idefics3(grid: Grid, image_processor: Any, pixels: torch.Tensor, mask: torch.Tensor | None) -> View:
    size_h, size_w = pixels.shape[-2:]
    h, w = size_h, size_w
    if mask is not None:
        real = mask[0].flatten(1).any(1)
        pixels, valid = pixels[real], mask[0][real][0]
        h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
    image = _to_image(pixels[0][:, :h, :w], image_processor)
    return View(image, (Placed(grid, (0.0, 0.0, h / size_h, w / size_w)),))


def on_original(view: View, family: str, image_processor: Any, size: tuple[int, int],
                stretch: bool = False) -> tuple[Placed, ...]:
    """The grids of `view` re-expressed over the original image of `size` (height, width) that the processor
    turned into the view: the whole original, except for LLaVA's centre crop (a resize of the shortest edge, then
    a crop), which saw only a centred box of it; pixels outside that box take the nearest edge cell's value.
    `stretch`: the official code's mapping, the view's grids stretched over the whole original (no crop)."""
    top, left, bottom, right = 0.0, 0.0, 1.0, 1.0
    if not stretch and family == "llava" and getattr(image_processor, "do_center_crop", False):
        height, width = size
        short = image_processor.size["shortest_edge"]
        scale = short / min(height, width)
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
