"""Contrastive guidance of two next-token distributions, shared by head-perturbation guidance (`pag`) and PAI's
text-only contrast (`pai use_cfg`)."""

from __future__ import annotations

import math

import torch


def guidance(main: torch.Tensor, other: torch.Tensor, weight: float, cutoff: float) -> torch.Tensor:
    """Contrast two next-token distributions in log-probability space, with the adaptive plausibility cutoff.

    `log p + weight·(log p − log q)`, and −inf on tokens with `log p < log(cutoff) + max log p` (none for
    `cutoff = 0`). Used by head-perturbation guidance (`weight = w`) and PAI's text-only contrast (`weight = γ−1`).

    Args:
        main (`torch.Tensor` of shape `(..., vocab)`): logits of the main stream (p).
        other (`torch.Tensor` of shape `(..., vocab)`): logits of the contrasted stream (q).
        weight (`float`): contrast weight.
        cutoff (`float`): plausibility cutoff in [0, 1).

    Returns:
        `torch.Tensor`: the guided scores, in float32 or wider.
    """
    dtype = torch.promote_types(main.dtype, torch.float32)
    log_p = torch.log_softmax(main.to(dtype), -1)
    out = torch.lerp(log_p, torch.log_softmax(other.to(dtype), -1), -weight)  # log p + w·(log p − log q)
    if cutoff > 0:
        drop = log_p < log_p.amax(-1, keepdim=True) + math.log(cutoff)
    else:
        drop = log_p == float("-inf")  # keeps −inf (and no NaN) where p already excluded a token
    return out.masked_fill_(drop, float("-inf"))
