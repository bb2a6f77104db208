"""The one attention function this library registers in transformers' `AttentionInterface`.

It is switched on for the text decoder only (its config's `_attn_implementation` is set to one of `KEYS`), and it
is neutral by itself: a layer that no method touches calls the backend the model had before (SDPA or eager) with
the same arguments. A touched layer still runs that backend for every row, then recomputes explicitly only the rows
and heads the methods asked for (`RowLogits`) and writes them back.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from . import fused
from .contract import Capability
from .rows import RowLogits, allowed_keys, causal_columns, row_logits, row_output

if TYPE_CHECKING:
    from .contract import Method
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

#: most logits `(batch, heads, rows, kv_len)` one block of explicit rows holds, per device type; its temporaries
#: (probabilities, biases) are a few times this. CPU: 4 MiB per float32 tensor. GPU: 64 MiB, as every block costs
#: kernel launches and a GPU-sized model's activations dwarf it
ROW_BLOCK_ELEMENTS: dict[str, int] = {"cpu": 1 << 20, "cuda": 1 << 24}

#: counts calls per dispatch path; tests assert on it to prove untouched layers still run the base backend
DISPATCH_COUNTS: dict[str, int] = {"base": 0, "edited": 0}

#: shortest call for which a ranked mask runs as unmasked calls in rank order: below it the few extra kernel calls
#: cost more than the masked half of a dense call saves (organism, 49 tokens: 1.49× vs 1.24× for CCA's prefill;
#: 613 tokens: 0.98× vs 1.08×; benchmarks/overhead.py)
RANKED_MIN_LENGTH = 256

#: use the fused paths where they apply (`columns` requests, ranked masks); off: explicit rows and dense masks, as
#: on every other backend (tests compare the two)
FUSED = True


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
    mask_editors = [m for m in editors if Capability.mask in m.needs]
    requests = [(m, r) for m in editors if Capability.rows in m.needs and (r := m.request(call)) is not None]
    head_editors = [m for m in editors if Capability.head_outputs in m.needs]
    ranks = None
    if len(mask_editors) == 1 and not requests and not want_weights and attention_mask is None \
            and query.shape[2] >= RANKED_MIN_LENGTH \
            and _fused_kernel_applies(binding, module, query, key, attention_mask, dropout, kwargs):
        ranks = mask_editors[0].mask_ranks(call)
    if mask_editors and ranks is None:
        attention_mask = _edit_mask(call, mask_editors, attention_mask, query, key.shape[2],
                                    eager=binding.session.base == "eager")
    edited = requests or head_editors or ranks is not None or attention_mask is not given_mask
    DISPATCH_COUNTS["edited" if edited else "base"] += 1
    if ranks is not None:
        out, weights = fused.ranked_attention(query, key, value, ranks, scaling), None
    elif not want_weights and (columns := [(m, r) for m, r in requests if r.columns]) \
            and _fusable(binding, module, columns, query, key, attention_mask, dropout, kwargs):
        out, weights = _edit_columns(call, columns, query, key, value, attention_mask, scaling), None
        if len(columns) < len(requests):  # other methods' rows: recomputed explicitly with every edit, in stack order
            out, weights = _edit_rows(call, _rows_of_others(requests), query, key, value, attention_mask, scaling,
                                      out, None, False, kwargs.get("softcap"))
    elif _rewrites_everything(requests, query, want_weights):
        out, weights = _edit_rows(call, requests, query, key, value, attention_mask, scaling, None, None, False,
                                  kwargs.get("softcap"))
    else:
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


def _rewrites_everything(requests: list[tuple[Method, RowRequest]], query: torch.Tensor, want_weights: bool) -> bool:
    """A decode step whose one row some request edits in every head: the explicit row replaces the whole output,
    so the base backend's call would be thrown away (the row always sees a key: the new token itself)."""
    if want_weights or query.shape[2] != 1:
        return False
    return any(r.heads is None and not r.read_only and not r.grad and bool(r.rows[0]) for _, r in requests)


def _fused_kernel_applies(binding: Binding, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float, kwargs: dict[str, Any]) -> bool:
    """A fused path may replace the base call: the base is SDPA and a fused kernel with log-sum-exp runs these inputs,
    the call is a plain causal (or masked) one without gradients (the log-sum-exp carries none), and it has several
    rows (a single decode row is cheap explicitly, and keeps the other heads on SDPA's own GQA decode kernel)."""
    if not FUSED or binding.session.base != "sdpa" or dropout or query.shape[2] == 1 or torch.is_grad_enabled():
        return False
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True) or kwargs.get("position_bias") \
            is not None or kwargs.get("s_aux") is not None:
        return False
    if attention_mask is None and query.shape[2] != key.shape[2]:  # a static cache's prefill: keys get cropped
        return False
    return fused.available(query, attention_mask)


def _rows_of_others(requests: list[tuple[Method, RowRequest]]) -> list[tuple[Method, RowRequest]]:
    """After the fused `columns` path: every request limited to the rows the other requests ask for, the columns
    requests without `observe` (their statistics came from the fused path), for an explicit pass over those rows."""
    others = [r.rows for _, r in requests if not r.columns]
    rows = functools.reduce(torch.logical_or, others)
    return [(m, dataclasses.replace(r, rows=r.rows & rows, observe=False) if r.columns else r) for m, r in requests]


