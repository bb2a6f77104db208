"""VHR (shared/specs/vhr.md) against a direct float64 reference (1e-6: RoPE tables are float32): two explicit forwards of the unwrapped model per
sample (the prompt without its image, then with it), with the paper's rule written out literally in `o_proj`
pre-hooks (VHD, joint mean + 1·std outlier zeroing, strictly above the median, scaling layer by layer); every VLM
family. The shared properties (neutral, unwrap, KV cache = recompute, left-padded batch = single runs) run for
`vhr` in tests/methods/test_properties.py."""

from __future__ import annotations

import functools
import math
import statistics

import pytest
import torch
from tiny_models import VLM_FAMILIES, Prompt, build_model, make_inputs

import interventions as iv
from interventions.families import resolve
from interventions.methods.vhr import preset_layers

ALPHA = 2.0
LAYERS = (0, 1, 2)
PROMPTS = [Prompt(3, 4, seed=1), Prompt(6, 2, seed=2)]


@functools.cache
def _model(family: str):
    return build_model(family, dtype=torch.float64)


def _single(model, family: str, prompt: Prompt) -> tuple[dict, torch.Tensor]:
    """The inputs of one prompt, and its tokens without image placeholders and image boundary markers."""
    single = make_inputs(model, family, [prompt])
    ids = single["input_ids"][0]
    adapter = resolve(model)
    drop = torch.isin(ids, torch.tensor(adapter.image_token_ids(model) + adapter.boundary_token_ids(model)))
    return single, ids[~drop][None]


def _o_proj(model, layer: int):
    return model.get_decoder().layers[layer].self_attn.o_proj


def _heads(x: torch.Tensor, model) -> torch.Tensor:
    return x.view(*x.shape[:-1], model.config.get_text_config().num_attention_heads, -1)


@torch.no_grad()
def reference(model, family: str, with_image: dict, no_image: torch.Tensor, layers=LAYERS):
    """Literal spec §3.3 for one sample: returns `({layer: selected head indices}, {layer: [VHD]}, logits)`."""
    plain, hooks = {}, []
    for layer in layers:
        def record(module, args, layer=layer):
            plain[layer] = _heads(args[0], model)[0, -1].clone()
        hooks.append(_o_proj(model, layer).register_forward_pre_hook(record))
    try:
        model(input_ids=no_image)
    finally:
        for hook in hooks:
            hook.remove()

    selected, vhds, hooks = {}, {}, []
    for layer in layers:
        def reinforce(module, args, layer=layer):
            out = _heads(args[0], model)
            last = out[0, -1]
            vhd = [float(torch.linalg.vector_norm(last[h] - plain[layer][h])) for h in range(last.shape[0])]
            ta = [float(plain[layer][h].pow(2).sum()) for h in range(last.shape[0])]
            high_vhd = statistics.mean(vhd) + statistics.stdev(vhd)
            high_ta = statistics.mean(ta) + statistics.stdev(ta)
            score = [0.0 if v > high_vhd and t > high_ta else v for v, t in zip(vhd, ta)]
            median = statistics.median(score)
            heads = [h for h, s in enumerate(score) if s > median]
            selected[layer], vhds[layer] = heads, vhd
            out = out.clone()
            out[:, :, heads] *= ALPHA
            return (out.flatten(-2),)
        hooks.append(_o_proj(model, layer).register_forward_pre_hook(reinforce))
    try:
        logits = model(**with_image).logits
    finally:
        for hook in hooks:
            hook.remove()
    return selected, vhds, logits


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_selected_heads_match_the_literal_rule_in_float64(family):
    model = _model(family)
    inputs = make_inputs(model, family, PROMPTS)
    with torch.no_grad(), iv.apply(model, "vhr", alpha=ALPHA, layers=list(LAYERS)) as handle:
        logits = model(**inputs).logits
        vhr = handle.methods[0]
        got_heads, got_vhd = vhr.selected_heads(), vhr.divergence()
    assert set(got_heads) == set(LAYERS)
    for sample in range(len(PROMPTS)):
        single, no_image = _single(model, family, PROMPTS[sample])
        heads, vhd, ref_logits = reference(model, family, single, no_image)
        for layer in LAYERS:
            assert got_heads[layer][sample].nonzero().flatten().tolist() == heads[layer], (sample, layer)
            torch.testing.assert_close(got_vhd[layer][sample], torch.tensor(vhd[layer], dtype=torch.float64),
                                       atol=1e-6, rtol=1e-6)
        width = ref_logits.shape[1]
        torch.testing.assert_close(logits[sample, -width:], ref_logits[0], atol=1e-6, rtol=1e-6)


def test_layer_by_layer_vs_upfront_selection():
    """Spec conformance 5: reinforcing layer l changes what layer l+1 selects from; upfront selection reads the
    unreinforced stream (the reference with every head set of the earlier layers left out)."""
    family = "llava"
    model = _model(family)
    single, no_image = _single(model, family, PROMPTS[0])
    with torch.no_grad():
        vhd_plain = {layer: reference(model, family, single, no_image, layers=(layer,))[1][layer] for layer in LAYERS}
        with iv.apply(model, "vhr", alpha=ALPHA, layers=list(LAYERS), selection="all_layers_upfront") as handle:
            model(**single)
            upfront = handle.methods[0].divergence()
        with iv.apply(model, "vhr", alpha=ALPHA, layers=list(LAYERS)) as handle:
            model(**single)
            layered = handle.methods[0].divergence()
    for layer in LAYERS:
        torch.testing.assert_close(upfront[layer][0], torch.tensor(vhd_plain[layer], dtype=torch.float64))
    torch.testing.assert_close(layered[0], upfront[0])  # nothing precedes the first layer
    assert not torch.allclose(layered[2], upfront[2], atol=1e-6)


