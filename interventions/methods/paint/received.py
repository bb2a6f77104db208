"""Token scores for PAINT's selection from vision towers without a CLS token (a project extension; the paper and its
code define the selection for CLIP's CLS row only, shared/specs/head_perturbation.md §5.1).

Without a CLS query, a patch's score is the attention it *receives*: summed over heads, averaged over the query
patches of its attention call (the image, or for Qwen2.5-VL's windowed layers the window) — the spec's "spatial"
column-mass score. Local scores come from the first ViT layer, summary scores from the layer the features are taken
from (the last one in these towers). Patch scores are summed onto the LLM tokens each feature token merges, with the
model's own merge geometry, which each family adapter gives (`VisionTower.units`: Qwen2-VL / 2.5-VL
`spatial_merge_size²` consecutive patches, 2.5 then un-permuted from window order; Idefics3 / SmolVLM the connector's
pixel shuffle; Gemma3 the projector's average pooling). The rule then runs per selection unit (a Qwen image, an
Idefics3 crop, a Gemma3 image) on token scores.

Queries and keys are recomputed from each hooked attention module's input (`VisionTower.qk`; the tower keeps its
own kernel).
"""

from __future__ import annotations

import torch

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
