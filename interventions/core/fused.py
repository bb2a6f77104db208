"""Fused attention that also returns each row's log-sum-exp, and the attention each key receives, without ever
materialising a `(rows, keys)` map.

With the row log-sum-exp `lse_i`, any probability is `exp(q_i·k_j·scale − lse_i)`, so an edit confined to a few key
columns is corrected in closed form from the fused output (`attention._edit_columns`). The attention a key receives,
`Σ_i exp(q_i·k_j·scale − lse_i)`, is the exponential of the log-sum-exp of a *transposed* attention whose queries
are the keys `[k_j, 1]` and whose keys are the scaled queries `[q_i·scale, −lse_i]`: one more fused call, whose
output is discarded. A mask that is `rank(k) <= rank(q)` for some ranks (CCA's concentric mask) runs as unmasked
calls in rank order (`ranked_attention`) instead of one dense masked call.

Available where PyTorch exposes a fused kernel returning the log-sum-exp and this module was checked against it: the
CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, float32/float64/bfloat16). Elsewhere (CUDA
included, untested for lack of a GPU) the core keeps its explicit blockwise rows and dense masks.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import repeat_kv

_CPU_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
#: logit given to query rows that must not count towards the attention keys receive (exp(−1e30) == 0)
_EXCLUDED = 1e30


def available(query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """True when `attention_with_lse` and `received_attention` can run on these inputs."""
    if _CPU_KERNEL is None or query.device.type != "cpu" or query.dtype not in _DTYPES:
        return False
    return attention_mask is None or attention_mask.dtype in (torch.bool, query.dtype)


def _additive(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if attention_mask.dtype != torch.bool:
        return attention_mask
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(attention_mask, zero, torch.full((), float("-inf"), dtype=dtype, device=attention_mask.device))


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(output, lse)`: the output in the layout `sdpa_attention_forward` returns, `(batch, q_len, heads, head_dim)`,
    and the float32 (float64 for float64 inputs) row log-sum-exp, `(batch, heads, q_len)`.

    Same kernel and arguments as transformers' SDPA call at prefill on CPU (keys and values repeated per query head,
    `is_causal` without a mask, a bool mask as an additive −inf one), so the output is SDPA's bit for bit.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len = query.shape[2]
    causal = attention_mask is None and q_len > 1
    mask = None if attention_mask is None else _additive(attention_mask[..., :key.shape[2]], query.dtype)
    if causal and key.shape[2] > q_len:  # prefill into an empty static cache: as transformers, drop the unused tail
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out, lse = _CPU_KERNEL(query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), lse


def received_attention(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, heads: torch.Tensor,
                       scaling: float, allowed: torch.Tensor | None, counted_rows: torch.Tensor) -> torch.Tensor:
    """Attention each key receives, summed over the counted query rows: `(batch, len(heads), kv_len)`.

    Args:
        query, key: the layer's `(batch, heads, q_len, d)` queries and `(batch, kv_heads, kv_len, d)` keys.
        lse: `(batch, heads, q_len)` row log-sum-exp of the same attention (`attention_with_lse`).
        heads: query heads to sum for.
        allowed: `(batch, 1, q_len, kv_len)` keys each row may see; None: the plain causal pattern, `q_len == kv_len`.
        counted_rows: `(batch, q_len)` bool, the rows that count (e.g. valid, non-padding rows).
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    groups = query.shape[1] // key.shape[1]
    shift = -lse[:, heads].to(dtype).masked_fill(~counted_rows[:, None, :], -_EXCLUDED)[..., None]
    # transposed attention: the keys ask, the scaled queries answer, and each answer carries its row's −lse
    rows = torch.cat([query[:, heads].to(dtype) * scaling, shift], -1)
    cols = key[:, torch.div(heads, groups, rounding_mode="floor")].to(dtype)
    cols = torch.cat([cols, torch.ones(*cols.shape[:3], 1, dtype=dtype, device=cols.device)], -1)
    values = torch.zeros_like(rows)  # the kernel wants values; only the log-sum-exp is read
    if allowed is None:  # key j is seen by rows i >= j: reversing both sequences makes that the kernel's causal pattern
        _, total = _CPU_KERNEL(cols.flip(2), rows.flip(2), values, 0.0, True, scale=1.0)
        return total.flip(2).exp()  # every key is seen by its own row; uncounted rows add exp(−1e30) = 0
    mask = allowed.transpose(-1, -2) & counted_rows[:, None, None, :]
    _, total = _CPU_KERNEL(cols, rows, values, 0.0, False, attn_mask=_additive(mask, dtype), scale=1.0)
    return total.exp().masked_fill(~mask.any(-1), 0)  # a key no counted row sees: the kernel reports lse 0 there


def ranked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rank: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """Attention under the mask `rank(k) <= rank(q)` (ties see each other), in `sdpa_attention_forward`'s output
    layout `(batch, q_len, heads, head_dim)`, from unmasked fused calls instead of one dense masked call.

    Sorted by rank (stably), each row sees every key up to the end of its tie group. So a tie group's rows attend,
    unmasked, to the keys before the group's end; a run of untied rows attends causally within the run and, unmasked,
    to every key before it (the two partial softmaxes merged exactly through their log-sum-exps). The calls cover
    only allowed pairs, so the cost is that of SDPA's causal kernel plus a few calls per tie group.

    Args:
        query, key, value: a prefill's `(batch, heads, L, d)` queries and `(batch, kv_heads, L, d)` keys and values.
        rank (`torch.LongTensor` of shape `(batch, L)`): each token's rank.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
    for b in range(query.shape[0]):
        ranks, order = torch.sort(rank[b], stable=True)
        q, k, v = (x[b : b + 1].index_select(2, order) for x in (query, key, value))
        for start, end, tied in _segments(ranks):
            part = _segment(q, k, v, start, end, tied, scaling)  # (1, heads, rows, d) of sorted rows start..end
            out[b].index_copy_(0, order[start:end], part[0].transpose(0, 1))
    return out


def _segments(ranks: torch.Tensor) -> list[tuple[int, int, bool]]:
    """`(start, end, tied)` of sorted ranks: each tie group, and each maximal run of untied rows."""
    bounds = (torch.nonzero(ranks[1:] != ranks[:-1]).squeeze(1) + 1).tolist()
    groups = zip([0, *bounds], [*bounds, len(ranks)])
    segments: list[tuple[int, int, bool]] = []
    for start, end in groups:
        tied = end - start > 1
        if not tied and segments and not segments[-1][2]:
            segments[-1] = (segments[-1][0], end, False)
        else:
            segments.append((start, end, tied))
    return segments


def _segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, end: int, tied: bool,
             scaling: float) -> torch.Tensor:
    """Output `(1, heads, end - start, d)` of the sorted rows `[start, end)` (see `ranked_attention`)."""
    rows = q[:, :, start:end]
    if tied:
        return _CPU_KERNEL(rows, k[:, :, :end], v[:, :, :end], 0.0, False, scale=scaling)[0]
    out, lse = _CPU_KERNEL(rows, k[:, :, start:end], v[:, :, start:end], 0.0, True, scale=scaling)
    if start == 0:
        return out
    before, before_lse = _CPU_KERNEL(rows, k[:, :, :start], v[:, :, :start], 0.0, False, scale=scaling)
    total = torch.logaddexp(lse, before_lse)
    dtype = total.dtype
    mixed = out.to(dtype) * torch.exp(lse - total)[..., None] + before.to(dtype) * torch.exp(before_lse - total)[..., None]
    return mixed.to(out.dtype)
