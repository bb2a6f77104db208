"""Explicit attention for the few query rows and heads a method edits.

Everything else of the layer stays on the model's own backend (SDPA): only the requested rows are materialised,
and edits are additive pre-softmax biases, which covers post-softmax rescaling exactly (see the method specs).
"""

from __future__ import annotations

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
    """

    logits: torch.Tensor
    allowed: torch.Tensor
    heads: torch.Tensor
    rows: torch.Tensor
    _probs: torch.Tensor | None = field(default=None, repr=False)

    def add_bias(self, bias: torch.Tensor) -> None:
        """Add a pre-softmax bias broadcastable to `logits`. Masked keys stay masked whatever the bias."""
        self.logits = self.logits + bias
        self._probs = None

    def probs(self) -> torch.Tensor:
        """Current attention probabilities, `(batch, heads, rows, kv_len)`; masked keys are exactly 0."""
        if self._probs is None:
            self._probs = masked_softmax(self.logits, self.allowed)
        return self._probs


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over keys with disallowed keys at exactly 0 (rows with no allowed key give 0, not NaN)."""
    z = logits.masked_fill(~allowed, float("-inf"))
    top = z.amax(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).min)
    e = torch.exp(z - top)
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)


def allowed_keys(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn the mask the model passed to its attention function into `(allowed, additive)`.

    `None` means a plain causal mask aligned bottom-right (SDPA's `is_causal` skip). A bool mask is used as is;
    a float (eager) mask marks its minimum as disallowed and is also returned as an additive term.
    """
    if attention_mask is None:
        q = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        allowed = (torch.arange(kv_len, device=device)[None, :] <= q).view(1, 1, q_len, kv_len)
        return allowed.expand(batch, 1, q_len, kv_len), None
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return mask.expand(batch, 1, q_len, kv_len), None
    allowed = mask > torch.finfo(mask.dtype).min / 2
    return allowed.expand(batch, 1, q_len, kv_len), mask


def row_logits(query: torch.Tensor, key: torch.Tensor, heads: torch.Tensor, rows_local: torch.Tensor,
               kv_groups: int, scaling: float, additive: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """Scaled logits `(batch, len(heads), len(rows), kv_len)` for chosen query heads and rows, in float32 or wider.

    Key heads are shared by `kv_groups` query heads (GQA); they are gathered, never expanded for all heads.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query[:, heads][:, :, rows_local].to(dtype)
    k = key[:, torch.div(heads, kv_groups, rounding_mode="floor")].to(dtype)
    z = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if additive is not None:
        z = z + additive[:, :, rows_local].to(dtype)
    return z


def row_output(probs: torch.Tensor, value: torch.Tensor, heads: torch.Tensor, kv_groups: int) -> torch.Tensor:
    """`probs @ V` for the chosen heads, `(batch, heads, rows, head_dim)` in the probabilities' dtype."""
    v = value[:, torch.div(heads, kv_groups, rounding_mode="floor")].to(probs.dtype)
    return torch.matmul(probs, v)
