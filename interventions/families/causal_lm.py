"""Llama-style text-only decoders: Llama (SmolLM2 included), Qwen2, Mistral.

Source: transformers 5.x `models/{llama,qwen2,mistral}/modeling_*.py` (`model.model.layers[i].self_attn`).
"""

from .base import FamilyAdapter, register

CAUSAL_LM = register(FamilyAdapter(
    name="causal_lm",
    model_types=("llama", "qwen2", "mistral"),
    has_images=False,
    source="transformers models/{llama,qwen2,mistral}/modeling_*.py",
))
