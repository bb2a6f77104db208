"""The SigLIP-style vision encoders Idefics3/SmolVLM and Gemma3 share: where their attention modules are and the
queries and keys of one attention call (a helper of the family files)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def encoder_find(attr: str) -> Callable[[Any], tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """A finder of `(tower, attention modules)` for a tower at `model.model.<attr>`."""
    def find(model: Any) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        tower = getattr(model.model, attr)
        return tower, [layer.self_attn for layer in getattr(tower, "vision_model", tower).encoder.layers]
    return find


def qk(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[tuple]:
    """SigLIP-style attention (`q_proj`, `k_proj`, `scale`) on `(images, patches, dim)`: one `(q, k, scaling,
    mask)` for all images."""
    hidden = args[0] if args else kwargs["hidden_states"]
    n, length, _ = hidden.shape
    q = module.q_proj(hidden).view(n, length, -1, module.head_dim).transpose(1, 2)
    k = module.k_proj(hidden).view(n, length, -1, module.head_dim).transpose(1, 2)
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    return [(q, k, module.scale, mask)]
