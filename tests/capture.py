"""Capture the exact attention inputs of a plain (unwrapped, SDPA) forward, for the conformance references.

The capture function is registered once in transformers' attention interface; `capture` switches the text decoder to
it for one forward and back, so the model computes exactly what SDPA would.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

_KEY = "test_capture"
_CAPTURED: dict[int, dict] = {}


def _record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = module.num_key_value_groups
    _CAPTURED.setdefault(module.layer_idx, {}).update(
        q=query, k=repeat_kv(key, groups), v=repeat_kv(value, groups), mask=attention_mask, scaling=scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


AttentionInterface.register(_KEY, _record)
AttentionMaskInterface.register(_KEY, sdpa_mask)


@torch.no_grad()
def capture(model, inputs: dict, hidden: bool = False) -> dict[int, dict]:
    """`{layer: {q, k, v, mask, scaling}}` of one forward of the unwrapped `model` on `inputs` (k and v expanded to
    the query heads); with `hidden`, also each decoder layer's input hidden states."""
    config = model.get_decoder().config
    previous = config._attn_implementation_internal
    hooks = []
    if hidden:
        hooks = [layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: _CAPTURED.setdefault(i, {}).update(hidden=a[0] if a else kw["hidden_states"]),
            with_kwargs=True) for i, layer in enumerate(model.get_decoder().layers)]
    config._attn_implementation_internal = _KEY
    try:
        _CAPTURED.clear()
        model(**inputs)
        return dict(_CAPTURED)
    finally:
        config._attn_implementation_internal = previous
        for hook in hooks:
            hook.remove()


def record_row_blocks(monkeypatch) -> list[tuple[int, int, int]]:
    """From now on (for the test's duration), `(rows, heads, keys)` of every block of explicit attention logits
    the core computes: what a method makes the core materialise (`keys`: kv_len, or the columns of a column view)."""
    from interventions.core import attention

    blocks = []
    original = attention.row_logits

    def spy(query, key, heads, rows_local, *args, columns=None):
        blocks.append((len(rows_local), len(heads), key.shape[2] if columns is None else len(columns)))
        return original(query, key, heads, rows_local, *args, columns=columns)

    monkeypatch.setattr(attention, "row_logits", spy)
    return blocks
