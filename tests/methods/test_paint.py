"""PAINT (shared/specs/head_perturbation.md §5, conformance 9): the dual-stream selection on a hand-built CLS row and,
in float64 end to end through tiny LLaVA / LLaVA-NeXT, against a direct implementation (eager vision attentions,
numpy quartiles, positions found by matching the image features the model inserts); the edited last rows against
the spec formula; the received-attention selection of CLS-less towers (Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM,
Gemma3) against eager attention weights and literal merge geometry; neutral / unwrap / KV cache / left padding on
every VLM family; errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import transformers
from capture import capture
from tiny_models import LLM_FAMILIES, VLM_FAMILIES, Prompt, build_model, make_inputs

import interventions as iv
from interventions.errors import ConfigError, InputError
from interventions.methods.paint.method import select_tokens


CLS_FAMILIES = ["llava", "llava_next"]
RECEIVED_FAMILIES = [f for f in VLM_FAMILIES if f not in CLS_FAMILIES]


def _vision_attentions(model) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules()
            if ("vision" in name or "visual" in name) and name.endswith(("self_attn", ".attn"))]


def _model(family: str, dtype=torch.float32):
    """The tiny model of `family` whose vision attention is sharpened (queries × 6), so that the few patches of the
    tiny images have IQR outliers; CLIP towers get 3 layers (their first and penultimate layers differ)."""
    base = build_model(family)
    config = base.config
    if family in CLS_FAMILIES:
        config.vision_config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = type(base)._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    with torch.no_grad():
        for attention in _vision_attentions(model):
            if hasattr(attention, "q_proj"):
                attention.q_proj.weight.mul_(6.0)
            else:  # Qwen's fused qkv: the query third
                attention.qkv.weight[: attention.qkv.out_features // 3].mul_(6.0)
    return model


def _inputs(model, family, prompts):
    inputs = make_inputs(model, family, prompts)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


PROMPTS = [Prompt(3, 4, seed=1), Prompt(6, 2, seed=2)]


# ---- the selection rule ----------------------------------------------------------------------------------------
def test_selection_on_a_synthetic_cls_row_matches_the_hand_computation():
    summary_scores = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 30]])
    local_scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4, 0.5, 0.95]])
    # Q1 = 2.75, Q3 = 6.25 (linear interpolation), IQR 3.5: the bound is 11.5, only 30 passes
    local, summary = select_tokens(local_scores, summary_scores, 0.25)
    assert summary[0].nonzero().flatten().tolist() == [7]
    assert local[0].nonzero().flatten().tolist() == [0]  # top 2 = {7, 0}, minus the summary token 7
    local, _ = select_tokens(local_scores, summary_scores, 0.5)
    assert local[0].nonzero().flatten().tolist() == [0, 2, 6]  # top 4 = {7, 0, 2, 6}
    # no outlier: an even spread has no summary token
    _, summary = select_tokens(local_scores, torch.arange(8.0)[None], 0.25)
    assert not summary.any()


def test_iqr_rule_equals_numpy_percentiles():
    scores = torch.rand(5, 576, generator=torch.Generator().manual_seed(3)) ** 4
    _, summary = select_tokens(scores, scores, 0.25)
    for row, flags in zip(scores.numpy(), summary, strict=True):
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        assert flags.numpy().tolist() == (row > q3 + 1.5 * (q3 - q1)).tolist()
    assert summary.any()


# ---- float64 conformance through the model -----------------------------------------------------------------------
def _reference_selection(model, inputs, local_ratio=0.25):
    """Direct implementation: eager vision attentions (CLS row, summed over heads), numpy quartiles, numpy top-k;
    each LLM image position is traced to its (crop, patch) by matching the image feature the model inserts there
    against the projected penultimate-layer patch features."""
    inner = model.model
    vision_config = inner.vision_tower.config
    previous = vision_config._attn_implementation_internal
    vision_config._attn_implementation_internal = "eager"
    try:
        extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        with torch.no_grad():
            out = inner.get_image_features(inputs["pixel_values"], output_attentions=True, **extra)
            patches = inner.multi_modal_projector(out.hidden_states[-2][:, 1:])  # (crops, P, dim)
    finally:
        vision_config._attn_implementation_internal = previous
    first, penultimate = out.attentions[0][:, :, 0, 1:].sum(1), out.attentions[-2][:, :, 0, 1:].sum(1)
    crops, count = first.shape
    local = np.zeros((crops, count), bool)
    summary = np.zeros((crops, count), bool)
    for c in range(crops):
        row = penultimate[c].numpy()
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        summary[c] = row > q3 + 1.5 * (q3 - q1)
        top = np.argsort(-first[c].numpy(), kind="stable")[: int(count * local_ratio)]
        local[c, top] = True
        local[c] &= ~summary[c]
    features = torch.cat(list(out.pooler_output))  # in the order the model fills the image positions
    flat = patches.reshape(crops * count, -1)
    distance = torch.cdist(features, flat, compute_mode="donot_use_mm_for_euclid_dist")
    source = torch.where(distance.min(1).values < 1e-12, distance.argmin(1), -1)  # -1: a newline feature
    image = inputs["input_ids"] == model.config.image_token_id
    expected = []
    for flags in (local, summary):
        mask = torch.zeros_like(image)
        picked = torch.tensor(flags.reshape(-1))[source.clamp_min(0)] & (source >= 0)
        mask[image.nonzero(as_tuple=True)] = picked
        expected.append(mask)
    return expected, source


_RECORDED: list[tuple[torch.nn.Module, torch.Tensor]] = []


def _eager_recording(module, query, key, value, attention_mask, **kwargs):
    """The vision module's own eager attention, keeping its probabilities."""
    out, weights = sys.modules[type(module).__module__].eager_attention_forward(
        module, query, key, value, attention_mask, **kwargs)
    _RECORDED.append((module, weights))
    return out, weights


