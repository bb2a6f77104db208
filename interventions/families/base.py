"""Family adapters: where a model family keeps its text decoder, attention modules and image tokens, and its image
layout (the core's `Layout`: image-token grids, the pixels the model saw, the vision tower).

An adapter is mostly data (`model_types`, whether it has images, the config attributes naming the visual token
ids); code covers only what a table cannot say. Families are keyed by `config.model_type`. The defaults here
are those of a family with one fixed grid per image and one `pixel_values` row per image; each family file
overrides what differs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.contract import VisionTower
from ..core.geometry import Grid, Placed, View, to_image
from ..errors import ConfigError, InputError, UnsupportedFamilyError
from ..registry import Registry

#: forward inputs that describe the images (kept from the user's `generate` call before it encodes them)
PIXEL_INPUTS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask")
#: model inputs with one entry per position, which follow `input_ids` when positions are dropped
PER_POSITION_INPUTS = ("token_type_ids", "mm_token_type_ids")
#: model inputs that carry the image itself: these prefixes, and these names (the latter: images `generate`
#: pre-encoded)
_VISION_PREFIXES = ("pixel_", "image_", "video_")
_VISION_NAMES = ("second_per_grid_ts", "mm_encoder_outputs")


@dataclass(frozen=True)
class FamilyAdapter:
    """Structural facts of one model family.

    Attributes:
        name (`str`): family name.
        model_types (`tuple[str, ...]`): `config.model_type` values this adapter serves.
        has_images (`bool`): whether prompts carry image placeholder tokens.
        visual_token_attrs (`tuple[str, ...]`): top-level config attributes holding visual token ids, first found
            wins per entry (e.g. `"image_token_id|image_token_index"`).
        boundary_token_attrs (`tuple[str, ...]`): the same for the markers around an image (vision start/end,
            BOI/EOI), which count as template tokens.
        source (`str`): where the layout facts come from.
    """

    name: str
    model_types: tuple[str, ...]
    has_images: bool
    visual_token_attrs: tuple[str, ...] = ()
    boundary_token_attrs: tuple[str, ...] = ()
    source: str = ""
    #: the processor takes one list of images per prompt (`images=[[img], ...]`)
    nests_images: bool = False
    #: position ids are multi-dimensional (M-RoPE): no 1-D position to remap
    multi_axis_positions: bool = False
    #: forward inputs `image_grids` reads
    grid_inputs: tuple[str, ...] = ()
    pixel_inputs: tuple[str, ...] = PIXEL_INPUTS
    per_position_inputs: tuple[str, ...] = PER_POSITION_INPUTS

    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The text decoder (the module holding `layers`)."""
        return model.get_decoder()

    def text_config(self, model: torch.nn.Module):
        """The config object the text decoder's attention modules read their implementation from."""
        return self.decoder(model).config

    def attention_modules(self, model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
        """`(layer index, self-attention module)` of every decoder layer."""
        return [(i, layer.self_attn) for i, layer in enumerate(self.decoder(model).layers)]

    def image_token_ids(self, model: torch.nn.Module) -> tuple[int, ...]:
        """Ids whose positions in `input_ids` are visual placeholders (image, and video where the family has it)."""
        return _config_ids(model.config, self.visual_token_attrs)

    def boundary_token_ids(self, model: torch.nn.Module) -> tuple[int, ...]:
        """Ids of the markers around an image."""
        return _config_ids(model.config, self.boundary_token_attrs)

    # ---- inputs ------------------------------------------------------------------------------------------------
    def is_vision_input(self, name: str) -> bool:
        """Whether the model input `name` carries the image itself (a no-image forward drops it)."""
        return name.startswith(_VISION_PREFIXES) or name in _VISION_NAMES

    # ---- image layout (the core's `Layout`) --------------------------------------------------------------------
    def fixed_grid(self, config: Any, method: str) -> Grid | None:
        """The grid of every image-token run, or None when it depends on the image (then `image_grids`).

        Raises:
            ConfigError: the family has no 2-D image-token grid.
        """
        raise ConfigError(f"{method}: no 2-D image-token grid is defined for the {self.name} family")

    def image_grids(self, config: Any, inputs: Mapping[str, Any], method: str) -> Iterator[list[Grid]]:
        """The grids of each image of a batch, in batch order (families whose `fixed_grid` is None)."""
        raise ConfigError(f"{method}: the {self.name} family has no per-image grids")

    def image_count(self, inputs: Mapping[str, Any], method: str) -> int:
        """Images (or crops) in the pixel inputs of a one-prompt batch."""
        return int(inputs["pixel_values"].shape[0])

    def pixel_view(self, config: Any, image_processor: Any, inputs: Mapping[str, Any], method: str) -> View:
        """The image the model saw for the one image of a one-prompt batch, and the grids covering it.

        Raises:
            InputError: several images or crops, or missing pixel inputs.
        """
        pixels = self._one_image(inputs, method)
        return View(to_image(pixels[0], image_processor), (Placed(self.fixed_grid(config, method)),))

    def _one_image(self, inputs: Mapping[str, Any], method: str) -> torch.Tensor:
        if inputs.get("pixel_values") is None:
            raise InputError(f"{method}: generate got no pixel_values; pass the processor's outputs (images) to "
                             "generate")
        count = self.image_count(inputs, method)
        if count != 1:
            raise InputError(f"{method}: the prompt has {count} images or crops; {method.upper()} refines one image per "
                             "prompt (crops, e.g. image splitting or pan-and-scan, are not mapped to a grid)")
        return inputs["pixel_values"]

    def sample_pixels(self, inputs: Mapping[str, Any], sample: int, batch: int, method: str) -> dict[str, Any]:
        """The pixel inputs of one prompt of a batch whose prompts hold one image each.

        Raises:
            InputError: the inputs do not hold one image per prompt.
        """
        key = self._per_image_input
        if inputs.get(key) is None or inputs[key].shape[0] != batch:
            raise InputError(f"{method}: a batch of {batch} prompts needs exactly one image per prompt")
        return {name: value[sample:sample + 1] for name, value in inputs.items()}

    #: the pixel input with one row per image
    _per_image_input = "pixel_values"

    def on_original(self, view: View, image_processor: Any, size: tuple[int, int]) -> tuple[Placed, ...]:
        """The grids of `view` re-expressed over the original image of `size` (height, width) that the processor
        turned into the view: here the view is the whole original."""
        return view.placed

    def vision_tower(self) -> VisionTower | None:
        """How the vision tower's attention and merge geometry are laid out; None where it is not described."""
        return None


def _config_ids(config, entries: tuple[str, ...]) -> tuple[int, ...]:
    ids = []
    for entry in entries:
        for attr in entry.split("|"):
            value = getattr(config, attr, None)
            if value is not None:
                ids.append(int(value))
                break
    return tuple(ids)


FAMILIES: Registry[FamilyAdapter] = Registry("family", error=UnsupportedFamilyError)


def register(adapter: FamilyAdapter) -> FamilyAdapter:
    """Register `adapter` under each of its model types."""
    for model_type in adapter.model_types:
        FAMILIES.register(model_type)(adapter)
    return adapter


def resolve(model: torch.nn.Module) -> FamilyAdapter:
    """The adapter of `model`, or `UnsupportedFamilyError` naming the class and listing the families."""
    return resolve_config(getattr(model, "config", None), type(model).__name__)


def resolve_config(config, owner: str) -> FamilyAdapter:
    """The adapter for a model config; `owner` names the model (class or id) in the error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedFamilyError(
            f"unsupported model family: {owner} (model_type={model_type!r}); "
            f"supported model types: {', '.join(FAMILIES.names())}"
        )
    return FAMILIES.get(model_type)
