"""What the 2-D grid of image tokens is in each family, for CCA (a project decision where the paper has none).

- llava: one `N × N` grid per image, `N = image_size // patch_size` of the vision tower (24 for LLaVA-1.5).
- llava_next: per image, the base crop `N × N`, then the any-resolution grid `H × W` after unpadding, each row
  ending with a newline token (ring 0); `H, W` follow from `image_sizes` exactly as transformers packs them, or,
  under `generate` (which encodes images before prefill and drops `image_sizes`), from the packed features.
- idefics3 / smolvlm: one square grid per crop or global image (`image_seq_len` tokens after pixel shuffle).
- gemma3: one `√m × √m` grid per image (`mm_tokens_per_image` pooled tokens, 16 × 16 for the released models).
- qwen2_vl / qwen2_5_vl: refused; their 3-D M-RoPE has no 1-D position to remap (shared/specs/cca.md §7).
Each grid is concentric on its own; grids of one image (LLaVA-NeXT) or of several crops follow each other
causally, like text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import ConfigError, InputError
from .cca_geometry import Grid

_M_ROPE = ("qwen2_vl", "qwen2_5_vl")
#: forward inputs the grids may depend on (llava_next)
LAYOUT_INPUTS = ("image_sizes", "mm_encoder_outputs")


def fixed_grid(family: str, config: Any, method: str = "cca") -> Grid | None:
    """The grid of every image (or crop) run of `family`; None when it depends on the image (llava_next).
    `method` names the caller in errors.

    Raises:
        ConfigError: the family has no 2-D grid CCA can use (M-RoPE families, unknown families, CLS features).
    """
    if family in _M_ROPE:
        raise ConfigError(
            f"cca: the {family} family uses 3-D M-RoPE position ids (temporal, height, width), which have no 1-D "
            "position to remap; CCA is defined for 1-D RoPE only. Supported families: gemma3, idefics3 (smolvlm), "
            "llava, llava_next"
        )
    if family == "llava" or family == "llava_next":
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise ConfigError(f"{method}: vision_feature_select_strategy="
                              f"{config.vision_feature_select_strategy!r} keeps the CLS feature, which has no cell "
                              "in the patch grid; allowed: 'default'")
        n = config.vision_config.image_size // config.vision_config.patch_size
        return Grid(n, n) if family == "llava" else None
    if family == "idefics3":
        n = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
        return Grid(n, n)
    if family == "gemma3":
        n = math.isqrt(config.mm_tokens_per_image)
        if n * n != config.mm_tokens_per_image:
            raise ConfigError(f"{method}: gemma3 mm_tokens_per_image={config.mm_tokens_per_image} is not a square grid")
        return Grid(n, n)
    raise ConfigError(f"{method}: no 2-D image-token grid is defined for the {family} family; "
                      "supported: gemma3, idefics3 (smolvlm), llava, llava_next")


def llava_next_grids(config: Any, image_size: torch.Tensor) -> list[Grid]:
    """Base crop grid, then the unpadded any-resolution grid with one newline token per row, for one image of
    `image_size` (height, width), as `LlavaNextModel.pack_image_features` lays them out."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vision = config.vision_config
    n = vision.image_size // vision.patch_size
    tiles_h, tiles_w = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    rows, cols = unpad_image(torch.empty(0, tiles_h * n, tiles_w * n), image_size).shape[1:]
    return [Grid(n, n), Grid(rows, cols, newline=True)]


def llava_next_blocks(config: Any, inputs: Mapping[str, Any]) -> Iterator[list[Grid]]:
    """The grids of each image of a batch, in batch order: from `image_sizes` in a plain forward, or from the
    newline rows of the packed image features that `generate` encodes before prefill (it drops `image_sizes`)."""
    sizes = inputs.get("image_sizes")
    if sizes is not None:
        for size in sizes:
            yield llava_next_grids(config, size)
        return
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    features = getattr(encoded, "pooler_output", None)
    if features is None:
        raise InputError("cca: llava_next needs image_sizes among the forward inputs to know each image's grid")
    vision = config.vision_config
    base = Grid(vision.image_size // vision.patch_size, vision.image_size // vision.patch_size)
    for packed in features:
        yield [base, _grid_from_newlines(packed[base.length:])]


def _grid_from_newlines(grid: torch.Tensor) -> Grid:
    """`rows × cols` of a packed any-resolution grid `(rows·(cols+1), dim)`: every row ends with the same newline
    embedding, so the rows equal to the last one are the newlines."""
    newline = (grid == grid[-1]).all(-1).nonzero().flatten()
    width = int(newline[0]) + 1
    if grid.shape[0] % width or not torch.equal(newline, torch.arange(width - 1, grid.shape[0], width,
                                                                      device=newline.device)):
        raise InputError("cca: cannot find the row layout (newline tokens) of a llava_next image; pass "
                         "image_sizes to the forward")
    return Grid(len(newline), width - 1, newline=True)


def place_grids(family: str, fixed: Grid | None, blocks: Iterator[list[Grid]] | None,
                runs: list[list[tuple[int, int]]]) -> list[list[tuple[int, Grid]]]:
    """Split each sample's runs of image tokens `[start, end)` into grids.

    Fixed-grid families cut runs into blocks of the grid's length (adjacent images form one run); otherwise
    `blocks` gives the grids of each image in batch order (`llava_next_blocks`), as the model consumes them.

    Raises:
        InputError: a run does not split into the family's grids.
    """
    placed = []
    for sample, sample_runs in enumerate(runs):
        grids: list[tuple[int, Grid]] = []
        for start, end in sample_runs:
            at = start
            while at < end:
                block = [fixed] if fixed is not None else next(blocks, None)
                if block is None:
                    raise InputError(f"cca: sample {sample} has more image tokens than the inputs have images")
                if at + sum(g.length for g in block) > end:
                    raise InputError(
                        f"cca: sample {sample} has an image-token run [{start}, {end}) that does not split into "
                        f"{family} grids ({'+'.join(str(g.length) for g in block)} tokens per image)"
                    )
                for grid in block:
                    grids.append((at, grid))
                    at += grid.length
        placed.append(grids)
    return placed
