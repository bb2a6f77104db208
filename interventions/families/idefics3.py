"""Idefics3 and SmolVLM: `<image>` runs of `image_seq_len` tokens per crop, between `<fake_token_around_image>`
and row/column or `<global-img>` markers (many runs per image).

Source: transformers 5.x `models/{idefics3,smolvlm}/modeling_*.py`; shared/specs/hf_integration.md §2.2.
"""

from .base import FamilyAdapter, register

IDEFICS3 = register(FamilyAdapter(
    name="idefics3",
    model_types=("idefics3", "smolvlm"),
    has_images=True,
    visual_token_attrs=("image_token_id",),
    boundary_tokens=("<fake_token_around_image>", "<global-img>"),
    source="transformers models/{idefics3,smolvlm}/modeling_*.py",
))
