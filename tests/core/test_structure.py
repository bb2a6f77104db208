"""The structural facts that make the methods cheap (benchmarks/overhead.py measures the times; no test here is
timed): untouched layers stay on SDPA at prefill and at every decode step; only the rows and heads a method needs
are materialised; rows that a method needs all of (ACT at prefill) are computed in blocks whose extra memory is
bounded, with the same result as one block."""

from __future__ import annotations

import functools

import pytest
import torch
from capture import record_row_blocks
from tiny_models import Prompt, build_model, make_inputs
from torch.profiler import ProfilerActivity, profile

import interventions as iv
from interventions.core import attention

LONG = 160  # prompt tokens of the LLM cases: (4 heads, L, L) float32 logits are 400 KiB per layer


@functools.cache
def _model(family: str):
    return build_model(family)


def _llm_inputs(length: int = LONG) -> dict[str, torch.Tensor]:
    return make_inputs(_model("llama"), "llama", [Prompt(length, 0, seed=3, image=False)])


@pytest.fixture
def materialised(monkeypatch):
    """Records `(rows, heads, kv_len)` of every block of explicit logits the core computes."""
    return record_row_blocks(monkeypatch)


@torch.no_grad()
def test_decode_steps_keep_untouched_layers_on_sdpa():
    model = _model("llava")
    inputs = make_inputs(model, "llava", [Prompt(3, 5, seed=1)])
    with iv.apply(model, "pai", alpha=0.5, start_layer=2):
        before = dict(attention.DISPATCH_COUNTS)
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        edited = attention.DISPATCH_COUNTS["edited"] - before["edited"]
        base = attention.DISPATCH_COUNTS["base"] - before["base"]
    assert (edited, base) == (4, 8)  # 4 forwards (prefill + 3 steps): layer 2 edited, layers 0 and 1 on SDPA


@torch.no_grad()
def test_decode_rows_edited_in_every_head_skip_the_base_kernel(monkeypatch):
    model = _model("llava")
    inputs = make_inputs(model, "llava", [Prompt(3, 5, seed=1)])
    kernel_calls, kernel = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda query, *a, **k: kernel_calls.append(query.shape[2]) or kernel(query, *a, **k))
    with iv.apply(model, "pai", alpha=0.5, start_layer=1):
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    decode_calls = [q_len for q_len in kernel_calls if q_len == 1]
    # 2 decode steps: layer 0 on SDPA; layers 1 and 2 rewrite their one row in every head, so their SDPA call is skipped
    assert len(decode_calls) == 2


@torch.no_grad()
def test_last_row_methods_materialise_one_row_per_layer(materialised):
    model = _model("llava")
    inputs = make_inputs(model, "llava", [Prompt(3, 5, seed=1)])
    length = inputs["input_ids"].shape[1]
    with iv.apply(model, "pai", alpha=0.5, start_layer=1):
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    # layers 1 and 2, all 4 heads: the last prompt row at prefill, then the one new row of the decode step
    assert materialised == [(1, 4, length)] * 2 + [(1, 4, length + 1)] * 2


@pytest.fixture
def explicit_rows(monkeypatch):
    """The core's explicit blockwise path even where the fused one applies (the path of eager models, GPUs, stacks)."""
    monkeypatch.setattr(attention, "FUSED", False)


@torch.no_grad()
def test_act_materialises_only_its_sink_columns(monkeypatch, materialised):
    model, inputs = _model("llama"), _llm_inputs(40)
    fused, original = [], attention.fused.received_attention

    def spy(query, key, lse, heads, *args):
        fused.append(len(heads))
        return original(query, key, lse, heads, *args)

    monkeypatch.setattr(attention.fused, "received_attention", spy)
    with iv.apply(model, "act", beta=0.5, threshold=0.05, heads=[[1, 0], [1, 3], [2, 2]]) as handle:
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        sinks = handle.methods[0].sinks()
    # prefill: the column sums of the selected heads come from the fused kernel; the explicit logits are every
    # prompt row of the selected heads (layer 1: 2, layer 2: 1) against the sink columns only; decode: one row
    columns = [int(sinks[layer].any(1).any(0).sum()) for layer in (1, 2)]
    assert fused == [2, 1] and all(0 < c < 40 for c in columns)
    assert materialised == [(40, 2, columns[0]), (40, 1, columns[1]), (1, 2, 41), (1, 1, 41)]


