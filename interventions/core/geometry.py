"""Image-token geometry shared by the families and the methods: 2-D grids of image tokens, the part of a grid that
shows the image, the image a model saw, and how image-token runs split into grids. Which grid a family has is the
family adapter's knowledge (`interventions/families/`); what a method does on a grid is the method's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..errors import InputError


@dataclass(frozen=True)
class Grid:
    """`rows × cols` image tokens in row-major order (CLIP patch order).

    Attributes:
        rows (`int`), cols (`int`): grid size.
        newline (`bool`): each row ends with one extra token (LLaVA-NeXT's `image_newline`); it sits on the
            right edge, so it joins the outer ring 0.
    """

    rows: int
    cols: int
    newline: bool = False

    @property
    def length(self) -> int:
        """Tokens of the grid in the sequence."""
        return self.rows * (self.cols + int(self.newline))

    @property
    def num_rings(self) -> int:
        """Distinct ring indices, `ceil(min(rows, cols) / 2)`: the positions the grid occupies (12 for 24×24)."""
        return (min(self.rows, self.cols) + 1) // 2

    def rings(self) -> torch.Tensor:
        """Ring index of every token in sequence order, `(length,)`: `min(r, c, rows-1-r, cols-1-c)`, so the
        periphery is 0 and the centre `num_rings - 1` (the centre comes last, nearest the instruction)."""
        r = torch.arange(self.rows)[:, None]
        c = torch.arange(self.cols)[None, :]
        ring = torch.minimum(torch.minimum(r, self.rows - 1 - r), torch.minimum(c, self.cols - 1 - c))
        if self.newline:
            ring = torch.cat([ring, torch.zeros(self.rows, 1, dtype=ring.dtype)], 1)
        return ring.flatten()


@dataclass(frozen=True)
class Placed:
    """One image-token grid and the part of it that shows the image.

    Attributes:
        grid (`Grid`): rows × cols tokens in sequence order (a newline column, if any, carries no pixel).
        box (`tuple[float, float, float, float]`): `(top, left, bottom, right)` of the image inside the grid, as
            fractions of the grid's height and width (`(0, 0, 1, 1)`: the grid covers exactly the image; a padded
            canvas covers less).
    """

    grid: Grid
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class View:
    """The image one sample's model saw, and the grids (in sequence order) that cover it."""

    image: PIL.Image.Image
    placed: tuple[Placed, ...]


def to_image(pixels: torch.Tensor, image_processor: Any) -> PIL.Image.Image:
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


def place_grids(family: str, fixed: Grid | None, blocks: Iterator[list[Grid]] | None,
                runs: list[list[tuple[int, int]]], method: str = "cca") -> list[list[tuple[int, Grid]]]:
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
                    raise InputError(f"{method}: sample {sample} has more image tokens than the inputs have images")
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
