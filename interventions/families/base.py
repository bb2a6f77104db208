"""Family adapters: where a model family keeps its text decoder, attention modules and image tokens.

An adapter is mostly data (`model_types`, whether it has images, the config attributes naming the visual token
ids); code covers only what a table cannot say. Families are keyed by `config.model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedFamilyError
from ..registry import Registry


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
        boundary_tokens (`tuple[str, ...]`): marker tokens around an image that the config does not name, read from
            the tokenizer given to `Handle.set_template` (Idefics3/SmolVLM's `<fake_token_around_image>`).
        source (`str`): where the layout facts come from.
    """

    name: str
    model_types: tuple[str, ...]
    has_images: bool
    visual_token_attrs: tuple[str, ...] = ()
    boundary_token_attrs: tuple[str, ...] = ()
    boundary_tokens: tuple[str, ...] = ()
    source: str = ""

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
        return self.config_boundary_ids(model.config)

    def config_boundary_ids(self, config) -> tuple[int, ...]:
        """Ids of the markers around an image that `config` names (those of `boundary_tokens` need a tokenizer)."""
        return _config_ids(config, self.boundary_token_attrs)


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
