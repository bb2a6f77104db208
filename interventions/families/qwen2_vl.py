"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): `<|image_pad|>` / `<|video_pad|>` runs between vision
start/end tokens; M-RoPE position ids are computed by the model.

Source: transformers 5.x `models/qwen2_vl/modeling_qwen2_vl.py`; shared/specs/hf_integration.md §2.2.
"""

from .base import FamilyAdapter, register

QWEN2_VL = register(FamilyAdapter(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    has_images=True,
    boundary_token_attrs=("vision_start_token_id", "vision_end_token_id"),
    visual_token_attrs=("image_token_id", "video_token_id"),
    source="transformers models/qwen2_vl/modeling_qwen2_vl.py",
))