@torch.no_grad()
def test_act_explicit_path_materialises_only_its_heads(materialised, explicit_rows):
    model, inputs = _model("llama"), _llm_inputs(40)
    with iv.apply(model, "act", beta=0.5, heads=[[1, 0], [1, 3], [2, 2]]):
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    # prefill: every prompt row of the selected heads only (layer 1: 2 heads, layer 2: 1 head); decode: one row
    assert materialised == [(40, 2, 40), (40, 1, 40), (1, 2, 41), (1, 1, 41)]


def test_act_fused_path_equals_explicit_rows(monkeypatch):
    model, inputs = _model("llama"), _llm_inputs()
    fused = _act_logits(model, inputs)
    monkeypatch.setattr(attention, "FUSED", False)
    torch.testing.assert_close(fused, _act_logits(model, inputs), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("stack", [
    [("pai", {"alpha": 0.5, "start_layer": 1}), ("act", {"beta": 0.3, "threshold": 0.05, "layers": [1, 2]})],
    [("act", {"beta": 0.3, "threshold": 0.05, "layers": [1, 2]}), ("pai", {"alpha": 0.5, "start_layer": 1})],
], ids=["pai+act", "act+pai"])
@torch.no_grad()
def test_stacks_with_act_keep_the_fused_path_and_its_result(monkeypatch, stack):
    model = _model("llava")
    inputs = make_inputs(model, "llava", [Prompt(30, 12, seed=4)])
    fused_calls, original = [], attention.fused.attention_with_lse
    monkeypatch.setattr(attention.fused, "attention_with_lse", lambda *a: fused_calls.append(1) or original(*a))
    with iv.apply(model, stack):
        got = model(**inputs).logits
        assert fused_calls == [1, 1]  # layers 1 and 2: ACT's columns fused, PAI's last row explicit on top
        monkeypatch.setattr(attention, "FUSED", False)
        expected = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def _act_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad(), iv.apply(model, "act", beta=0.3, threshold=0.02, layers=[1, 2]) as handle:
        logits = model(**inputs).logits
        assert any(bool(s.any()) for s in handle.methods[0].sinks().values())  # the edit is active
    return logits


def test_blocked_rows_give_the_same_result_within_the_bound(monkeypatch, materialised, explicit_rows):
    model, inputs = _model("llama"), _llm_inputs()
    whole = _act_logits(model, inputs)
    assert {rows for rows, *_ in materialised} == {LONG}  # default bound: one block of every row
    materialised.clear()
    monkeypatch.setitem(attention.ROW_BLOCK_ELEMENTS, "cpu", 4 * LONG * 10)  # 10 rows of 4 heads per block
    blocked = _act_logits(model, inputs)
    assert all(rows * heads * kv <= 4 * LONG * 10 for rows, heads, kv in materialised)
    # each layer: 16 blocks observed (column sums), then the same 16 blocks computed again for the edit
    assert len(materialised) == 2 * 2 * LONG // 10
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=1e-6)


def _peak_bytes(fn) -> int:
    """Peak bytes of live torch tensors during `fn()`, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _prefill(model, inputs) -> None:
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)


def test_blocked_rows_bound_the_extra_memory(monkeypatch, explicit_rows):
    model, inputs = _model("llama"), _llm_inputs()
    block = 4 * LONG * 8
    monkeypatch.setitem(attention.ROW_BLOCK_ELEMENTS, "cpu", block)

    prefill = functools.partial(_prefill, model, inputs)
    plain = _peak_bytes(prefill)
    with iv.apply(model, "act", beta=0.3, threshold=0.02, layers=[1, 2]):
        prefill()  # warm-up
        blocked = _peak_bytes(prefill)
        monkeypatch.setitem(attention.ROW_BLOCK_ELEMENTS, "cpu", 1 << 30)
        whole = _peak_bytes(prefill)
    full_map = 4 * LONG * LONG * 4  # (heads, L, L) float32
    assert blocked - plain <= 8 * block * 4  # a few block-sized temporaries, whatever the prompt length
    assert whole - plain >= 2 * full_map  # without blocks: several (heads, L, L) maps at once


def test_fused_path_extra_memory_is_linear_in_the_prompt():
    model, inputs = _model("llama"), _llm_inputs()
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads

    prefill = functools.partial(_prefill, model, inputs)
    plain = _peak_bytes(prefill)
    with iv.apply(model, "act", beta=0.3, threshold=0.02, layers=[1, 2]):
        prefill()  # warm-up
        fused = _peak_bytes(prefill)
    per_head_rows = config.num_attention_heads * LONG * (head_dim + 1) * 4  # one (heads, L, head_dim + 1) float32
    full_map = config.num_attention_heads * LONG * LONG * 4
    assert 8 * per_head_rows < full_map  # the bound below is meaningful: it excludes even one (heads, L, L) map
    assert fused - plain <= 8 * per_head_rows
