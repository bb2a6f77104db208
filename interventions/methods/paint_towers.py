"""Token scores for PAINT's selection from vision towers without a CLS token (a project extension; the paper and its
code define the selection for CLIP's CLS row only, shared/specs/head_perturbation.md §5.1).

Without a CLS query, a patch's score is the attention it *receives*: summed over heads, averaged over the query
patches of its attention call (the image, or for Qwen2.5-VL's windowed layers the window) — the spec's "spatial"
column-mass score. Local scores come from the first ViT layer, summary scores from the layer the features are taken
from (the last one in these towers). Patch scores are summed onto the LLM tokens each feature token merges, with the
model's own merge geometry: Qwen2-VL / 2.5-VL `spatial_merge_size²` consecutive patches (2.5: then un-permuted from
window order), Idefics3 / SmolVLM the connector's pixel shuffle, Gemma3 the projector's average pooling. The rule
then runs per selection unit (a Qwen image, an Idefics3 crop, a Gemma3 image) on token scores.

Queries and keys are recomputed from each hooked attention module's input (the tower keeps its own kernel).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, InputError

#: query rows per block when scoring: bounds the (heads, rows, keys) temporaries of a large image
_ROW_BLOCK = 1024


def column_scores(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention each key receives, summed over heads and averaged over the query rows: `(n, keys)`.

    Args:
        q, k (`torch.Tensor` of shape `(n, heads, length, head_dim)`): queries and keys of `n` attention calls of
            one length (images or crops).
        scaling (`float`): the module's softmax scaling.
        mask (`torch.Tensor`, *optional*): the module's mask, boolean (True = attend) or additive, broadcastable
            to `(n, heads, length, length)`.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    total = q.new_zeros(q.shape[0], k.shape[2], dtype=dtype)
    keys = k.to(dtype).transpose(-1, -2)
    for start in range(0, q.shape[2], _ROW_BLOCK):
        z = torch.matmul(q[:, :, start:start + _ROW_BLOCK].to(dtype), keys) * scaling
        if mask is not None:
            part = mask[..., start:start + _ROW_BLOCK, :] if mask.shape[-2] > 1 else mask
            z = z.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else z + part.to(dtype)
        total += z.softmax(-1).sum((1, 2))
    return total / q.shape[2]


def _siglip_scores(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """SigLIP-style attention (`q_proj`, `k_proj`, `scale`) on `(images, patches, dim)`: `(images, patches)`."""
    hidden = args[0] if args else kwargs["hidden_states"]
    n, length, _ = hidden.shape
    q = module.q_proj(hidden).view(n, length, -1, module.head_dim).transpose(1, 2)
    k = module.k_proj(hidden).view(n, length, -1, module.head_dim).transpose(1, 2)
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    return column_scores(q, k, module.scale, mask)


def _qwen_scores(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Qwen2-VL / 2.5-VL vision attention (fused `qkv`, 2-D RoPE, one call per `cu_seqlens` chunk) on the packed
    `(patches, dim)` sequence: `(patches,)` in the order the tower holds them."""
    hidden = args[0] if args else kwargs["hidden_states"]
    length = hidden.shape[0]
    q, k, _ = module.qkv(hidden).reshape(length, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = kwargs["position_embeddings"]
    rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
    q, k = rotate(q, k, cos, sin)
    bounds = kwargs["cu_seqlens"].tolist()
    return torch.cat([column_scores(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], module.scaling)[0]
                      for a, b in itertools.pairwise(bounds)])


@dataclass(frozen=True)
class Tower:
    """Where a CLS-less tower's attention modules are and how its patch scores become per-unit token scores."""

    find: Callable[[Any], tuple[torch.nn.Module, list[torch.nn.Module]]]  # model -> (tower, attention modules)
    scores: Callable[[torch.nn.Module, tuple, dict], torch.Tensor]  # one attention call -> patch scores
    #: (model, patch scores of one tower pass, the tower's inputs) -> token scores of each selection unit
    units: Callable[[Any, torch.Tensor, dict], list[torch.Tensor]]


def _qwen_find(model: Any) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    tower = model.model.visual
    return tower, [block.attn for block in tower.blocks]


def _encoder_find(attr: str) -> Callable[[Any], tuple[torch.nn.Module, list[torch.nn.Module]]]:
    def find(model: Any) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        tower = getattr(model.model, attr)
        return tower, [layer.self_attn for layer in getattr(tower, "vision_model", tower).encoder.layers]
    return find


def _qwen_units(model: Any, scores: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
    tower = model.model.visual
    grid = inputs.get("grid_thw")
    if grid is None:
        raise InputError("paint: the Qwen vision tower was called without grid_thw")
    unit = tower.spatial_merge_size ** 2
    tokens = scores.view(-1, unit).sum(-1)
    if hasattr(tower, "fullatt_block_indexes"):  # Qwen2.5-VL holds the merge units in window order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, spatial_merge_size=tower.spatial_merge_size,
                                                  window_size=tower.window_size, patch_size=tower.patch_size)
        tokens = tokens[torch.argsort(window_index.to(tokens.device))]
    counts = (grid.prod(-1) // unit).tolist()
    return list(tokens.split(counts))


def _idefics3_units(model: Any, scores: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
    connector = model.model.connector
    shuffled = connector.pixel_shuffle(scores[..., None], connector.scale_factor)  # (crops, tokens, s²)
    return list(shuffled.sum(-1))


def _gemma3_units(model: Any, scores: torch.Tensor, inputs: dict) -> list[torch.Tensor]:
    projector = model.model.multi_modal_projector
    side = projector.patches_per_image
    pooled = projector.avg_pool(scores.view(-1, 1, side, side))  # a mean of kernel² patches: the same ranking
    return list(pooled.flatten(1))


#: family -> its CLS-less tower
TOWERS: dict[str, Tower] = {
    "qwen2_vl": Tower(_qwen_find, _qwen_scores, _qwen_units),
    "qwen2_5_vl": Tower(_qwen_find, _qwen_scores, _qwen_units),
    "idefics3": Tower(_encoder_find("vision_model"), _siglip_scores, _idefics3_units),  # and SmolVLM
    "gemma3": Tower(_encoder_find("vision_tower"), _siglip_scores, _gemma3_units),
}


def tower_for(family: str) -> Tower:
    """The CLS-less tower description of `family`.

    Raises:
        ConfigError: no description for this family.
    """
    if family not in TOWERS:
        raise ConfigError(f"paint: no token selection is defined for the {family} vision tower; supported: llava, "
                          f"llava_next (CLIP CLS row) and {', '.join(TOWERS)} (received attention)")
    return TOWERS[family]
