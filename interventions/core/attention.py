"""The one attention function this library registers in transformers' `AttentionInterface`.

It is switched on for the text decoder only (its config's `_attn_implementation` is set to one of `KEYS`), and it
is neutral by itself: a layer that no method touches calls the backend the model had before (SDPA or eager) with
the same arguments. A touched layer still runs that backend for every row, then recomputes explicitly only the rows
and heads the methods asked for (`RowLogits`) and writes them back.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .rows import RowLogits, allowed_keys, row_logits, row_output

if TYPE_CHECKING:
    from ..methods.base import Method
    from .call import AttentionCall, RowRequest
    from .session import Session

#: registered key per base implementation; the mask function of each key is the base's own
KEYS: dict[str, str] = {"sdpa": "interventions_sdpa", "eager": "interventions_eager"}


@dataclass(frozen=True)
class Binding:
    """Links one text-decoder attention module to the session that owns it and to its base backend."""

    session: Session
    layer: int
    base: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


_BINDINGS: weakref.WeakKeyDictionary[torch.nn.Module, Binding] = weakref.WeakKeyDictionary()

#: counts calls per dispatch path; tests assert on it to prove untouched layers still run the base backend
DISPATCH_COUNTS: dict[str, int] = {"base": 0, "edited": 0}


def base_attention(module: torch.nn.Module, implementation: str) -> Callable[..., Any]:
    """The function the module would call without wrapping: SDPA, or its modeling file's eager function."""
    if implementation == "sdpa":
        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward


def bind(module: torch.nn.Module, binding: Binding) -> None:
    _BINDINGS[module] = binding


def unbind(module: torch.nn.Module) -> None:
    _BINDINGS.pop(module, None)


def intervened_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`AttentionInterface` entry point; same contract as `sdpa_attention_forward`.

    With `output_attentions=True` every layer returns its explicit (edited) weights, whatever the base backend.
    Per-head outputs (before `o_proj`) pass through the head-output editors last.
    """
    binding = _BINDINGS.get(module)
    if binding is None:  # a module this library did not bind (never expected): behave as plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    want_weights = bool(kwargs.get("output_attentions"))
    editors = binding.session.editors(binding.layer)
    call = (binding.session.attention_call(binding.layer, query, key, value, attention_mask)
            if editors or want_weights else None)
    given_mask = attention_mask
    mask_editors = [m for m in editors if "mask" in m.needs]
    if mask_editors:
        attention_mask = _edit_mask(call, mask_editors, attention_mask, query, key.shape[2],
                                    eager=binding.session.base == "eager")
    requests = [(m, r) for m in editors if "rows" in m.needs and (r := m.request(call)) is not None]
    head_editors = [m for m in editors if "head_outputs" in m.needs]
    DISPATCH_COUNTS["edited" if requests or head_editors or attention_mask is not given_mask else "base"] += 1
    out, weights = binding.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                **kwargs)
    if requests or want_weights:
        out, weights = _edit_rows(call, requests, query, key, value, attention_mask, scaling, out, weights,
                                  want_weights, kwargs.get("softcap"))
    for method in head_editors:
        out = method.edit_head_outputs(call, out)
    return out, weights


def _edit_mask(call: AttentionCall, editors: list[Method], attention_mask: torch.Tensor | None, query: torch.Tensor,
               kv_len: int, eager: bool) -> torch.Tensor | None:
    """Let the mask editors change the allowed keys; the result is the mask object itself when none changed it,
    else a bool mask (SDPA) or an additive float one (eager, or a float mask given), keeping the model's own
    additive terms on the keys that stay allowed."""
    batch, _, q_len, _ = query.shape
    allowed, additive = allowed_keys(attention_mask, batch, q_len, kv_len, query.device)
    edited = allowed
    for method in editors:
        new = method.edit_mask(call, edited)
        edited = edited if new is None else new
    if edited is allowed:
        return attention_mask
    if additive is None and not eager:
        return edited
    dtype = query.dtype if additive is None else additive.dtype
    keep = torch.zeros((), dtype=dtype, device=query.device) if additive is None else additive.masked_fill(~allowed, 0)
    return torch.where(edited, keep, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=query.device))


def _edit_rows(call: AttentionCall, requests: list[tuple[Method, RowRequest]], query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
               out: torch.Tensor, weights: torch.Tensor | None, want_weights: bool,
               softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recompute the requested rows and heads explicitly, let the methods bias them, write them back into `out`."""
    batch, num_heads, q_len, _ = query.shape
    groups = num_heads // key.shape[1]
    rows_local, heads = _rows_and_heads(requests, q_len, num_heads, query.device, everything=want_weights)
    allowed, additive = allowed_keys(attention_mask, batch, q_len, key.shape[2], query.device)
    view = RowLogits(
        logits=row_logits(query, key, heads, rows_local, groups, scaling, additive, softcap),
        allowed=allowed[:, :, rows_local],
        heads=heads,
        rows=call.query_positions[rows_local],
    )
    for method, request in requests:
        method.edit(call, view, request)
    probs = view.probs()
    if want_weights:
        weights = probs.to(query.dtype)
    editing = [(m, r) for m, r in requests if not r.read_only]
    if not editing:
        return out, weights

    # write back only what an editing request covers; read-only rows and heads keep the base output bit for bit
    write_rows, write_heads = _rows_and_heads(editing, q_len, num_heads, query.device, everything=False)
    row_pick = torch.isin(rows_local, write_rows)
    head_pick = torch.isin(heads, write_heads)
    probs = probs[:, head_pick][:, :, row_pick]
    edited = row_output(probs, value, write_heads, groups).transpose(1, 2)  # (batch, rows, heads, head_dim)
    has_key = view.allowed[:, :, row_pick].any(-1).transpose(1, 2)[..., None]  # fully masked rows keep base
    block = out[:, write_rows]
    block[:, :, write_heads] = torch.where(has_key, edited.to(out.dtype), block[:, :, write_heads])
    out = out.clone()  # the base output may be saved for backward
    out[:, write_rows] = block
    return out, weights


def _rows_and_heads(requests: list[tuple[Method, RowRequest]], q_len: int, num_heads: int, device: torch.device,
                    everything: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of the requested rows and heads (all of them when `everything`), as index tensors."""
    if everything:
        return torch.arange(q_len, device=device), torch.arange(num_heads, device=device)
    rows = torch.zeros(q_len, dtype=torch.bool, device=device)
    heads = torch.zeros(num_heads, dtype=torch.bool, device=device)
    for _, request in requests:
        rows |= request.rows
        if request.heads is None:
            heads[:] = True
        else:
            heads[request.heads] = True
    return rows.nonzero().squeeze(1), heads.nonzero().squeeze(1)


AttentionInterface.register(KEYS["sdpa"], intervened_attention)
AttentionInterface.register(KEYS["eager"], intervened_attention)
AttentionMaskInterface.register(KEYS["sdpa"], sdpa_mask)
AttentionMaskInterface.register(KEYS["eager"], eager_mask)
