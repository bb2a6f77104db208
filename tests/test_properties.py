"""Shared properties of every (method, family) case, on tiny random-initialised models of the real HF classes:
neutral = bit-identical, unwrap = bit-identical, KV-cache decode = full recompute, left-padded batch = single runs,
untouched layers dispatch to the base backend."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import LLM_FAMILIES, VLM_FAMILIES, Prompt, build_model, make_inputs

import interventions as iv
from interventions.core import attention

#: (case id, stack, neutral stack) — stacks for the tiny 3-layer models
VLM_CASES = {
    "pai": ([("pai", {"alpha": 0.5, "start_layer": 1})], [("pai", {"alpha": 0.0, "start_layer": 1})]),
    "act": ([("act", {"beta": 0.3, "threshold": 0.05, "layers": [0, 1, 2]})],
            [("act", {"beta": 1.0, "threshold": 0.05, "layers": [0, 1, 2]})]),
    "pai+act": (
        [("pai", {"alpha": 0.5}), ("act", {"beta": 0.3, "heads": [[0, 1], [1, 0], [1, 3], [2, 2]]})],
        [("pai", {"alpha": 0.0}), ("act", {"beta": 1.0, "heads": [[0, 1]]})],
    ),
    "vhr": ([("vhr", {"alpha": 2.0, "layers": [0, 1, 2]})], [("vhr", {"alpha": 1.0})]),
    "pai-cfg": ([("pai", {"alpha": 0.5, "start_layer": 1, "use_cfg": True, "gamma": 2.0})],
                [("pai", {"alpha": 0.0, "use_cfg": True, "gamma": 1.0})]),
    "pag": ([("pag", {"heads": [[0, 1], [1, 2], [2, 3]], "u": 1.0, "w": 2.0})], [("pag", {"heads": [[0, 1]], "w": 0.0})]),
}
LLM_CASES = {"act": VLM_CASES["act"], "act-heads": ([("act", {"beta": 0.0, "heads": [[1, 1], [2, 3]]})], None),
             "pag": VLM_CASES["pag"]}
CASES = [(f, c) for f in VLM_FAMILIES for c in VLM_CASES] + [(f, c) for f in LLM_FAMILIES for c in LLM_CASES]


@functools.cache
def _model(family: str):
    return build_model(family)


def _stacks(family: str, case: str):
    return (VLM_CASES if family in VLM_FAMILIES else LLM_CASES)[case]


def _prompts(family: str) -> list[Prompt]:
    image = family in VLM_FAMILIES
    return [Prompt(3, 4, seed=1, image=image), Prompt(6, 2, seed=2, image=image)]


@torch.no_grad()
def _logits(model, inputs):
    return model(**inputs).logits


@pytest.mark.parametrize("family, case", CASES)
def test_neutral_and_unwrap_are_bit_identical(family, case):
    model = _model(family)
    stack, neutral = _stacks(family, case)
    inputs = make_inputs(model, family, _prompts(family))
    reference = _logits(model, inputs)
    if neutral is not None:
        with iv.apply(model, neutral):
            assert torch.equal(_logits(model, inputs), reference)
    with iv.apply(model, stack):
        changed = _logits(model, inputs)
    assert not torch.allclose(changed, reference, atol=1e-4)
    assert torch.equal(_logits(model, inputs), reference)


@pytest.mark.parametrize("family, case", CASES)
def test_kv_cache_decode_equals_full_recompute(family, case):
    model = _model(family)
    stack, _ = _stacks(family, case)
    inputs = make_inputs(model, family, _prompts(family))
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), iv.apply(model, stack):
        cached = model.generate(**inputs, **kwargs)
        full = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, case", CASES)
def test_left_padded_batch_equals_single_runs(family, case):
    model = _model(family)
    stack, _ = _stacks(family, case)
    prompts = _prompts(family)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad(), iv.apply(model, stack):
        batch = model.generate(**make_inputs(model, family, prompts), **kwargs)
        width = batch.sequences.shape[1]
        for i, prompt in enumerate(prompts):
            single = model.generate(**make_inputs(model, family, [prompt]), **kwargs)
            assert torch.equal(single.sequences[0], batch.sequences[i, width - single.sequences.shape[1]:])
            for a, b in zip(single.logits, batch.logits):
                torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", VLM_FAMILIES + LLM_FAMILIES)
def test_untouched_layers_dispatch_to_base_backend(family):
    model = _model(family)
    inputs = make_inputs(model, family, _prompts(family)[:1])
    stack = [("pai", {"alpha": 0.5, "start_layer": 2})] if family in VLM_FAMILIES else [("act", {"layers": [2]})]
    with torch.no_grad(), iv.apply(model, stack):
        before = dict(attention.DISPATCH_COUNTS)
        model(**inputs)
        after = attention.DISPATCH_COUNTS
    assert after["edited"] - before["edited"] == 1  # layer 2 only
    assert after["base"] - before["base"] == 2  # layers 0 and 1 went straight to SDPA


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_tower_never_enters_the_intervened_function(family, monkeypatch):
    model = _model(family)
    inputs = make_inputs(model, family, _prompts(family)[:1])
    calls = []
    original = attention.intervened_attention

    def spy(module, *args, **kwargs):
        calls.append(module)
        return original(module, *args, **kwargs)

    monkeypatch.setitem(attention.AttentionInterface._global_mapping, attention.KEYS["sdpa"], spy)
    from interventions.families import resolve

    text = {id(m) for _, m in resolve(model).attention_modules(model)}
    with torch.no_grad(), iv.apply(model, "pai", alpha=0.5):
        model(**inputs)
    seen = {id(m) for m in calls}
    assert seen == text  # every text layer, and nothing else (no vision-tower attention)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_beam_and_num_return_sequences_expansion(family):
    model = _model(family)
    prompts = _prompts(family)
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad(), iv.apply(model, "pai", alpha=0.5, start_layer=1) as handle:
        batch = model.generate(**make_inputs(model, family, prompts), **kwargs)
        roles = handle.roles
        assert roles.batch_size == 4  # 2 prompts × 2 beams, expanded before prefill
        spans = [roles.image_spans(i) for i in range(4)]
        assert spans[0] == spans[1] and spans[2] == spans[3] and spans[0] != spans[2]
        width = batch.shape[1]
        for i, prompt in enumerate(prompts):
            single = model.generate(**make_inputs(model, family, [prompt]), **kwargs)
            assert torch.equal(single, batch[2 * i:2 * i + 2, width - single.shape[1]:])
