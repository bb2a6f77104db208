"""VAR (shared/specs/var.md): the sink test, the toy-row formulas of the paper and of the official code, fp64
conformance of the edited rows against a literal implementation of §3 end to end through every tiny VLM family
(prefill, cached decode and no-cache recompute), and the shared properties (neutral, KV cache, left padding).

The tiny models have no massive activations (hidden size 64 bounds |x_d|/RMS(x) by 8), so the tests use 16 sink
dims and a tau that flags about a quarter of the tokens, checked to include image and text tokens.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from capture import capture, record_row_blocks
from tiny_models import (
    FIRST_TEXT_ID,
    LLM_FAMILIES,
    VLM_FAMILIES,
    Prompt,
    build_model,
    make_inputs,
)

import interventions as iv
from interventions.core import attention
from interventions.core.roles import TokenRoles
from interventions.core.rows import RowLogits
from interventions.errors import ConfigError
from interventions.methods.base import AttentionCall, ModelInfo
from interventions.methods.var import Var, VarConfig, sink_scores

DIMS = list(range(16))
LAYER = 1  # the conformance layer: the first edited one, so its inputs do not depend on VAR's own edits
LAYERS = [LAYER, 2]


def plain_probs(captured: dict) -> torch.Tensor:
    """Unmodified attention `(batch, heads, L, L)` from captured q, k and the model's own mask."""
    q, k = captured["q"], captured["k"]
    z = q @ k.transpose(-1, -2) * captured["scaling"]
    mask = captured["mask"]
    if mask is None:
        mask = torch.ones(z.shape[-2:], dtype=torch.bool).tril()
    return torch.softmax(z.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)


# ---- the literal reference (spec §3 steps A-D; §4 for the official code) ----------------------------------------
def phi_reference(hidden: torch.Tensor, dims) -> torch.Tensor:
    x = hidden.double()
    rms = torch.sqrt((x * x).mean(-1) + 1e-6)
    return torch.stack([x[..., d].abs() / rms for d in dims]).amax(0)


def var_reference(a, hidden, valid, image, dims, tau, p, rho, summ=0.2, official=False, prompt_len=None):
    """Post-softmax VAR on every text row after the first image token, per (sample, head, row), with loops."""
    phi = phi_reference(hidden, dims)
    sink = (phi > tau if official else phi >= tau) & valid
    if official:
        sink[:, prompt_len:] = False
    out = a.clone()
    batch, heads, length, _ = a.shape
    for b in range(batch):
        image_pos = image[b].nonzero().flatten()
        sinks = sink[b].nonzero().flatten()
        vis_sinks = (image[b] & sink[b]).nonzero().flatten()
        vis_non_sinks = (image[b] & ~sink[b]).nonzero().flatten()
        for i in range(int(image_pos[0]) + 1, length):
            if not valid[b, i] or image[b, i]:
                continue
            for h in range(heads):
                row = a[b, h, i]
                s_vis, s_ns = row[image_pos].sum(), row[vis_non_sinks].sum()
                if official:
                    ok = len(vis_sinks) > 0 and row[vis_sinks].sum() / (s_vis + 1e-6 * len(image_pos)) <= 1 - rho
                else:
                    ok = s_vis > 0 and s_ns / s_vis >= rho
                if not (ok and s_vis >= summ and s_ns > 0):
                    continue
                omega = p * row[sinks].sum()
                out[b, h, i, sinks] = (1 - p) * row[sinks]
                out[b, h, i, vis_non_sinks] = row[vis_non_sinks] + omega * row[vis_non_sinks] / s_ns
    return out, sink


# ---- tiny models and their tau ------------------------------------------------------------------------------------
@functools.cache
def _model(family: str, dtype: torch.dtype = torch.float32):
    return build_model(family, dtype=dtype)


def _prompts() -> list[Prompt]:
    return [Prompt(3, 4, seed=1), Prompt(6, 2, seed=2)]


