"""Family adapters, one file per family; importing this package registers them all."""

from . import causal_lm, gemma3, idefics3, llava, llava_next, qwen2_5_vl, qwen2_vl  # noqa: F401
from .base import FAMILIES, FamilyAdapter, resolve, resolve_config

__all__ = ["FAMILIES", "FamilyAdapter", "resolve", "resolve_config"]
