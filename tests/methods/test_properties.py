"""The properties every (method, family) pair must have, in one table over all 11 methods, on tiny random-initialised
models of the real HF classes: neutral strength = bit-identical, unwrap = bit-identical, greedy (or seeded sampled)
`generate` with the KV cache = a no-cache full recompute, a left-padded batch = the single runs, and a family a method
cannot serve refused at wrap. Method-specific formulas are checked in each method's own test file."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tiny_models import LLM_FAMILIES, VLM_FAMILIES, Prompt, build_model, make_inputs
from tiny_processors import batch_inputs, prompt_inputs, random_image, shared_processor

import interventions as iv
from interventions.core import attention

ALL = VLM_FAMILIES + LLM_FAMILIES


@dataclass(frozen=True)
class Case:
    """One row of the table: an active stack, its neutral twins, where it applies, and how it runs."""

    stack: list
    #: stacks at neutral strength (a method may have several neutral forms)
    neutral: list | None
    families: tuple[str, ...] = tuple(VLM_FAMILIES)
    #: families the method refuses at wrap, with the error it gives
    refused: dict[str, str] = field(default_factory=dict)
    #: the method edits forwards (else only `generate`: a decoding loop)
    edits_forward: bool = True
    #: seeded top-k sampling instead of greedy decoding
    sample: bool = False
    #: wrap with the family's processor and build inputs with it
    processor: bool = False
    #: `generate` can return its scores (a method running each prompt of a batch alone returns sequences only)
    scores: bool = True


CASES: dict[str, Case] = {
    "act": Case([("act", {"beta": 0.3, "threshold": 0.05, "layers": [0, 1, 2]})],
                [[("act", {"beta": 1.0, "threshold": 0.05, "layers": [0, 1, 2]})]], ALL),
    "act-heads": Case([("act", {"beta": 0.0, "heads": [[1, 1], [2, 3]]})], None, tuple(LLM_FAMILIES)),
    "pai": Case([("pai", {"alpha": 0.5, "start_layer": 1})], [[("pai", {"alpha": 0.0, "start_layer": 1})]],
                refused={f: "pai needs image tokens" for f in LLM_FAMILIES}),
    "pai-cfg": Case([("pai", {"alpha": 0.5, "start_layer": 1, "use_cfg": True, "gamma": 2.0})],
                    [[("pai", {"alpha": 0.0, "use_cfg": True, "gamma": 1.0})]]),
    "pai+act": Case([("pai", {"alpha": 0.5}), ("act", {"beta": 0.3, "heads": [[0, 1], [1, 0], [1, 3], [2, 2]]})],
                    [[("pai", {"alpha": 0.0}), ("act", {"beta": 1.0, "heads": [[0, 1]]})]]),
    "var": Case([("var", {"sink_dims": list(range(16)), "tau": 2.0, "layers": [1, 2]})],
                [[("var", {"sink_dims": list(range(16)), "tau": 2.0, "layers": [1, 2], "p": 0.0})]],
                refused={f: "var needs image tokens" for f in LLM_FAMILIES}),
    "var-official": Case([("var", {"sink_dims": list(range(16)), "tau": 2.0, "layers": [1, 2], "compat": "official"})],
                         None),
    "gift": Case([("gift", {"saliency_layers": [0], "enhancement_layers": [1, 2], "alpha": 1.0})],
                 [[("gift", {"saliency_layers": [0], "enhancement_layers": [1, 2], "alpha": 0.0})]],
                 refused={f: "gift needs image tokens" for f in LLM_FAMILIES}),
    "gift-separate": Case([("gift", {"saliency_layers": [1], "enhancement_layers": [0, 1, 2], "alpha": 1.0})],
                          [[("gift", {"saliency_layers": [1], "enhancement_layers": [0, 1, 2], "alpha": 0.0})]]),
    "locore": Case([("locore", {"beta": 1.0, "apply_on_prefill_last_row": True})], [[("locore", {"beta": 0.0})]], ALL),
    "paint": Case([("paint", {"alpha": 1.0, "beta": 1.0, "start_layer": 1})],
                  [[("paint", {"alpha": 0.0, "beta": 0.0, "start_layer": 1})]],
                  refused={f: "paint needs image tokens" for f in LLM_FAMILIES}),
    "cca": Case([("cca", {})], [[("cca", {"enabled": False})],
                                [("cca", {"remap_positions": False, "concentric_mask": False})]],
                tuple(f for f in VLM_FAMILIES if f not in ("qwen2_vl", "qwen2_5_vl")),
                refused={"qwen2_vl": "M-RoPE", "qwen2_5_vl": "M-RoPE",
                         **{f: "cca needs image tokens" for f in LLM_FAMILIES}}),
    "vhr": Case([("vhr", {"alpha": 2.0, "layers": [0, 1, 2]})], [[("vhr", {"alpha": 1.0})]],
                refused={f: "vhr needs image tokens" for f in LLM_FAMILIES}),
    "pag": Case([("pag", {"heads": [[0, 1], [1, 2], [2, 3]], "u": 1.0, "w": 2.0})],
                [[("pag", {"heads": [[0, 1]], "w": 0.0})], [("pag", {"heads": [[0, 1]], "u": 0.0})]], ALL),
    # the neutral twin draws from torch's global generator, as transformers' own sampling does (seed=None)
    "sgrs": Case([("sgrs", {"alpha": 1.0})], [[("sgrs", {"alpha": 0.0, "seed": None})]], ALL, edits_forward=False,
                 sample=True),
    "carve": Case([("carve", {"layers": [1, 2], "capture_new_tokens": 3})],
                  [[("carve", {"layers": [1, 2], "keep": 1.0})]], ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"),
                  refused={f: "carve needs image tokens" for f in LLM_FAMILIES}, edits_forward=False,
                  processor=True, scores=False),
}
APPLIES = [(f, name) for name, case in CASES.items() for f in case.families]
REFUSED = [(f, name) for name, case in CASES.items() for f in case.refused]
NEW_TOKENS = 3
QUESTIONS = ["what is", "what is in the red square ?"]


@functools.cache
def _model(family: str):
    return build_model(family)


_processor, _image = shared_processor, random_image


def _prompts(family: str) -> list[Prompt]:
    image = family in VLM_FAMILIES
    return [Prompt(3, 4, seed=1, image=image), Prompt(6, 2, seed=2, image=image)]


def _inputs(family: str, case: Case, which: list[int]) -> dict[str, Any]:
    """The prompts `which` (of two) as one left-padded batch."""
    if case.processor:
        processor = _processor(family)
        if len(which) == 1:
            return prompt_inputs(processor, family, _image(which[0]), QUESTIONS[which[0]])
        return batch_inputs(processor, family, [_image(i) for i in which], [QUESTIONS[i] for i in which])
    prompts = _prompts(family)
    return make_inputs(_model(family), family, [prompts[i] for i in which])


def _apply(family: str, case: Case, stack: list):
    return iv.apply(_model(family), stack, processor=_processor(family) if case.processor else None)


@dataclass
class _Generation:
    sequences: torch.Tensor
    logits: tuple[torch.Tensor, ...] = ()


def _generate(family: str, case: Case, inputs: dict, **extra) -> _Generation:
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=case.sample, **extra)
    if case.scores:
        kwargs.update(output_logits=True, return_dict_in_generate=True)
    if case.sample:
        kwargs["top_k"] = 5
        torch.manual_seed(0)
    with torch.no_grad():
        out = _model(family).generate(**inputs, **kwargs)
    return _Generation(out.sequences, out.logits) if case.scores else _Generation(out)


def _assert_same_generation(a: _Generation, b: _Generation, tolerance: float | None) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        if tolerance is None:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("family, name", APPLIES)
def test_neutral_and_unwrap_are_bit_identical(family, name):
    case, model = CASES[name], _model(family)
    inputs = _inputs(family, case, [0, 1] if not case.processor else [0])
    with torch.no_grad():
        reference = model(**inputs).logits
    plain = _generate(family, case, inputs)
    for neutral in case.neutral or []:
        with _apply(family, case, neutral) as handle:
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, reference)
            _assert_same_generation(_generate(family, case, inputs), plain, None)
            assert not any(m.touched_layers or m.branches for m in handle.methods)
    with _apply(family, case, case.stack) as handle:
        with torch.no_grad():
            edited = model(**inputs).logits
        if case.edits_forward:
            assert not torch.allclose(edited, reference, atol=1e-4)
        else:  # a decoding loop leaves every forward alone
            assert torch.equal(edited, reference)
            changed = _generate(family, case, inputs)
            assert not torch.equal(changed.sequences, plain.sequences) or not all(
                torch.equal(a, b) for a, b in zip(changed.logits, plain.logits, strict=True))
        config = handle.config
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    _assert_same_generation(_generate(family, case, inputs), plain, None)
    assert "generate" not in vars(model)
    with _apply(family, case, config), torch.no_grad():  # `Handle.config` rebuilds the same stack
        assert torch.equal(model(**inputs).logits, edited)


@pytest.mark.parametrize("family, name", APPLIES)
def test_kv_cache_decode_equals_full_recompute(family, name):
    case = CASES[name]
    inputs = _inputs(family, case, [0, 1] if not case.processor else [1])
    with _apply(family, case, case.stack):
        cached = _generate(family, case, inputs)
        full = _generate(family, case, inputs, use_cache=False)
    _assert_same_generation(cached, full, 1e-5)


@pytest.mark.parametrize("family, name", APPLIES)
def test_left_padded_batch_equals_single_runs(family, name):
    case = CASES[name]
    with _apply(family, case, case.stack):
        batch = _generate(family, case, _inputs(family, case, [0, 1]))
        singles = [_generate(family, case, _inputs(family, case, [i])) for i in range(2)]
    width = batch.sequences.shape[1]
    for i, single in enumerate(singles):
        assert torch.equal(single.sequences[0], batch.sequences[i, width - single.sequences.shape[1]:])
        for a, b in zip(single.logits, batch.logits):
            torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, name", REFUSED)
def test_families_a_method_cannot_serve_are_refused_at_wrap(family, name):
    case, model = CASES[name], _model(family)
    with pytest.raises(ValueError, match=case.refused[family]):
        # a valid VLM processor, so that the family is what is refused
        iv.wrap(model, case.stack, processor=_processor(family if family in VLM_FAMILIES else "llava")
                if case.processor else None)
    assert "generate" not in vars(model)


@pytest.mark.parametrize("family", ALL)
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
    text = {id(m) for _, m in iv.family(model).attention_modules(model)}
    with torch.no_grad(), iv.apply(model, "pai", alpha=0.5):
        model(**inputs)
    assert {id(m) for m in calls} == text  # every text layer, and nothing else (no vision-tower attention)


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
