"""Gemma3 (`Gemma3ForConditionalGeneration`): 256 `<image_soft_token>` per image between BOI/EOI; image tokens
attend bidirectionally within their image (the mask arrives materialised); sliding-window layers.

The processor's `image_token_id` is the BOI id: the model config's `image_token_id` is the soft token.
Source: transformers 5.x `models/gemma3/modeling_gemma3.py`; shared/specs/hf_integration.md §2.2.
"""

from .base import FamilyAdapter, register

GEMMA3 = register(FamilyAdapter(
    name="gemma3",
    model_types=("gemma3",),
    has_images=True,
    boundary_token_attrs=("boi_token_id|boi_token_index", "eoi_token_id|eoi_token_index"),
    visual_token_attrs=("image_token_id|image_token_index",),
    source="transformers models/gemma3/modeling_gemma3.py",
))
