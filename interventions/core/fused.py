"""Fused attention that also returns each row's log-sum-exp, and the attention each key receives, without ever
materialising a `(rows, keys)` map.

With the row log-sum-exp `lse_i`, any probability is `exp(q_i·k_j·scale − lse_i)`, so an edit confined to a few key
columns is corrected in closed form from the fused output (`attention._edit_columns`). The attention a key receives,
`Σ_i exp(q_i·k_j·scale − lse_i)`, is the exponential of the log-sum-exp of a *transposed* attention whose queries
are the keys `[k_j, 1]` and whose keys are the scaled queries `[q_i·scale, −lse_i]`: one more fused call, whose
output is discarded. A mask that is `rank(k) <= rank(q)` for some ranks (CCA's concentric mask) runs as unmasked
calls in rank order (`ranked_attention`) instead of one dense masked call.

Kernels (`kernel_for`): on CPU the flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, float32 / float64 /
bfloat16), checked against the explicit path by the CPU suite; on CUDA the memory-efficient kernel
(`_scaled_dot_product_efficient_attention` with `compute_log_sumexp`, float32 / float16 / bfloat16), whose checks
are the tests marked `cuda` (`benchmarks/device_check.sh`): no session has had a GPU to run them yet, so on CUDA
this path is tested for dispatch only. Elsewhere (and float64 on CUDA) the core keeps its explicit blockwise rows and
dense masks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.integrations.sdpa_attention import repeat_kv

#: `kernel(query, key, value, is_causal, additive_mask_or_None, scale) -> (output (B, H, L, Dv), lse (B, H, L))`
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, "torch.Tensor | None", float],
                  tuple[torch.Tensor, torch.Tensor]]
_CPU_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CUDA_OP = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
#: logit given to query rows that must not count towards the attention keys receive (exp(−1e30) == 0)
_EXCLUDED = 1e30
#: the memory-efficient CUDA kernel wants head dims and bias rows 16-byte aligned: pad to this many elements
_CUDA_ALIGN = 8
_BIAS_ALIGN = 16


def _cpu_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool,
                mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _CPU_OP(query, key, value, 0.0, causal, attn_mask=mask, scale=scale)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """`x` with zero columns appended up to a multiple of `multiple` (zeros change no dot product)."""
    pad = -x.shape[-1] % multiple
    return x if pad == 0 else torch.nn.functional.pad(x, (0, pad))


def _cuda_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool,
                 mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory-efficient kernel in the CPU kernel's contract: head dims padded with zeros (the transposed call of
    `received_attention` has `d + 1`), the bias expanded to every head and stored with aligned rows (as SDPA itself
    pads it), the output cropped back, the log-sum-exp cut to the query length (the kernel pads it to 32)."""
    q_len, dv = query.shape[2], value.shape[-1]
    query, key, value = (_pad_last(x, _CUDA_ALIGN) for x in (query, key, value))
    bias = None
    if mask is not None:
        full = mask.to(query.dtype).expand(query.shape[0], query.shape[1], q_len, key.shape[2])
        bias = _pad_last(full, _BIAS_ALIGN)[..., : key.shape[2]]
    out, lse, _, _ = _CUDA_OP(query, key, value, bias, True, 0.0, causal, scale=scale)
    return out[..., :dv], lse[..., :q_len]


#: device type -> (kernel, dtypes it was written for); the op must exist in this PyTorch build
_KERNELS: dict[str, tuple[Kernel, tuple[torch.dtype, ...]]] = {
    **({"cpu": (_cpu_kernel, (torch.float32, torch.float64, torch.bfloat16))} if _CPU_OP is not None else {}),
    **({"cuda": (_cuda_kernel, (torch.float32, torch.float16, torch.bfloat16))} if _CUDA_OP is not None else {}),
}


def kernel_for(device_type: str, dtype: torch.dtype) -> Kernel | None:
    """The fused kernel with log-sum-exp for tensors of this device type and dtype, or None (explicit path)."""
    kernel, dtypes = _KERNELS.get(device_type, (None, ()))
    return kernel if dtype in dtypes else None


def available(query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """True when `attention_with_lse` and `received_attention` can run on these inputs."""
    if kernel_for(query.device.type, query.dtype) is None:
        return False
    return attention_mask is None or attention_mask.dtype in (torch.bool, query.dtype)


def _kernel(x: torch.Tensor) -> Kernel:
    kernel = kernel_for(x.device.type, x.dtype)
    if kernel is None:
        raise RuntimeError(f"no fused kernel for {x.device.type} {x.dtype}; check `fused.available` first")
    return kernel


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
    out, lse = _kernel(query)(query, key, value, causal, mask, scaling)
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
        _, total = _kernel(cols)(cols.flip(2), rows.flip(2), values, True, None, 1.0)
        return total.flip(2).exp()  # every key is seen by its own row; uncounted rows add exp(−1e30) = 0
    mask = allowed.transpose(-1, -2) & counted_rows[:, None, None, :]
    _, total = _kernel(cols)(cols, rows, values, False, _additive(mask, dtype), 1.0)
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
    rows, kernel = q[:, :, start:end], _kernel(q)
    if tied:
        return kernel(rows, k[:, :, :end], v[:, :, :end], False, None, scaling)[0]
    out, lse = kernel(rows, k[:, :, start:end], v[:, :, start:end], True, None, scaling)
    if start == 0:
        return out
    before, before_lse = kernel(rows, k[:, :, :start], v[:, :, :start], False, None, scaling)
    total = torch.logaddexp(lse, before_lse)
    dtype = total.dtype
    mixed = out.to(dtype) * torch.exp(lse - total)[..., None] + before.to(dtype) * torch.exp(before_lse - total)[..., None]
    return mixed.to(out.dtype)
