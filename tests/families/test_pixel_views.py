"""The image layout each family adapter gives (`Layout.pixel_view`, `Layout.on_original`), on each family's real
processor outputs: the image rebuilt from `pixel_values` is the image the model saw, and its grids place each image
token over the part of the image it covers (checked through CARVE's pixel map, the method that reads them)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from tiny_models import _FAMILY_SPECS, VLM_FAMILIES, Prompt, build_model, make_inputs
from tiny_processors import prompt_inputs, random_image, shared_processor

from interventions.core.geometry import Placed
from interventions.families import resolve
from interventions.methods.carve.refine import keep_regions, pixel_map, refine, threshold

QUESTION = "what is in the image ?"


@functools.cache
def _model(family: str):
    return build_model(family)


_processor, _image = shared_processor, random_image


def _hot_tokens(placed: tuple[Placed, ...], rows: tuple[float, float], cols: tuple[float, float]) -> torch.Tensor:
    """1 on the tokens whose cell centre (as a fraction of the image) lies in the hot box, 0 elsewhere (newlines 0)."""
    values = []
    for p in placed:
        g, (top, left, bottom, right) = p.grid, p.box
        for r in range(g.rows):
            for c in range(g.cols + int(g.newline)):
                y = ((r + 0.5) / g.rows - top) / (bottom - top)
                x = ((c + 0.5) / g.cols - left) / (right - left)
                values.append(float(c < g.cols and rows[0] <= y < rows[1] and cols[0] <= x < cols[1]))
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_hot_region_lands_in_mask_and_crop(family):
    """The grids of each family's real processor outputs (random 20×28 image): attention hot on the bottom-left
    quarter of the image gives a mask and a crop inside that quarter (one grid cell of bilinear spread)."""
    model = _model(family)
    inputs = make_inputs(model, family, [Prompt(3, 4, seed=3)])
    view = resolve(model).pixel_view(model.config, _FAMILY_SPECS[family].image_processor(), inputs, "carve")
    tokens = _hot_tokens(view.placed, (0.5, 1.0), (0.0, 0.5))
    assert tokens.numel() == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert tokens.sum() > 0
    height, width = view.image.height, view.image.width
    saliency = pixel_map(tokens, view.placed, (height, width))
    assert saliency.shape == (height, width)
    mask = keep_regions(saliency, threshold(saliency, 0.2), 3, "max", 0.2)
    cell = max(height / min(p.grid.rows for p in view.placed), width / min(p.grid.cols for p in view.placed))
    ys, xs = np.nonzero(mask)
    assert ys.min() >= height / 2 - cell and xs.max() < width / 2 + cell
    refined, (left, top, right, bottom) = refine(view.image, mask)
    assert top >= height / 2 - cell and right <= width / 2 + cell


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3"])
def test_view_is_the_image_the_model_saw(family):
    """The image rebuilt from `pixel_values` gives the same `pixel_values` again through the processor."""
    processor = _processor(family)
    inputs = prompt_inputs(processor, family, _image(8), QUESTION)
    view = resolve(_model(family)).pixel_view(_model(family).config, processor.image_processor, inputs, "carve")
    again = prompt_inputs(processor, family, view.image, QUESTION)
    assert torch.equal(again["pixel_values"], inputs["pixel_values"])


def test_grids_on_the_original_image():
    """With the original image given, LLaVA's grid covers only the centre crop its processor kept (20×28 →
    shortest edge 16 → 16×22.4 → centre 16×16: columns 4..24 of 28); whole-image families keep their boxes."""
    family = "llava"
    processor = _processor(family)
    original = _image(0, (20, 28))
    inputs = prompt_inputs(processor, family, original, QUESTION)
    adapter = resolve(_model(family))
    view = adapter.pixel_view(_model(family).config, processor.image_processor, inputs, "carve")
    placed = adapter.on_original(view, processor.image_processor, (20, 28))
    tokens = _hot_tokens(view.placed, (0.0, 1.0), (0.0, 0.5))  # the left half of what the model saw
    saliency = pixel_map(tokens, placed, (20, 28))
    inside = saliency[:, 5:13]
    assert inside.min() > saliency[:, 16:].max()  # the left half of the crop is hot, its right half and beyond not
    assert placed[0].box == pytest.approx((0.0, -4 / 20, 1.0, 1 + 4 / 20), abs=1e-6)
    qwen = resolve(_model("qwen2_vl"))
    qwen_view = qwen.pixel_view(_model("qwen2_vl").config, _processor("qwen2_vl").image_processor,
                                prompt_inputs(_processor("qwen2_vl"), "qwen2_vl", original, QUESTION), "carve")
    assert qwen.on_original(qwen_view, _processor("qwen2_vl").image_processor, (20, 28)) == qwen_view.placed