def _fusable(binding: Binding, module: torch.nn.Module, requests: list[tuple[Method, RowRequest]],
             query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float,
             kwargs: dict[str, Any]) -> bool:
    """The `columns` path applies to these `columns` requests: each one edits, and a fused kernel applies."""
    if any(r.read_only or r.grad for _, r in requests):
        return False
    return _fused_kernel_applies(binding, module, query, key, attention_mask, dropout, kwargs)


def _edit_columns(call: AttentionCall, requests: list[tuple[Method, RowRequest]], query: torch.Tensor,
                  key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                  scaling: float) -> torch.Tensor:
    """The fused path of `columns` requests: one fused call gives every head's output and each row's log-sum-exp;
    `observe` requests get the attention each key receives from a second, transposed fused call; `edit` sees only
    the columns the methods name, and a bias `b` there gives exactly, with `P` the columns' probabilities before it
    and `δ = P·(e^b − 1)`, `O' = (O + δ·V_cols) / (1 + Σ δ)`."""
    out, lse = fused.attention_with_lse(query, key, value, attention_mask, scaling)
    batch, num_heads, q_len, kv_len = *query.shape[:3], key.shape[2]
    groups = num_heads // key.shape[1]
    # a plain causal call never builds its (q_len, kv_len) mask: only the named columns' part of it is needed
    allowed, additive = (None, None) if attention_mask is None else \
        allowed_keys(attention_mask, batch, q_len, kv_len, query.device)
    valid_rows = call.roles.valid[:, call.query_positions]
    for method, request in requests:
        if request.observe:
            heads = _arange(num_heads, query.device) if request.heads is None else request.heads.sort().values
            counted = valid_rows & request.rows
            received = fused.received_attention(query, key, lse, heads, scaling, allowed, counted)
            if allowed is None:  # key j is seen by the counted rows i >= j
                count = counted.flip(-1).cumsum(-1).flip(-1)[:, None]
            else:
                count = (allowed & counted[:, None, :, None]).sum(2)
            method.observe_received(call, received, count, request)
    columns = torch.cat([m.edit_columns(call, r) for m, r in requests]).unique()
    if columns.numel() == 0:
        return out
    rows_local, heads = _rows_and_heads(requests, q_len, num_heads, query.device, everything=False)
    logits = row_logits(query, key, heads, rows_local, groups, scaling, additive, None, columns=columns)
    column_allowed = causal_columns(q_len, kv_len, columns) if allowed is None else allowed[..., columns]
    view = RowLogits(logits=logits, allowed=column_allowed[:, :, rows_local].expand(batch, -1, -1, -1), heads=heads,
                     rows=call.query_positions[rows_local], columns=columns,
                     lse=lse[:, heads][:, :, rows_local, None].to(logits.dtype))
    before = view.probs()
    for method, request in requests:
        method.edit(call, view, request)
    delta = view.probs() - before  # (batch, heads, rows, columns)
    where = (slice(None), rows_local[:, None], heads)
    base = out[where].transpose(1, 2).to(delta.dtype)  # (batch, heads, rows, head_dim)
    edited = (base + row_output(delta, value[:, :, columns], heads, groups)) / (1 + delta.sum(-1, keepdim=True))
    out[where] = edited.transpose(1, 2).to(out.dtype)
    return out