def test_reinforce_noimage_stream_is_exact_lock_step():
    """The flag's reference: for each layer in order, both streams recomputed with every earlier head set applied."""
    family = "llava"
    model = _model(family)
    single, no_image = _single(model, family, PROMPTS[1])
    expected: dict[int, list[int]] = {}
    with torch.no_grad():
        for layer in LAYERS:
            expected[layer] = _lock_step_layer(model, single, no_image, dict(expected), layer)
        with iv.apply(model, "vhr", alpha=ALPHA, layers=list(LAYERS), reinforce_noimage_stream=True) as handle:
            model(**single)
            got = handle.methods[0].selected_heads()
    assert {layer: got[layer][0].nonzero().flatten().tolist() for layer in LAYERS} == expected


def _lock_step_layer(model, single, no_image, earlier: dict[int, list[int]], layer: int) -> list[int]:
    """Selection of `layer` with the head sets of the earlier layers applied to both streams."""
    plain, hooks = {}, []

    def fixed(module, args, layer_index):
        out = _heads(args[0], model).clone()
        if layer_index == layer:
            plain["out"] = out[0, -1].clone()
        out[:, :, earlier.get(layer_index, [])] *= ALPHA
        return (out.flatten(-2),)

    for index in LAYERS:
        hooks.append(_o_proj(model, index).register_forward_pre_hook(functools.partial(fixed, layer_index=index)))
    try:
        model(input_ids=no_image)
    finally:
        for hook in hooks:
            hook.remove()
    no_image_out = plain["out"]
    hooks = []
    for index in LAYERS:
        hooks.append(_o_proj(model, index).register_forward_pre_hook(functools.partial(fixed, layer_index=index)))
    try:
        model(**single)
    finally:
        for hook in hooks:
            hook.remove()
    with_image_out = plain["out"]
    vhd = torch.linalg.vector_norm(with_image_out - no_image_out, dim=-1).tolist()
    ta = no_image_out.pow(2).sum(-1).tolist()
    high_vhd, high_ta = statistics.mean(vhd) + statistics.stdev(vhd), statistics.mean(ta) + statistics.stdev(ta)
    score = [0.0 if v > high_vhd and t > high_ta else v for v, t in zip(vhd, ta)]
    return [h for h, s in enumerate(score) if s > statistics.median(score)]


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_neutral_skips_the_no_image_pass(family):
    model = build_model(family)
    inputs = make_inputs(model, family, PROMPTS)
    calls = []
    counter = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            reference_logits = model(**inputs).logits
            with iv.apply(model, "vhr", alpha=1.0) as handle:
                assert torch.equal(model(**inputs).logits, reference_logits)
                assert handle.methods[0].branches == ()
            assert len(calls) == 2
            with iv.apply(model, "vhr", alpha=ALPHA):
                model(**inputs)
            assert len(calls) == 4  # one extra (no-image) forward
    finally:
        counter.remove()


def test_head_sets_are_kept_for_decoding_and_scale_every_position():
    """Spec conformance 6: the head sets of step 0 scale every prefill position and every decode step."""
    family = "llava"
    model = build_model(family)
    inputs = make_inputs(model, family, PROMPTS)
    seen = []
    with torch.no_grad(), iv.apply(model, "vhr", alpha=ALPHA, layers=[2]) as handle:
        vhr = handle.methods[0]
        original = vhr._scale

        def spy(out, heads):
            seen.append((out.shape[1], heads.clone()))
            return original(out, heads)

        vhr._scale = spy
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert [rows for rows, _ in seen] == [inputs["input_ids"].shape[1], 1, 1]
    assert all(torch.equal(heads, seen[0][1]) for _, heads in seen)


def test_preset_layers():
    from interventions.methods.base import ModelInfo

    info = functools.partial(ModelInfo, num_heads=32, num_kv_heads=32, has_images=True)
    assert preset_layers(info("llava", 32)) == [1, *range(18, 32)]
    assert preset_layers(info("llava_next", 32)) == [1, *range(18, 32)]
    assert preset_layers(info("qwen2_vl", 28)) == [1, *range(28 - math.ceil(0.44 * 28), 28)]


def test_errors():
    model = build_model("llama")
    with pytest.raises(ValueError, match="vhr needs image tokens"):
        iv.wrap(model, "vhr")
    llava = build_model("llava")
    with pytest.raises(ValueError, match="reinforce_noimage_stream=True needs selection='layer_by_layer'"):
        iv.wrap(llava, "vhr", reinforce_noimage_stream=True, selection="all_layers_upfront")
    with pytest.raises(ValueError, match=r"vhr: layers=\[7\] out of range"):
        iv.wrap(llava, "vhr", layers=[7])


def test_eager_and_sdpa_give_the_same_head_sets():
    """Spec conformance 9 (float32, 1e-5): VHR reads head outputs, so the base backend does not matter."""
    family = "llava"
    model = build_model(family)
    inputs = make_inputs(model, family, PROMPTS)
    config = model.get_decoder().config
    runs = []
    for backend in ("sdpa", "eager"):
        config._attn_implementation_internal = backend
        with torch.no_grad(), iv.apply(model, "vhr", alpha=ALPHA, layers=list(LAYERS)) as handle:
            runs.append((model(**inputs).logits, handle.methods[0].selected_heads()))
    config._attn_implementation_internal = "sdpa"
    (sdpa_logits, sdpa_heads), (eager_logits, eager_heads) = runs
    assert all(torch.equal(sdpa_heads[layer], eager_heads[layer]) for layer in LAYERS)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(eager_logits[valid], sdpa_logits[valid], atol=1e-5, rtol=1e-5)
