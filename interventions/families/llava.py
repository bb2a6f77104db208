"""LLaVA-1.5 (`LlavaForConditionalGeneration`): 576 `<image>` tokens per image, expanded by the processor.

Source: transformers 5.x `models/llava/modeling_llava.py`; shared/specs/hf_integration.md §2.2.
"""

from .base import FamilyAdapter, register

LLAVA = register(FamilyAdapter(
    name="llava",
    model_types=("llava",),
    has_images=True,
    visual_token_attrs=("image_token_id|image_token_index",),
    source="transformers models/llava/modeling_llava.py",
))