transformers.AttentionInterface.register("test_paint_eager", _eager_recording)


def _received_reference(model, family, inputs, local_ratio=0.25):
    """Direct implementation for CLS-less towers: eager probabilities of the first and last vision attention
    modules, summed over heads and averaged over query rows; patches summed onto LLM tokens by the literal merge
    geometry (Qwen: 4 consecutive patches, Qwen2.5-VL then un-permuted by matching the merger's outputs;
    Idefics3: s × s blocks; Gemma3: k × k blocks); numpy quartiles and top-k per image or crop."""
    vision_inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "pixel_attention_mask",
                                                              "image_grid_thw")}
    config = model.config.vision_config
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = "test_paint_eager"
    _RECORDED.clear()
    try:
        with torch.no_grad():
            out = model.model.get_image_features(**vision_inputs)
    finally:
        config._attn_implementation_internal = previous
    attentions = _vision_attentions(model)
    per_layer = []
    for module in (attentions[0], attentions[-1]):
        calls = [w.sum(1).mean(1) for m, w in _RECORDED if m is module]  # (n, keys) per call
        per_layer.append(torch.cat([c.flatten() for c in calls]) if family.startswith("qwen") else torch.cat(calls))
    units = []
    for scores in per_layer:
        if family.startswith("qwen"):
            tokens = scores.view(-1, 4).sum(-1)
            if family == "qwen2_5_vl":  # the tower holds merge units in window order: match the merger's outputs
                visual = model.model.visual
                with torch.no_grad():
                    result = visual(vision_inputs["pixel_values"], grid_thw=vision_inputs["image_grid_thw"])
                    windowed = visual.merger(result.last_hidden_state)
                order = torch.cdist(result.pooler_output, windowed).argmin(1)
                assert sorted(order.tolist()) == list(range(len(order)))
                tokens = tokens[order]
            counts = (vision_inputs["image_grid_thw"].prod(-1) // 4).tolist()
            units.append(list(tokens.split(counts)))
        else:
            side = int(scores.shape[1] ** 0.5)
            block = (model.model.connector.scale_factor if family in ("idefics3", "smolvlm")
                     else side // int(model.config.mm_tokens_per_image ** 0.5))
            grid = scores.view(-1, side // block, block, side // block, block)
            units.append(list(grid.sum((2, 4)).flatten(1)))
    local_flags, summary_flags = [], []
    for local_scores, summary_scores in zip(*units, strict=True):
        row = summary_scores.numpy()
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        summary = row > q3 + 1.5 * (q3 - q1)
        local = np.zeros_like(summary)
        local[np.argsort(-local_scores.numpy(), kind="stable")[: int(len(row) * local_ratio)]] = True
        local_flags.append(local & ~summary)
        summary_flags.append(summary)
    image = inputs["input_ids"] == model.config.image_token_id
    expected = []
    for flags in (local_flags, summary_flags):
        mask = torch.zeros_like(image)
        mask[image.nonzero(as_tuple=True)] = torch.tensor(np.concatenate(flags))
        expected.append(mask)
    return expected


def _softmax(z, valid):
    length = valid.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
    return torch.softmax(z.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)


@pytest.mark.parametrize("family, alpha, beta", [("llava", 0.7, 0.4), ("llava_next", 2.0, 0.3)])
def test_selection_and_edited_rows_equal_the_direct_implementation_fp64(family, alpha, beta):
    model = _model(family, torch.float64)
    inputs = _inputs(model, family, PROMPTS)
    (local, summary), source = _reference_selection(model, inputs)
    assert local.any() and summary.any() and not (local & summary).any()  # the check is not vacuous
    if family == "llava_next":
        assert (source == -1).any() and source.max() >= 16  # newline features and grid crops are covered
    layer = 1
    captured = capture(model, inputs)[layer]
    valid = inputs["attention_mask"].bool()
    z = captured["q"] @ captured["k"].transpose(-1, -2) * captured["scaling"]
    plain = _softmax(z.clone(), valid)
    gain = alpha * local.double() + beta * summary.double()
    z[:, :, -1] += gain[:, None, :] * z[:, :, -1].abs()  # spec §5.2 on the last row, every head
    expected = _softmax(z, valid)
    with torch.no_grad(), iv.apply(model, "paint", alpha=alpha, beta=beta, start_layer=layer) as handle:
        got = model(**inputs, output_attentions=True).attentions
        selected = handle.methods[0].selection()
    assert torch.equal(selected[0], local) and torch.equal(selected[1], summary)
    rows = valid[:, None, :, None]
    torch.testing.assert_close(got[layer].where(rows, 0), expected.where(rows, 0), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[layer][:, :, :-1].where(rows[:, :, :-1], 0), plain[:, :, :-1].where(
        rows[:, :, :-1], 0), atol=1e-12, rtol=0)  # only the last row changes
    assert not torch.allclose(got[layer][:, :, -1], plain[:, :, -1], atol=1e-3)


@pytest.mark.parametrize("family", RECEIVED_FAMILIES)
def test_received_attention_selection_equals_the_direct_implementation_fp64(family):
    model = _model(family, torch.float64)
    inputs = _inputs(model, family, PROMPTS)
    local, summary = _received_reference(model, family, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    assert local.any() and not (local & summary).any() and not ((local | summary) & ~image).any()
    with torch.no_grad(), iv.apply(model, "paint", alpha=0.7, beta=0.4, start_layer=1) as handle:
        edited = model(**inputs).logits
        selected = handle.methods[0].selection()
    assert torch.equal(selected[0], local) and torch.equal(selected[1], summary)
    with torch.no_grad():
        assert not torch.allclose(edited[:, -1], model(**inputs).logits[:, -1], atol=1e-6)


def test_received_attention_selection_finds_summary_tokens():
    """The IQR rule is not vacuous on the sharpened tiny towers: some family has summary tokens."""
    found = {}
    for family in RECEIVED_FAMILIES:
        model = _model(family, torch.float64)
        found[family] = int(_received_reference(model, family, _inputs(model, family, PROMPTS))[1].sum())
    assert sum(found.values()) > 0, found


# ---- shared properties -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_neutral_and_unwrap_are_bit_identical(family):
    model = _model(family)
    inputs = _inputs(model, family, PROMPTS)
    layers = _vision_attentions(model)
    with torch.no_grad():
        reference = model(**inputs).logits
        with iv.apply(model, "paint", alpha=0.0, beta=0.0, start_layer=1):
            assert torch.equal(model(**inputs).logits, reference)
            assert not any(layer._forward_pre_hooks for layer in layers)  # nothing installed
        for params in ({"alpha": 0.0, "beta": 0.5}, {"alpha": 0.5, "beta": 0.0}):  # either boost alone edits
            with iv.apply(model, "paint", start_layer=1, **params) as handle:
                edited = model(**inputs).logits
                if params["alpha"] == 0 and not handle.methods[0].selection()[1].any():
                    continue  # no summary token in these tiny images: beta has nothing to boost
                assert not torch.allclose(edited, reference, atol=1e-4)
        assert torch.equal(model(**inputs).logits, reference)
    assert not any(layer._forward_pre_hooks for layer in layers)


# ---- errors --------------------------------------------------------------------------------------------------------
def test_llm_raises():
    with pytest.raises(ConfigError, match="paint needs image tokens.*text-only"):
        iv.wrap(build_model(LLM_FAMILIES[0]), "paint")


def test_llava_with_a_siglip_tower_raises_and_stays_untouched():
    config = build_model("llava").config
    config.vision_config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=16, patch_size=4)
    model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    with pytest.raises(ConfigError, match="paint: .*CLIP vision tower.*'siglip_vision_model'"):
        iv.wrap(model, "paint")
    assert model.get_decoder().config._attn_implementation == "sdpa"
    assert "generate" not in vars(model) and not model._forward_pre_hooks
    iv.wrap(model, "pai").unwrap()  # not left marked as wrapped


def test_images_encoded_outside_the_wrapper_raise_instead_of_reusing_another_selection():
    model = _model("llava")
    inputs = _inputs(model, "llava", PROMPTS)
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"])  # before wrapping: no scores were seen
        plain = {k: v for k, v in inputs.items() if k != "pixel_values"}
        with iv.apply(model, "paint", start_layer=1):
            model(**inputs)  # a selection exists now, for a different vision pass
            with pytest.raises(InputError, match="not encoded by a vision-tower pass this wrapper saw"):
                model(**plain, mm_encoder_outputs={"image": encoded})