def _edit_rows(call: AttentionCall, requests: list[tuple[Method, RowRequest]], query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
               out: torch.Tensor, weights: torch.Tensor | None, want_weights: bool,
               softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recompute the requested rows and heads explicitly, let the methods bias them, write them back into `out`.

    When every request is `blockwise`, rows go in blocks of at most `ROW_BLOCK_ELEMENTS` logits (at least one row),
    so a method that asks for every row (ACT at prefill) holds one block, not `(heads, L, L)`. Requests with
    `observe` see every block first (`Method.observe`); with more than one block the logits are then computed a
    second time for the edits.
    """
    batch, num_heads, q_len, _ = query.shape
    groups = num_heads // key.shape[1]
    rows_local, heads = _rows_and_heads(requests, q_len, num_heads, query.device, everything=want_weights)
    allowed, additive = allowed_keys(attention_mask, batch, q_len, key.shape[2], query.device)
    editing = [(m, r) for m, r in requests if not r.read_only]
    observing = [(m, r) for m, r in requests if r.observe]
    # write back only what an editing request covers; read-only rows and heads keep the base output bit for bit
    write_rows, write_heads = rows_local, heads
    subset = want_weights or len(editing) < len(requests)
    if editing and subset:
        write_rows, write_heads = _rows_and_heads(editing, q_len, num_heads, query.device, everything=False)
        head_pick = torch.isin(heads, write_heads)

    def view_of(block: torch.Tensor) -> RowLogits:
        every_row = len(block) == q_len  # distinct indices: all rows in order (a decode step), nothing to gather
        return RowLogits(logits=row_logits(query, key, heads, block, groups, scaling, additive, softcap),
                         allowed=allowed if every_row else allowed[:, :, block], heads=heads,
                         rows=call.query_positions if every_row else call.query_positions[block])

    per_row = batch * len(heads) * key.shape[2]
    budget = ROW_BLOCK_ELEMENTS.get(query.device.type, ROW_BLOCK_ELEMENTS["cpu"])
    blockwise = all(r.blockwise for _, r in requests) and per_row * len(rows_local) > budget
    blocks = rows_local.split(max(1, budget // per_row)) if blockwise else (rows_local,)
    views = [view_of(block) for block in blocks] if len(blocks) == 1 else None
    if observing:
        for i, block in enumerate(blocks):
            view = views[i] if views is not None else view_of(block)
            for method, request in observing:
                method.observe(call, view, request)
    rewrite = out is None  # the edits rewrite the one row in every head (`_rewrites_everything`): no base output
    if editing and not rewrite and torch.is_grad_enabled():
        out = out.clone()  # the base output may be saved for backward; otherwise it is ours to overwrite
    all_probs = []
    tracked = [(m, r) for m, r in requests if r.grad] if torch.is_grad_enabled() else []
    tracked_views = []
    for i, block in enumerate(blocks):
        view = views[i] if views is not None else view_of(block)
        for method, request in requests:
            method.edit(call, view, request)
        probs, block_allowed = view.probs(), view.allowed
        if want_weights:
            all_probs.append(probs)
        if tracked:
            tracked_views.append((view, block))
        if not editing:
            continue
        rows = block
        if subset:
            row_pick = torch.isin(block, write_rows)
            probs, rows = probs[:, head_pick][:, :, row_pick], block[row_pick]
            block_allowed = block_allowed[:, :, row_pick]
        edited = row_output(probs, value, write_heads, groups).transpose(1, 2)  # (batch, rows, heads, head_dim)
        if rewrite:
            out = edited.to(query.dtype).contiguous()
            continue
        where = (slice(None), rows) if len(write_heads) == num_heads else (slice(None), rows[:, None], write_heads)
        if attention_mask is None:  # causal: every row sees a key
            out[where] = edited.to(out.dtype)
        else:
            has_key = block_allowed.any(-1).transpose(1, 2)[..., None]  # fully masked rows keep base
            out[where] = torch.where(has_key, edited.to(out.dtype), out[where])
    for view, block in tracked_views:  # after every write-back, which would overwrite the gradient path
        out = _track_grad(call, tracked, view, block, value, groups, out)
    if want_weights:
        weights = torch.cat(all_probs, 2).to(query.dtype)
    return out, weights


def _track_grad(call: AttentionCall, tracked: list[tuple[Method, RowRequest]], view: RowLogits, block: torch.Tensor,
                value: torch.Tensor, groups: int, out: torch.Tensor) -> torch.Tensor:
    """Give each `grad` request its rows' final probabilities as an autograd leaf, on which the output then depends
    through `leaf @ V` added as `x - x.detach()`: exact gradients, and the output's value unchanged bit for bit."""
    probs = view.probs().detach()
    for method, request in tracked:
        row_pick = request.rows[block]
        if not bool(row_pick.any()):
            continue
        wanted = view.heads if request.heads is None else request.heads.to(view.heads.device)
        head_pick = torch.isin(view.heads, wanted)
        leaf = probs[:, head_pick][:, :, row_pick].requires_grad_()
        method.grad_probs(call, leaf, request)
        rows, heads = block[row_pick], view.heads[head_pick]
        path = row_output(leaf, value.detach(), heads, groups)  # detached V: only the leaf gains a gradient path
        delta = torch.zeros_like(out[:, rows])
        delta[:, :, heads] = (path - path.detach()).transpose(1, 2).to(out.dtype)
        out = out.index_add(1, rows, delta)
    return out


def _rows_and_heads(requests: list[tuple[Method, RowRequest]], q_len: int, num_heads: int, device: torch.device,
                    everything: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of the requested rows and heads (all of them when `everything`), as index tensors."""
    if everything:
        return _arange(q_len, device), _arange(num_heads, device)
    if len(requests) == 1 and requests[0][1].heads is None:  # the common case (a decode step): no union to build
        return requests[0][1].rows.nonzero().squeeze(1), _arange(num_heads, device)
    rows = torch.zeros(q_len, dtype=torch.bool, device=device)
    heads = torch.zeros(num_heads, dtype=torch.bool, device=device)
    for _, request in requests:
        rows |= request.rows
        if request.heads is None:
            heads[:] = True
        else:
            heads[request.heads] = True
    return rows.nonzero().squeeze(1), heads.nonzero().squeeze(1)


@functools.lru_cache(maxsize=32)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)  # shared and never written: index tensors reused by every layer


AttentionInterface.register(KEYS["sdpa"], intervened_attention)
AttentionInterface.register(KEYS["eager"], intervened_attention)
AttentionMaskInterface.register(KEYS["sdpa"], sdpa_mask)
AttentionMaskInterface.register(KEYS["eager"], eager_mask)
