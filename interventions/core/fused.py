"""Fused attention that also returns each row's log-sum-exp, and the attention each key receives, without ever
materialising a `(rows, keys)` map.

With the row log-sum-exp `lse_i`, any probability is `exp(q_i·k_j·scale − lse_i)`, so an edit confined to a few key
columns is corrected in closed form from the fused output (`attention._edit_columns`). The attention a key receives,
`Σ_i exp(q_i·k_j·scale − lse_i)`, is the exponential of the log-sum-exp of a *transposed* attention whose queries
are the keys `[k_j, 1]` and whose keys are the scaled queries `[q_i·scale, −lse_i]`: one more fused call, whose
output is discarded.

Available where PyTorch exposes a fused kernel returning the log-sum-exp and this module was checked against it: the
CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, float32/float64/bfloat16). Elsewhere (CUDA
included, untested for lack of a GPU) the core keeps its explicit blockwise path.
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
                       scaling: float, allowed: torch.Tensor, causal: bool, counted_rows: torch.Tensor) -> torch.Tensor:
    """Attention each key receives, summed over the counted query rows: `(batch, len(heads), kv_len)`.

    Args:
        query, key: the layer's `(batch, heads, q_len, d)` queries and `(batch, kv_heads, kv_len, d)` keys.
        lse: `(batch, heads, q_len)` row log-sum-exp of the same attention (`attention_with_lse`).
        heads: query heads to sum for.
        allowed: `(batch, 1, q_len, kv_len)` keys each row may see (used when not `causal`).
        causal: the plain causal pattern with `q_len == kv_len` (then `allowed` is not read).
        counted_rows: `(batch, q_len)` bool, the rows that count (e.g. valid, non-padding rows).
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    batch = query.shape[0]
    groups = query.shape[1] // key.shape[1]
    shift = -lse[:, heads].to(dtype).masked_fill(~counted_rows[:, None, :], -_EXCLUDED)[..., None]
    # transposed attention: the keys ask, the scaled queries answer, and each answer carries its row's −lse
    rows = torch.cat([query[:, heads].to(dtype) * scaling, shift], -1)
    cols = key[:, torch.div(heads, groups, rounding_mode="floor")].to(dtype)
    cols = torch.cat([cols, torch.ones(*cols.shape[:3], 1, dtype=dtype, device=cols.device)], -1)
    values = torch.zeros_like(rows)  # the kernel wants values; only the log-sum-exp is read
    if causal:  # key j is seen by rows i >= j: reversing both sequences makes that the kernel's causal pattern
        _, total = _CPU_KERNEL(cols.flip(2), rows.flip(2), values, 0.0, True, scale=1.0)
        total = total.flip(2)
        seen = torch.ones(batch, 1, cols.shape[2], dtype=torch.bool, device=query.device)
    else:
        mask = allowed.transpose(-1, -2) & counted_rows[:, None, None, :]
        _, total = _CPU_KERNEL(cols, rows, values, 0.0, False, attn_mask=_additive(mask, dtype), scale=1.0)
        seen = mask.any(-1)  # a key no counted row sees receives 0 (the kernel reports log-sum-exp 0 there)
    return total.exp().masked_fill(~seen, 0)


