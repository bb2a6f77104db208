"""Explicit attention for the few query rows and heads a method edits.

Everything else of the layer stays on the model's own backend (SDPA): only the requested rows are materialised,
and edits are additive pre-softmax biases, which covers post-softmax rescaling exactly (see the method specs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass
class RowLogits:
    """Logits of the requested rows and heads of one attention call, which methods edit in stack order.

    Attributes:
        logits (`torch.Tensor` of shape `(batch, heads, rows, kv_len)`): scaled `q·kᵀ` (plus any additive model
            mask), computed in float32 or wider, with every earlier method's bias added. Finite everywhere.
        allowed (`torch.BoolTensor` of shape `(batch, 1, rows, kv_len)`): keys each row may attend to.
        heads (`torch.LongTensor` of shape `(heads,)`): query-head indices of dimension 1.
        rows (`torch.LongTensor` of shape `(rows,)`): absolute positions of the rows.
        columns (`torch.LongTensor` of shape `(keys,)`, *optional*): the key columns of the last dimension when
            the view holds only some of them (`RowRequest.columns`); `None`: every key, `keys == kv_len`.
        lse (`torch.Tensor` of shape `(batch, heads, rows, 1)`, *optional*): with `columns`, each row's
            log-sum-exp over all its keys before any edit, so that `probs()` are the columns' true probabilities.
    """

    logits: torch.Tensor
    allowed: torch.Tensor
    heads: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    _probs: torch.Tensor | None = field(default=None, repr=False)

    def add_bias(self, bias: torch.Tensor) -> None:
        """Add a pre-softmax bias broadcastable to `logits`. Masked keys stay masked whatever the bias."""
        self.logits = self.logits + bias
        self._probs = None

    def probs(self) -> torch.Tensor:
        """Current attention probabilities, `(batch, heads, rows, keys)`; masked keys are exactly 0. For a view of
        some columns: `exp(logits − lse)`, each column's probability in the row before the others are renormalised
        around this view's biases."""
        if self._probs is None:
            if self.lse is None:
                self._probs = masked_softmax(self.logits, self.allowed)
            else:
                self._probs = torch.exp(self.logits - self.lse).masked_fill(~self.allowed, 0)
        return self._probs


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over keys with disallowed keys at exactly 0 (rows with no allowed key give 0, not NaN)."""
    # one fused softmax; a row without an allowed key is all -inf there and comes out NaN, set to 0
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    # in place only without autograd: the softmax's backward needs its output unchanged
    return probs.nan_to_num(0.0) if probs.requires_grad else probs.nan_to_num_(0.0)


def allowed_keys(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn the mask the model passed to its attention function into `(allowed, additive)`.

    `None` means a plain causal mask aligned bottom-right (SDPA's `is_causal` skip). A bool mask is used as is;
    a float (eager) mask marks its minimum as disallowed and is also returned as an additive term.
    """
    if attention_mask is None:
        causal = (_cached_causal if q_len * kv_len <= _CACHED_CAUSAL else _causal)(q_len, kv_len, device)
        return causal.expand(batch, 1, q_len, kv_len), None
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return mask.expand(batch, 1, q_len, kv_len), None
    allowed = mask > torch.finfo(mask.dtype).min / 2
    return allowed.expand(batch, 1, q_len, kv_len), mask


#: causal masks up to this many entries (decode steps) are built once per shape and shared by every layer
_CACHED_CAUSAL = 1 << 16


def causal_columns(q_len: int, kv_len: int, columns: torch.Tensor) -> torch.Tensor:
    """`(1, 1, q_len, len(columns))` bool: the bottom-right aligned causal mask at some key columns only."""
    q = torch.arange(q_len, device=columns.device)[:, None] + (kv_len - q_len)
    return (columns[None, :] <= q).view(1, 1, q_len, len(columns))


def _causal(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """`(1, 1, q_len, kv_len)` bool: the bottom-right aligned causal mask (never written by its users)."""
    return causal_columns(q_len, kv_len, torch.arange(kv_len, device=device))


_cached_causal = functools.lru_cache(maxsize=8)(_causal)


def row_logits(query: torch.Tensor, key: torch.Tensor, heads: torch.Tensor, rows_local: torch.Tensor,
               kv_groups: int, scaling: float, additive: torch.Tensor | None, softcap: float | None,
               columns: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled logits `(batch, len(heads), len(rows), kv_len)` for chosen query heads and rows, in float32 or wider;
    with `columns` (key indices), only those keys: `(..., len(columns))`.

    `heads` are distinct and ascending. Key heads are shared by `kv_groups` query heads (GQA): with every query head,
    the query rows of a group are stacked against their one key head (no copy of the keys); a subset of heads
    gathers only the key heads it uses.
    """
    if columns is not None:
        key = key[:, :, columns]
        additive = None if additive is None else additive[..., columns]
    dtype = torch.promote_types(query.dtype, torch.float32)
    every_row = len(rows_local) == query.shape[2]  # distinct indices: all rows in order, nothing to gather
    # the scale goes on the (rows, head_dim) queries, not on the (rows, kv_len) logits
    if _all_heads(heads, query.shape[1]):
        q = _grouped((query if every_row else query[:, :, rows_local]).to(dtype) * scaling, key.shape[1])
        z = torch.matmul(q, key.to(dtype).transpose(-1, -2)).view(*query.shape[:2], len(rows_local), -1)
    else:
        q = query[:, heads][:, :, rows_local].to(dtype) * scaling
        k = key[:, torch.div(heads, kv_groups, rounding_mode="floor")].to(dtype)
        z = torch.matmul(q, k.transpose(-1, -2))
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if additive is not None:
        z = z + (additive if every_row else additive[:, :, rows_local]).to(dtype)
    return z


def row_output(probs: torch.Tensor, value: torch.Tensor, heads: torch.Tensor, kv_groups: int) -> torch.Tensor:
    """`probs @ V` for the chosen heads, `(batch, heads, rows, head_dim)` in the probabilities' dtype."""
    if _all_heads(heads, value.shape[1] * kv_groups):
        out = torch.matmul(_grouped(probs, value.shape[1]), value.to(probs.dtype))
        return out.view(*probs.shape[:3], -1)
    v = value[:, torch.div(heads, kv_groups, rounding_mode="floor")].to(probs.dtype)
    return torch.matmul(probs, v)


def _all_heads(heads: torch.Tensor, num_heads: int) -> bool:
    return heads.numel() == num_heads  # distinct indices below num_heads: all of them, in order


def _grouped(per_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """`(batch, heads, rows, n)` → `(batch, kv_heads, groups·rows, n)`: query head h = kv·groups + g."""
    batch, heads, rows, n = per_head.shape
    return per_head.reshape(batch, kv_heads, heads // kv_heads * rows, n)
