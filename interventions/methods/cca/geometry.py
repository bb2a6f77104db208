"""CCA geometry (shared/specs/cca.md §3–4), per sample: ring indices on 2-D image grids, concentric position ids
and the concentric causal mask. Pure tensor functions; which grid an image has is the family adapter's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.geometry import Grid


@dataclass(frozen=True)
class Rings:
    """CCA layout of a prompt batch, each tensor `(batch, prompt_len)`.

    Attributes:
        ring (`torch.LongTensor`): ring index of image tokens, -1 elsewhere.
        segment (`torch.LongTensor`): which grid of its sample an image token belongs to, -1 elsewhere.
        step (`torch.LongTensor`): how far the position counter advances after the token: 1 per valid text token,
            0 inside a grid except on its last token, which advances by the grid's number of rings.
    """

    ring: torch.Tensor
    segment: torch.Tensor
    step: torch.Tensor


def build_layout(valid: torch.Tensor, placed: list[list[tuple[int, Grid]]]) -> Rings:
    """Layout of a prompt batch.

    Args:
        valid (`torch.BoolTensor` of shape `(batch, prompt_len)`): non-padding prompt positions.
        placed (`list[list[tuple[int, Grid]]]`): per sample, `(first index, grid)` of each image grid.
    """
    ring = torch.full(valid.shape, -1, dtype=torch.long)
    segment = torch.full(valid.shape, -1, dtype=torch.long)
    step = valid.long().cpu()
    for b, grids in enumerate(placed):
        for index, (start, grid) in enumerate(grids):
            end = start + grid.length
            ring[b, start:end] = grid.rings()
            segment[b, start:end] = index
            step[b, start:end] = 0
            step[b, end - 1] = grid.num_rings
    return Rings(ring.to(valid.device), segment.to(valid.device), step.to(valid.device))


def concentric_positions(layout: Rings, valid: torch.Tensor) -> torch.Tensor:
    """Position ids `(batch, length)` of a sequence whose first `prompt_len` positions `layout` describes; later
    positions are generated text. Each token sits at the counter before it, image tokens plus their ring: text
    before an image keeps its standard id, a grid occupies `[s, s + num_rings)`, and the text after it is shifted
    by `length - num_rings` (564 for LLaVA-1.5); generated tokens continue at `last + 1`.

    Args:
        valid (`torch.BoolTensor` of shape `(batch, length)`): non-padding positions, `length >= prompt_len`.
    """
    extra = valid.shape[1] - layout.step.shape[1]
    step = torch.cat([layout.step, valid[:, layout.step.shape[1]:].long()], 1)
    ring = torch.cat([layout.ring.clamp_min(0), layout.ring.new_zeros(valid.shape[0], extra)], 1)
    return step.cumsum(1) - step + ring


def concentric_allowed(layout: Rings, allowed: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor | None:
    """The concentric causal mask: within each image grid, query q may attend to key k iff `ring(k) <= ring(q)`
    (bidirectional within a ring, outer rings visible from inner ones, the centre sees the whole grid); every
    other pair keeps `allowed` (causal, padding, sliding window).

    Args:
        allowed (`torch.BoolTensor` of shape `(batch, 1, q_len, kv_len)`): the model's mask of this call.
        query_positions (`torch.LongTensor` of shape `(q_len,)`): absolute positions of the query rows.

    Returns:
        The edited mask, or None when no query row is an image token (decode steps).
    """
    prompt_len, kv_len = layout.ring.shape[1], allowed.shape[-1]
    inside = query_positions < prompt_len
    rows = query_positions.clamp_max(prompt_len - 1)
    ring_q = torch.where(inside, layout.ring[:, rows], -1)
    if not bool((ring_q >= 0).any()):
        return None
    seg_q = torch.where(inside, layout.segment[:, rows], -1)
    ring_k, seg_k = _fit(layout.ring, kv_len), _fit(layout.segment, kv_len)
    same = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q[:, :, None] >= 0)
    rule = ring_k[:, None, :] <= ring_q[:, :, None]
    return torch.where(same[:, None], rule[:, None], allowed)


def concentric_ranks(layout: Rings, kv_len: int) -> torch.Tensor | None:
    """Ranks `(batch, kv_len)` with which the concentric mask on a causal prefill is `rank(k) <= rank(q)`: a text
    token's index, an image token's grid start plus its ring (a grid fits in `[start, start + rings)`, below the
    text after it); None when no token is an image token."""
    ring, segment = _fit(layout.ring, kv_len), _fit(layout.segment, kv_len)
    if not bool((ring >= 0).any()):
        return None
    index = torch.arange(kv_len, device=ring.device).expand_as(ring)
    starts = (segment >= 0) & (segment != torch.nn.functional.pad(segment, (1, 0), value=-1)[:, :-1])
    start = torch.where(starts, index, 0).cummax(1).values
    return torch.where(ring >= 0, start + ring, index)


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    """`x` cut or padded with -1 (not an image token) to `length` columns (keys beyond the prompt, static caches)."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.cat([x, x.new_full((x.shape[0], length - x.shape[1]), -1)], 1)
