"""CARVE's map-to-image steps (shared/specs/carve.md §3 steps 3–5): contrast, fusion over layers and steps, the
pixel map, the top-p threshold, connected regions, the black mask, the crop and the magnification.

Pure functions on tensors, arrays and PIL images; which image-token grid covers which part of the image is decided
by the family adapter (`Layout.pixel_view`, `Layout.on_original`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from ...core.geometry import Placed
from ...errors import InputError

#: 4-connectivity structuring element for `scipy.ndimage.label` [code] masking.py
_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


def contrast(task: torch.Tensor, general: torch.Tensor, lam: float) -> torch.Tensor:
    """`Â = A_Q / (A_G + λ)`, elementwise, over the first `min(T_Q, T_G)` steps (paired by index).

    Args:
        task (`torch.Tensor` of shape `(steps_q, layers, image_tokens)`): head-mean last-row attention, pass Q.
        general (`torch.Tensor` of shape `(steps_g, layers, image_tokens)`): the same for pass G.
        lam (`float`): λ > 0.
    """
    steps = min(task.shape[0], general.shape[0])
    return task[:steps] / (general[:steps] + lam)


def step_weights(steps: int, mode: str) -> torch.Tensor:
    """Weights `w_t` of the paired steps: `full` t+1 (0-based t), `start` step 0 only, `end` the last step only."""
    w = torch.zeros(steps, dtype=torch.float64)
    if mode == "full":
        w = torch.arange(1, steps + 1, dtype=torch.float64)
    elif mode == "start":
        w[0] = 1
    else:
        w[-1] = 1
    return w


def fuse(con: torch.Tensor, mode: str) -> torch.Tensor:
    """`Σ_t w_t Σ_l Â_{l,t}` per image token, `(image_tokens,)` in float64.

    Upsampling is linear, so fusing on the token grid and upsampling once equals the spec's sum of upsampled maps.
    """
    if con.shape[0] == 0:
        raise InputError("carve: a capture pass generated no token, so there is no attention step to contrast")
    w = step_weights(con.shape[0], mode).to(con.device)
    return (con.double().sum(1) * w[:, None]).sum(0)


def pixel_map(tokens: torch.Tensor, placed: Sequence[Placed], size: tuple[int, int]) -> np.ndarray:
    """The saliency map `S` over an image of `size` (height, width): each grid's token values upsampled
    bilinearly (half-pixel centres, edges clamped) onto the image through its box, summed over grids.

    Args:
        tokens (`torch.Tensor` of shape `(image_tokens,)`): fused contrast, in the grids' sequence order.
        placed: the grids covering the image, in sequence order (their lengths sum to `image_tokens`).
    """
    if sum(p.grid.length for p in placed) != tokens.numel():
        raise InputError(f"carve: {tokens.numel()} image tokens do not match the image grids "
                         f"({'+'.join(str(p.grid.length) for p in placed)})")
    height, width = size
    total = torch.zeros(height, width, dtype=torch.float64)
    at = 0
    for p in placed:
        g = p.grid
        values = tokens[at:at + g.length].double().cpu().view(g.rows, g.cols + int(g.newline))[:, :g.cols]
        at += g.length
        top, left, bottom, right = p.box
        ys = top + (torch.arange(height, dtype=torch.float64) + 0.5) / height * (bottom - top)  # grid fraction
        xs = left + (torch.arange(width, dtype=torch.float64) + 0.5) / width * (right - left)
        grid = torch.stack(torch.meshgrid(xs * 2 - 1, ys * 2 - 1, indexing="xy"), -1)  # (H, W, 2) as (x, y)
        total += torch.nn.functional.grid_sample(values[None, None], grid[None], mode="bilinear",
                                                 padding_mode="border", align_corners=False)[0, 0]
    return total.numpy()


def threshold(saliency: np.ndarray, top_percent: float) -> np.ndarray:
    """`S ≥ percentile(S, 100·(1 − p))`: about a fraction `p` of the pixels (ties kept)."""
    if not np.isfinite(saliency).all():
        raise InputError("carve: the saliency map has NaN or infinite values (attention over image tokens was "
                         "not finite); refusing to build an empty or black mask")
    return saliency >= np.percentile(saliency, 100 * (1 - top_percent))


def keep_regions(saliency: np.ndarray, mask: np.ndarray, max_regions: int, mode: str,
                 top_percent: float) -> np.ndarray:
    """4-connected components of `mask`, ranked by the sum of `S` inside; keep the top `min(K, n)` (`max`, paper)
    or `max(K, int(n·p))` (`official_min`, the code's minimum)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=_FOUR)
    if n == 0:
        raise InputError("carve: the thresholded map has no pixel")
    scores = ndimage.sum_labels(saliency, labels, index=np.arange(1, n + 1))
    keep = min(max_regions, n) if mode == "max" else min(n, max(max_regions, int(n * top_percent)))
    chosen = np.argsort(-scores, kind="stable")[:keep] + 1
    return np.isin(labels, chosen)


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Union bounding box `(left, top, right, bottom)` of the kept pixels (right/bottom exclusive)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def refine(image: PIL.Image.Image, mask: np.ndarray) -> tuple[PIL.Image.Image, tuple[int, int, int, int]]:
    """Black out the pixels outside `mask`, crop to its bounding box and magnify by `s = max(W/cw, H/ch)`
    (LANCZOS, aspect ratio kept; no resize when `s = 1`). Returns the refined image and the box."""
    rgb = np.asarray(image.convert("RGB"))
    if mask.shape != rgb.shape[:2]:
        raise InputError(f"carve: mask {mask.shape} and image {rgb.shape[:2]} sizes differ")
    box = bbox(mask)
    crop = PIL.Image.fromarray(rgb * mask[..., None].astype(rgb.dtype)).crop(box)
    scale = max(image.width / crop.width, image.height / crop.height)
    if scale != 1:
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), PIL.Image.Resampling.LANCZOS)
    return crop, box


def overlay(image: PIL.Image.Image, mask: np.ndarray, alpha: float = 0.5) -> PIL.Image.Image:
    """The image with the dropped pixels dimmed toward red by `alpha`: a quick look at what CARVE keeps.

    Example:
        >>> overlay(result.image, result.mask).save("carve_mask.png")
    """
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    red = np.array([255, 0, 0], dtype=np.float32)
    out = np.where(mask[..., None], rgb, (1 - alpha) * rgb + alpha * red)
    return PIL.Image.fromarray(out.round().astype(np.uint8))
