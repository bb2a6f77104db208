"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres base + grid + newline tokens, all `<image>` ids.

Source: transformers 5.x `models/llava_next/modeling_llava_next.py`; shared/specs/hf_integration.md §2.2.
"""

from .base import FamilyAdapter, register

LLAVA_NEXT = register(FamilyAdapter(
    name="llava_next",
    model_types=("llava_next",),
    has_images=True,
    visual_token_attrs=("image_token_id|image_token_index",),
    source="transformers models/llava_next/modeling_llava_next.py",
))
