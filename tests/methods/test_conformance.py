"""Float64 conformance of PAI and ACT against direct implementations of the spec formulas
(shared/specs/pai.md §3.1, shared/specs/act.md §3), end to end through a real (tiny) model.

The reference sees the exact query/key/value the model computes at one layer (captured with a plain SDPA pass),
applies the formula literally, and is compared with the attention weights the wrapped model returns there.
"""

from __future__ import annotations

import pytest
import torch
from capture import capture
from tiny_models import Prompt, build_model, make_inputs

import interventions as iv
from interventions.core import attention
from interventions.core.roles import TokenRoles
from interventions.core.rows import RowLogits
from interventions.methods.act import Act, ActConfig
from interventions.methods.base import AttentionCall, ModelInfo


def _allowed(valid: torch.Tensor) -> torch.Tensor:
    """(batch, L, L) causal ∧ valid-key mask from a (batch, L) validity vector."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal[None] & valid[:, None, :]


def _softmax(z: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)


def pai_reference(q, k, scaling, valid, image, alpha):
    """Spec §3.1: last row, image keys, z + alpha·|z| on the unmasked logits; every other row plain."""
    z = q @ k.transpose(-1, -2) * scaling  # (batch, heads, L, L)
    z[:, :, -1] += alpha * z[:, :, -1].abs() * image[:, None, :]
    return _softmax(z, _allowed(valid)[:, None])


def act_reference(q, k, scaling, valid, beta, threshold, heads):
    """Spec §3 steps 1-4, literally: causal column means over valid rows, first sink dropped, post-softmax rescale."""
    allowed = _allowed(valid)[:, None]
    a = _softmax(q @ k.transpose(-1, -2) * scaling, allowed)
    out = a.clone()
    batch, _, length, _ = a.shape
    for b in range(batch):
        rows = [i for i in range(length) if valid[b, i]]
        for h in heads:
            c = [sum(a[b, h, i, j] for i in rows if i >= j) / max(1, sum(1 for i in rows if i >= j))
                 if valid[b, j] else 0.0 for j in range(length)]
            found = [j for j in range(length) if valid[b, j] and c[j] > threshold]
            sinks = found[1:]
            for i in rows:
                m = sum(a[b, h, i, j] for j in sinks)
                if not sinks or m >= 1:
                    continue
                for j in range(length):
                    out[b, h, i, j] = beta * a[b, h, i, j] if j in sinks else a[b, h, i, j] * (1 - beta * m) / (1 - m)
    return out


@pytest.fixture(scope="module")
def llava64():
    model = build_model("llava", dtype=torch.float64)
    inputs = make_inputs(model, "llava", [Prompt(2, 5, seed=3), Prompt(5, 3, seed=4)])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
    return model, inputs


@pytest.mark.parametrize("alpha", [0.2, 1.5])
def test_pai_rows_equal_spec_formula_fp64(llava64, alpha):
    model, inputs = llava64
    layer = 1
    captured = capture(model, inputs)[layer]
    valid = inputs["attention_mask"].bool()
    image = inputs["input_ids"] == model.config.image_token_id
    expected = pai_reference(captured["q"], captured["k"], captured["scaling"], valid, image, alpha)
    with torch.no_grad(), iv.apply(model, "pai", alpha=alpha, start_layer=layer):
        got = model(**inputs, output_attentions=True).attentions[layer]
    rows = valid[:, None, :, None]
    torch.testing.assert_close(got.where(rows, 0), expected.where(rows, 0), atol=1e-6, rtol=0)
    sums = got.sum(-1)[valid[:, None, :].expand_as(got.sum(-1))]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-12, rtol=0)
    assert torch.all(got.masked_fill(_allowed(valid)[:, None], 0) == 0)  # padded keys stay masked for alpha >= 1


@pytest.mark.parametrize("beta, heads", [(0.4, [0, 1, 2, 3]), (0.0, [1]), (0.7, [2, 3])])
def test_act_rows_equal_spec_formula_fp64(llava64, beta, heads):
    model, inputs = llava64
    layer, threshold = 1, 0.08
    captured = capture(model, inputs)[layer]
    valid = inputs["attention_mask"].bool()
    expected = act_reference(captured["q"], captured["k"], captured["scaling"], valid, beta, threshold, heads)
    with torch.no_grad(), iv.apply(model, "act", beta=beta, threshold=threshold,
                                   heads=[[layer, h] for h in heads]) as handle:
        got = model(**inputs, output_attentions=True).attentions[layer]
        assert handle.methods[0].sinks()[layer].any()  # the check is not vacuous
    rows = valid[:, None, :, None]
    torch.testing.assert_close(got.where(rows, 0), expected.where(rows, 0), atol=1e-6, rtol=0)
    untouched = [h for h in range(4) if h not in heads]  # in a GQA model, the KV-group siblings stay unchanged
    plain = _softmax(captured["q"] @ captured["k"].transpose(-1, -2) * captured["scaling"], _allowed(valid)[:, None])
    torch.testing.assert_close(got.where(rows, 0)[:, untouched], plain.where(rows, 0)[:, untouched], atol=1e-12,
                               rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_act_fused_outputs_equal_spec_formula_fp64(family, monkeypatch):
    """The fused path (no attention weights asked for): each layer's attention output equals the spec's calibrated
    probabilities times V; left-padded batch (masked kernel) for llava, unpadded prompt (causal kernel) for qwen2."""
    model = build_model(family, dtype=torch.float64)
    image = family == "llava"
    prompts = [Prompt(2, 5, seed=3, image=image), Prompt(5, 3, seed=4, image=image)] if image \
        else [Prompt(12, 0, seed=5, image=False)]
    inputs = make_inputs(model, family, prompts)
    if image:
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
    layer, threshold, beta, heads = 1, 0.08, 0.3, [0, 2, 3]
    captured = capture(model, inputs)[layer]
    valid = inputs["attention_mask"].bool()
    expected = act_reference(captured["q"], captured["k"], captured["scaling"], valid, beta, threshold, heads)
    expected = expected @ captured["v"]  # (batch, heads, L, head_dim)
    outputs, fused_calls, fused_call = [], [], attention.fused.attention_with_lse
    monkeypatch.setattr(attention.fused, "attention_with_lse", lambda *a: fused_calls.append(1) or fused_call(*a))
    o_proj = model.get_decoder().layers[layer].self_attn.o_proj
    hook = o_proj.register_forward_pre_hook(lambda m, a: outputs.append(a[0]))
    try:
        with torch.no_grad(), iv.apply(model, "act", beta=beta, threshold=threshold,
                                       heads=[[layer, h] for h in heads]) as handle:
            model(**inputs)
            assert handle.methods[0].sinks()[layer].any()  # the check is not vacuous
    finally:
        hook.remove()
    assert fused_calls == [1]  # the one calibrated layer took the fused path
    got = outputs[0].view(*expected.shape[:1], -1, *expected.shape[1:2], expected.shape[-1]).transpose(1, 2)
    rows = valid[:, None, :, None]
    torch.testing.assert_close(got.where(rows, 0), expected.where(rows, 0), atol=1e-10, rtol=0)


# ---- ACT on hand-built maps, through the method's own hooks -----------------------------------------------------
def _run_act_on_logits(logits: torch.Tensor, beta: float, threshold: float = 0.1, valid=None):
    """Drive `Act.request/observe/edit` on given (batch, heads, L, L) float64 logits; return the edited probabilities."""
    batch, heads, length, _ = logits.shape
    valid = torch.ones(batch, length, dtype=torch.bool) if valid is None else valid
    act = Act(ActConfig(beta=beta, threshold=threshold, layers=[0]))
    act.attach(ModelInfo("test", num_layers=1, num_heads=heads, num_kv_heads=heads, has_images=False))
    roles = TokenRoles(valid, torch.zeros_like(valid), torch.zeros_like(valid), length)
    act.start_sequence(roles)
    call = AttentionCall(0, roles, torch.arange(length))
    request = act.request(call)
    view = RowLogits(logits.clone(), _allowed(valid)[:, None], torch.arange(heads), torch.arange(length))
    if request.observe:  # as the core does: every row is observed before the first edit
        act.observe(call, view, request)
    act.edit(call, view, request)
    return view.probs(), act


def _logits_from_probs(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.clamp_min(1e-300))


def test_act_column_score_first_sink_and_late_column():
    # 4 tokens; key 0 and key 2 get high column means; the last column's score is its one row's self-attention
    p = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.3, 0.1, 0.6, 0], [0.25, 0.05, 0.5, 0.2]],
                     dtype=torch.float64)
    probs, act = _run_act_on_logits(_logits_from_probs(p)[None, None], beta=0.5, threshold=0.15)
    detected = act.sinks(calibrated=False)[0][0, 0].tolist()
    assert detected == [True, True, True, True]  # c = [0.5125, 0.2167, 0.55, 0.2]; c_3 = A_33 = 0.2
    assert act.sinks()[0][0, 0].tolist() == [False, True, True, True]  # the first detected sink (BOS) is kept
    # row 3: sinks {1, 2, 3} have m = 0.75; sinks -> beta·A, key 0 -> A·(1-beta·m)/(1-m)
    expected = torch.tensor([0.25 * (1 - 0.5 * 0.75) / 0.25, 0.025, 0.25, 0.1], dtype=torch.float64)
    torch.testing.assert_close(probs[0, 0, 3], expected, atol=1e-12, rtol=0)
    assert abs(float(probs[0, 0, 3].sum()) - 1) < 1e-12


def test_act_bos_below_threshold_drops_earliest_other_sink():
    p = torch.tensor([[1.0, 0, 0], [0.05, 0.95, 0], [0.02, 0.5, 0.48]], dtype=torch.float64)
    _, act = _run_act_on_logits(_logits_from_probs(p)[None, None], beta=0.5, threshold=0.5)
    # c = [0.357, 0.725, 0.48]: BOS below threshold; sinks detected {1}; the earliest detected (1) is dropped
    assert act.sinks(calibrated=False)[0][0, 0].tolist() == [False, True, False]
    assert not act.sinks()[0].any()


def test_act_degenerate_row_and_not_static_log_beta():
    # row 2 puts all its mass on the calibrated sinks: left unchanged, no NaN
    p = torch.tensor([[1.0, 0, 0], [0.2, 0.8, 0], [0.0, 0.3, 0.7]], dtype=torch.float64)
    probs, act = _run_act_on_logits(_logits_from_probs(p)[None, None], beta=0.4, threshold=0.3)
    assert act.sinks()[0][0, 0].tolist() == [False, True, True]
    assert not probs.isnan().any()
    torch.testing.assert_close(probs[0, 0, 2], p[2], atol=1e-12, rtol=0)
    # row 1: m = 0.8 >= 0.5, so the static log(beta) shortcut would give 0.8·0.4/(1-0.6·0.8) = 0.615, ACT gives 0.32
    assert abs(float(probs[0, 0, 1, 1]) - 0.32) < 1e-12
    assert abs(float(probs[0, 0, 1, 0]) - 0.68) < 1e-12