def _inputs(model, family, prompts):
    inputs = make_inputs(model, family, prompts)
    return {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _split(values: torch.Tensor) -> float:
    """A threshold in the widest gap of the middle half of `values`, so that some fall on each side."""
    s = values.sort().values
    lo, hi = len(s) // 4, 3 * len(s) // 4
    k = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    return float(s[k] + s[k + 1]) / 2


@functools.cache
def _tau(family: str) -> float:
    """A tau flagging an eighth to three eighths of the valid tokens at `LAYER` (in a wide gap of the scores)."""
    model = _model(family)
    inputs = _inputs(model, family, _prompts())
    phi = sink_scores(capture(model, inputs, hidden=True)[LAYER]["hidden"], DIMS)[inputs["attention_mask"].bool()]
    return _split(phi.sort(descending=True).values[: len(phi) // 2])


@functools.cache
def _rho(family: str, official: bool) -> float:
    """A rho splitting the candidate (head, row) pairs at `LAYER` into image-centric ones and others."""
    model = _model(family, torch.float64)
    inputs = _inputs(model, family, _prompts())
    captured = capture(model, inputs, hidden=True)[LAYER]
    a = plain_probs(captured)
    valid = inputs["attention_mask"].bool()
    image = inputs["input_ids"] == model.config.image_token_id
    phi = phi_reference(captured["hidden"], DIMS)
    sink = (phi > _tau(family) if official else phi >= _tau(family)) & valid
    s_vis = (a * image[:, None, None]).sum(-1)
    s_vis_sink = (a * (image & sink)[:, None, None]).sum(-1)
    if official:
        score = 1 - s_vis_sink / (s_vis + 1e-6 * image.sum(-1)[:, None, None])
    else:
        score = (a * (image & ~sink)[:, None, None]).sum(-1) / s_vis
    candidates = (valid & ~image & (image.long().cumsum(1) > 0))[:, None, :] & (s_vis >= 0.2)
    if official:  # the code selects nothing in a sample without visual sinks
        candidates &= (image & sink).any(1)[:, None, None]
    return _split(score[candidates])


def _params(family: str, **extra) -> dict:
    return {"sink_dims": DIMS, "tau": _tau(family), "layers": LAYERS, **extra}


# ---- the sink test --------------------------------------------------------------------------------------------------
def test_phi_is_rms_ratio_without_norm_weight_and_strictness_follows_compat():
    hidden = torch.tensor([[[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    rms = math.sqrt(25 / 4 + 1e-6)
    torch.testing.assert_close(sink_scores(hidden, (0,)), torch.tensor([[3 / rms, 1 / math.sqrt(1 + 1e-6)]],
                                                                       dtype=torch.float64), atol=1e-15, rtol=0)
    assert float(sink_scores(hidden, (0, 1))[0, 0]) == pytest.approx(4 / rms, abs=1e-15)
    tau = float(sink_scores(hidden, (0,))[0, 0])  # exactly at the threshold: >= flags it, the code's > does not
    roles = _toy_roles(2, image=[1], prompt_len=2)
    for compat, flagged in (("paper", True), ("official", False)):
        var = _toy_var(compat=compat, tau=tau, sink_dims=[0])
        var.start_sequence(roles)
        var.on_layer_input(0, hidden, roles)
        assert var.sinks()[0][0].tolist() == [flagged, False]


# ---- toy rows through the method's own hooks ------------------------------------------------------------------------
def _toy_roles(length: int, image: list[int], prompt_len: int) -> TokenRoles:
    valid = torch.ones(1, length, dtype=torch.bool)
    flags = torch.zeros(1, length, dtype=torch.bool)
    flags[0, image] = True
    return TokenRoles(valid, flags, torch.zeros_like(valid), prompt_len)


def _toy_var(**params) -> Var:
    var = Var(VarConfig(**{"sink_dims": [0], "tau": 2.5, "layers": [0], **params}))
    var.attach(ModelInfo("test", num_layers=1, num_heads=1, num_kv_heads=1, has_images=True))
    return var


def _massive(length: int, positions: list[int]) -> torch.Tensor:
    """Hidden states `(1, length, 8)` where `positions` have a massive channel 0 (phi = sqrt(8) > 2.5)."""
    hidden = torch.full((1, length, 8), 0.1, dtype=torch.float64)
    hidden[0, positions, 0] = 100.0
    return hidden


# 8 positions: BOS, 4 image tokens, 3 text rows; rows 5-7: selected / ratio below rho / visual mass below 0.2
TOY = torch.tensor([[0.25, 0.15, 0.10, 0.10, 0.05, 0.35, 0.00, 0.00],
                    [0.20, 0.05, 0.30, 0.05, 0.05, 0.15, 0.20, 0.00],
                    [0.50, 0.05, 0.02, 0.03, 0.05, 0.15, 0.10, 0.10]], dtype=torch.float64)


def _run_toy(var: Var, sinks: list[int], rows: torch.Tensor = TOY) -> torch.Tensor:
    length = rows.shape[-1]
    positions = torch.arange(length - rows.shape[0], length)
    roles = _toy_roles(length, image=[1, 2, 3, 4], prompt_len=length)
    var.start_sequence(roles)
    var.on_layer_input(0, _massive(length, sinks), roles)
    call = AttentionCall(0, roles, torch.arange(length))
    request = var.request(call)
    assert request.rows.tolist() == [False] * 5 + [True] * 3  # text rows after the image only
    allowed = (torch.arange(length)[None, :] <= positions[:, None]).view(1, 1, -1, length)
    view = RowLogits(torch.log(rows.clamp_min(1e-300))[None, None], allowed, torch.arange(1), positions)
    var.edit(call, view, request)
    return view.probs()[0, 0]


def test_toy_rows_paper_formula():
    got = _run_toy(_toy_var(p=0.6, rho=0.5), sinks=[0, 2])
    # row 5: S_vis = 0.4, S_ns = 0.3 (ratio 0.75), sinks {0, 2} hold 0.35 -> Omega = 0.21, non-sinks x 1.7
    expected = torch.tensor([0.1, 0.255, 0.04, 0.17, 0.085, 0.35, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(got[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1:], TOY[1:], atol=1e-12, rtol=0)  # ratio 1/3 < rho; visual mass 0.15 < 0.2
    torch.testing.assert_close(got.sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_toy_rows_official_code_formula():
    var = _toy_var(compat="official", rho=0.5)
    assert var.config.p == 0.4  # the code's `p: 0.6` keeps 0.6 of the sink attention
    got = _run_toy(var, sinks=[0, 2])
    # the released code: sinks *= 0.6; budget 0.4·(sum over sinks) to image non-sinks by their share
    row = TOY[0].clone()
    budget = 0.4 * (row[0] + row[2])
    expected = row.clone()
    expected[[0, 2]] *= 0.6
    non_sink = [1, 3, 4]
    expected[non_sink] += budget * row[non_sink] / row[non_sink].sum()
    torch.testing.assert_close(got[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1:], TOY[1:], atol=1e-12, rtol=0)


def test_layer_without_visual_sink_paper_uses_text_sinks_official_does_nothing():
    paper = _run_toy(_toy_var(p=0.6, rho=0.5), sinks=[0])
    # only BOS is a sink: ratio 1, Omega = 0.6·0.25 to the four image tokens in proportion
    row = TOY[0]
    expected = row.clone()
    expected[0] = 0.4 * row[0]
    expected[1:5] = row[1:5] * (1 + 0.15 / row[1:5].sum())
    torch.testing.assert_close(paper[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(_run_toy(_toy_var(compat="official"), sinks=[0]), TOY, atol=1e-12, rtol=0)


@pytest.mark.parametrize("compat, joins", [("paper", True), ("official", False)])
def test_generated_sink_joins_its_own_row_unless_frozen(compat, joins):
    var = _toy_var(compat=compat)
    roles = _toy_roles(6, image=[1, 2, 3, 4], prompt_len=6)
    var.start_sequence(roles)
    var.on_layer_input(0, _massive(6, [0]), roles)
    grown = _toy_roles(7, image=[1, 2, 3, 4], prompt_len=6)
    var.on_layer_input(0, _massive(1, [0]), grown)  # the generated token at position 6 has the massive channel
    assert var.sinks()[0][0].tolist() == [True] + [False] * 5 + [joins]


# ---- end to end, fp64, every VLM family ------------------------------------------------------------------------------
def _check_rows(got, a, hidden, inputs, family, rows_valid, **params):
    valid = inputs["attention_mask"].bool()
    image = inputs["input_ids"] == _model(family).config.image_token_id
    expected, sinks = var_reference(a, hidden, valid, image, DIMS, _tau(family), **params)
    rows = rows_valid[:, None, :, None]
    torch.testing.assert_close(got.where(rows, 0), expected.where(rows, 0), atol=1e-6, rtol=0)
    sums = got.sum(-1)[rows_valid[:, None, :].expand(-1, got.shape[1], -1)]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-12, rtol=0)
    # not vacuous: image and text sinks exist, and some (head, row) pairs change
    assert (sinks & image).any() and (sinks & ~image).any()
    changed = ((expected - a).abs() > 1e-9).any(-1)
    assert changed.any()
    candidates = rows_valid[:, None, :] & ~image[:, None, :] & (image.long().cumsum(1) > 0)[:, None, :]
    return expected, candidates & ~changed


@pytest.mark.parametrize("family", VLM_FAMILIES)
@pytest.mark.parametrize("p, compat", [(0.6, "paper"), (0.25, "paper"), (0.4, "official")])
def test_prefill_rows_equal_spec_formula_fp64(family, p, compat):
    rho = _rho(family, compat == "official")
    model = _model(family, torch.float64)
    inputs = _inputs(model, family, _prompts())
    captured = capture(model, inputs, hidden=True)[LAYER]
    a = plain_probs(captured)
    with torch.no_grad(), iv.apply(model, "var", **_params(family, p=p, rho=rho, compat=compat)):
        got = model(**inputs, output_attentions=True).attentions[LAYER]
    valid = inputs["attention_mask"].bool()
    _, unselected = _check_rows(got, a, captured["hidden"], inputs, family, valid, p=p, rho=rho,
                                official=compat == "official", prompt_len=valid.shape[1])
    assert unselected.any()  # rho splits the pairs: the test sees selected and unselected rows


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_decode_rows_equal_spec_formula_fp64_cached_and_recomputed(family):
    model = _model(family, torch.float64)
    inputs = _inputs(model, family, _prompts())
    kwargs = dict(max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True,
                  suppress_tokens=list(range(FIRST_TEXT_ID)))  # generated ids stay ordinary text, never image ids
    with torch.no_grad(), iv.apply(model, "var", **_params(family)):
        cached = model.generate(**inputs, **kwargs)
        full = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, full.sequences)
    sequence = {**inputs, "input_ids": cached.sequences[:, :-1],
                "attention_mask": torch.nn.functional.pad(inputs["attention_mask"], (0, 2), value=1)}
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            sequence[key] = torch.nn.functional.pad(inputs[key], (0, 2))
    captured = capture(model, sequence, hidden=True)[LAYER]
    valid = sequence["attention_mask"].bool()
    expected, _ = _check_rows(full.attentions[-1][LAYER], plain_probs(captured), captured["hidden"], sequence, family,
                           valid, p=0.6, rho=0.5)
    length = valid.shape[1]
    for step in (1, 2):  # each cached decode step's single row equals the recomputed row at that position
        row = cached.attentions[step][LAYER][:, :, 0]
        position = length - 3 + step
        torch.testing.assert_close(row, expected[:, :, position, :position + 1], atol=1e-6, rtol=0)


# ---- shared properties, fp32 ----------------------------------------------------------------------------------------
def test_only_text_rows_after_the_image_are_materialised(monkeypatch):
    family = "llava"
    model = _model(family)
    inputs = _inputs(model, family, _prompts())
    blocks = record_row_blocks(monkeypatch)
    with torch.no_grad(), iv.apply(model, "var", **_params(family)):
        before = dict(attention.DISPATCH_COUNTS)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        base = attention.DISPATCH_COUNTS["base"] - before["base"]
    # prefill: the 4 text rows after the image (union over the left-padded batch) of layers 1 and 2; then 1 row
    assert [(rows, heads) for rows, heads, _ in blocks] == [(4, 4), (4, 4), (1, 4), (1, 4)]
    assert base == 2  # layer 0 stays on SDPA at prefill and at the decode step


# ---- configuration errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_llm_family_raises_at_wrap(family):
    model = _model(family)
    with pytest.raises(ConfigError, match="var needs image tokens.*text-only"):
        iv.wrap(model, "var", sink_dims=[1], layers=[1])
    assert model.get_decoder().config._attn_implementation == "sdpa"


def test_missing_preset_tells_to_run_discovery_and_presets_match_by_shape():
    model = _model("llava")
    with pytest.raises(ConfigError, match="no sink_dims preset.*interventions calibrate sink-dims"):
        iv.wrap(model, "var", layers=[1])
    llava_7b = ModelInfo("llava", num_layers=32, num_heads=32, num_kv_heads=32, has_images=True)
    var = Var(VarConfig())
    var.attach(llava_7b)
    assert var.dims == (1415, 2533) and var.touched_layers == frozenset(range(2, 31))  # 2..L-2
    var = Var(VarConfig(compat="official"))
    var.attach(ModelInfo("qwen2_vl", num_layers=28, num_heads=28, num_kv_heads=4, has_images=True))
    assert var.dims == (458, 2570) and var.touched_layers == frozenset(range(2, 28))  # last layer included


def test_config_defaults_ranges_and_hidden_size_check():
    cfg = VarConfig(sink_dims=[3])
    assert (cfg.p, cfg.rho, cfg.tau, cfg.min_visual_mass) == (0.6, 0.5, 20.0, 0.2)
    assert [VarConfig(profile=name).rho for name in ("general", "vision")] == [0.8, 0.9]
    for bad, match in (({"p": 1.0}, "p=1.0"), ({"rho": 0.0}, "rho=0.0"), ({"compat": "code"}, "compat"),
                       ({"profile": "pope"}, "profile"), ({"sink_dims": [1, 1]}, "duplicates")):
        with pytest.raises(ConfigError, match=match):
            VarConfig(**bad)
    model = _model("llava")
    with pytest.raises(ConfigError, match="no layer to edit"):
        iv.wrap(model, "var", sink_dims=[1])  # 3 layers: the paper's 2..L-2 is empty
    inputs = _inputs(model, "llava", _prompts())
    with iv.apply(model, "var", sink_dims=[64], layers=[1]), pytest.raises(ConfigError, match="hidden size 64"):
        model(**inputs)
