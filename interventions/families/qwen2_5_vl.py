"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the Qwen2-VL token layout with a windowed vision tower.

Source: transformers 5.x `models/qwen2_5_vl/modeling_qwen2_5_vl.py`; shared/specs/hf_integration.md §2.2.
"""

from .base import FamilyAdapter, register

QWEN2_5_VL = register(FamilyAdapter(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    has_images=True,
    boundary_token_attrs=("vision_start_token_id", "vision_end_token_id"),
    visual_token_attrs=("image_token_id", "video_token_id"),
    source="transformers models/qwen2_5_vl/modeling_qwen2_5_vl.py",
))