def ranked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rank: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """Attention under the mask `rank(k) <= rank(q)` (ties see each other), in `sdpa_attention_forward`'s output
    layout `(batch, q_len, heads, head_dim)`, from causal fused kernels instead of one dense masked call.

    Sorted by rank (stably), the mask is causal plus, inside each group of equal rank, the later members. So: one
    causal call on the sorted sequence, one small masked call over the tie groups (padded to the largest), and the
    two partial softmaxes merged exactly through their log-sum-exps.

    Args:
        query, key, value: a prefill's `(batch, heads, L, d)` queries and `(batch, kv_heads, L, d)` keys and values.
        rank (`torch.LongTensor` of shape `(batch, L)`): each token's rank.
    """
    heads = query.shape[1]
    groups = heads // key.shape[1]
    order = torch.sort(rank, dim=1, stable=True).indices

    def by_order(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))

    q, k, v = (by_order(x, order) for x in (query, repeat_kv(key, groups), repeat_kv(value, groups)))
    out, lse = _CPU_KERNEL(q, k, v, 0.0, True, scale=scaling)
    ranks = rank.gather(1, order)
    same_as_previous = torch.nn.functional.pad(ranks[:, 1:] == ranks[:, :-1], (1, 0))
    tied = same_as_previous | torch.nn.functional.pad(same_as_previous[:, 1:], (0, 1))
    if bool(tied.any()):
        out, lse = _merge_ties(q, k, v, out, lse, tied, same_as_previous, scaling)
    merged = torch.empty_like(out).scatter_(2, order[:, None, :, None].expand_as(out), out)
    return merged.transpose(1, 2).contiguous()


def _merge_ties(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                tied: torch.Tensor, same_as_previous: torch.Tensor,
                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add to the causal result `(out, lse)` of rank-sorted rows the later members of each row's tie group."""
    batch, heads, length, dim = q.shape
    positions = torch.arange(length, device=q.device).expand(batch, length)
    starts = (tied & ~same_as_previous)  # first member of each tie group
    group = (starts.cumsum(1) - 1).clamp_min(0)  # tie group of each tied row, counted per sample
    first = torch.where(starts, positions, 0).cummax(1).values
    slot = positions - first
    num_groups, size = int(starts.sum(1).max()), int(torch.where(tied, slot, 0).max()) + 1
    cell = torch.where(tied, group * size + slot, num_groups * size)  # untied rows go to one spare cell
    index = torch.full((batch, num_groups * size + 1), length, dtype=torch.long, device=q.device)
    index.scatter_(1, cell, positions)
    index = index[:, :-1]
    member = index < length  # (batch, groups·size)

    def packed(x: torch.Tensor) -> torch.Tensor:  # (batch·groups, heads, size, d)
        x = torch.nn.functional.pad(x, (0, 0, 0, 1))  # index `length` reads a zero row
        x = x.gather(2, index[:, None, :, None].expand(-1, heads, -1, dim))
        return x.view(batch, heads, num_groups, size, dim).transpose(1, 2).reshape(-1, heads, size, dim)

    member = member.view(batch * num_groups, 1, size)
    later = torch.ones(size, size, dtype=torch.bool, device=q.device).triu(1)
    allowed = later & member[..., None] & member[..., None, :]  # (batch·groups, 1, size, size)
    extra, extra_lse = _CPU_KERNEL(packed(q), packed(k), packed(v), 0.0, False,
                                   attn_mask=_additive(allowed, q.dtype), scale=scaling)
    extra_lse = extra_lse.masked_fill(~allowed.any(-1), float("-inf"))  # no later member: nothing to add
    # back to the sorted rows; the rows of no tie group keep the causal result exactly (weight 0 on the extra part)
    extra = extra.view(batch, num_groups, heads, size, dim).transpose(1, 2).reshape(batch, heads, -1, dim)
    extra_lse = extra_lse.view(batch, num_groups, heads, size).transpose(1, 2).reshape(batch, heads, -1)
    take = torch.where(tied, group * size + slot, 0)
    extra = extra.gather(2, take[:, None, :, None].expand(-1, heads, -1, dim))
    extra_lse = extra_lse.gather(2, take[:, None, :].expand(-1, heads, -1)).masked_fill(~tied[:, None], float("-inf"))
    dtype = torch.promote_types(q.dtype, torch.float32)
    total = torch.logaddexp(lse.to(dtype), extra_lse.to(dtype))
    mixed = (out.to(dtype) * torch.exp(lse - total)[..., None] + extra.to(dtype) * torch.exp(extra_lse - total)[..., None])
    return mixed.to(out.dtype), total
