"""Idefics3 and SmolVLM: `<image>` runs of `image_seq_len` tokens per crop, between `<fake_token_around_image>`
and row/column or `<global-img>` markers (many runs per image).

Layout: one square grid per crop or global image (`image_seq_len` tokens after the connector's pixel shuffle), over
the padded canvas, of which the image is the part `pixel_attention_mask` marks; a SigLIP tower whose patch scores
merge onto tokens through the pixel shuffle. The processor takes one list of images per prompt.
Source: transformers 5.x `models/{idefics3,smolvlm}/modeling_*.py`; shared/specs/hf_integration.md §2.2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.contract import VisionTower
from ..core.geometry import Grid, Placed, View, to_image
from . import siglip
from .base import FamilyAdapter, register


def _units(model: Any, scores: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
    connector = model.model.connector
    shuffled = connector.pixel_shuffle(scores[..., None], connector.scale_factor)  # (crops, tokens, s²)
    return list(shuffled.sum(-1))


@dataclass(frozen=True)
class Idefics3Adapter(FamilyAdapter):
    """Idefics3 / SmolVLM's layout."""

    nests_images: bool = True

    def fixed_grid(self, config: Any, method: str) -> Grid | None:
        n = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
        return Grid(n, n)

    def image_count(self, inputs: Mapping[str, Any], method: str) -> int:
        mask = inputs.get("pixel_attention_mask")
        return inputs["pixel_values"].shape[1] if mask is None else int(mask[0].flatten(1).any(1).sum())

    def pixel_view(self, config: Any, image_processor: Any, inputs: Mapping[str, Any], method: str) -> View:
        pixels = self._one_image(inputs, method)[0]
        mask = inputs.get("pixel_attention_mask")
        size_h, size_w = pixels.shape[-2:]
        h, w = size_h, size_w
        if mask is not None:
            real = mask[0].flatten(1).any(1)
            pixels, valid = pixels[real], mask[0][real][0]
            h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
        image = to_image(pixels[0][:, :h, :w], image_processor)
        return View(image, (Placed(self.fixed_grid(config, method), (0.0, 0.0, h / size_h, w / size_w)),))

    def vision_tower(self) -> VisionTower | None:
        return VisionTower(siglip.encoder_find("vision_model"), cls_token=False, summary_layer=-1, qk=siglip.qk,
                           units=_units)


IDEFICS3 = register(Idefics3Adapter(
    name="idefics3",
    model_types=("idefics3", "smolvlm"),
    has_images=True,
    visual_token_attrs=("image_token_id",),
    source="transformers models/{idefics3,smolvlm}/modeling_*.py",
))
