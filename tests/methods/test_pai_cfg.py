"""PAI's text-only contrastive branch (shared/specs/pai.md §3.2–3.3) against direct two-forward references in
float64: the image stream (the wrapped model with the attention edit alone) and the text-only stream (the unwrapped
model on each prompt without its image tokens), combined as `γ·(log p_img − log p_text) + log p_text` with −inf
below `log 0.1 + max log p_img`. Shared properties: tests/methods/test_properties.py (case `pai-cfg`)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from tiny_models import VLM_FAMILIES, Prompt, build_model, make_inputs

import interventions as iv
from interventions.families import resolve

PROMPTS = [Prompt(3, 4, seed=1), Prompt(6, 2, seed=2)]
PAI = {"alpha": 0.5, "start_layer": 1}


@functools.cache
def _model(family: str):
    return build_model(family, dtype=torch.float64)


def _text_only(model, inputs: dict, sample: int) -> torch.Tensor:
    """The sample's valid tokens without image placeholders and image boundary markers, `(1, length)`."""
    ids = inputs["input_ids"][sample, inputs["attention_mask"][sample].bool()]
    adapter = resolve(model)
    drop = torch.isin(ids, torch.tensor(adapter.image_token_ids(model) + adapter.boundary_token_ids(model)))
    return ids[~drop][None]


def _combined(image: torch.Tensor, text: torch.Tensor, gamma: float, cutoff: float = 0.1) -> torch.Tensor:
    log_img, log_text = image.log_softmax(-1), text.log_softmax(-1)
    out = gamma * (log_img - log_text) + log_text
    return out.masked_fill(log_img < log_img.max(-1, keepdim=True).values + math.log(cutoff), float("-inf"))


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_combination_matches_two_forward_reference(family):
    """Every row after the image (the last prompt row included) of a left-padded batch."""
    model = _model(family)
    inputs = make_inputs(model, family, PROMPTS)
    with torch.no_grad():
        with iv.apply(model, "pai", **PAI):
            image = model(**inputs).logits
        with iv.apply(model, "pai", **PAI, use_cfg=True, gamma=1.5):
            got = model(**inputs).logits
        for sample, prompt in enumerate(PROMPTS):
            text = model(input_ids=_text_only(model, inputs, sample)).logits[0]
            rows = prompt.after  # rows after the image block: aligned from the right in both streams
            expected = _combined(image[sample, -rows:], text[-rows:], 1.5)
            assert torch.equal(got[sample, -rows:].isinf(), expected.isinf())
            torch.testing.assert_close(got[sample, -rows:], expected, atol=1e-6, rtol=1e-6)


def test_gamma_one_is_the_image_stream_alone():
    model = build_model("llava")
    inputs = make_inputs(model, "llava", PROMPTS)
    calls = []
    counter = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            with iv.apply(model, "pai", **PAI):
                logits = model(**inputs).logits
                tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            forwards = len(calls)
            with iv.apply(model, "pai", **PAI, use_cfg=True, gamma=1.0) as handle:
                assert handle.methods[0].branches == ()
                assert torch.equal(model(**inputs).logits, logits)
                assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), tokens)
            assert len(calls) == 2 * forwards  # no text-only forward
    finally:
        counter.remove()


def _reference_decode(model, inputs: dict, gamma: float, steps: int) -> list[torch.Tensor]:
    """Greedy CFG decoding of one prompt without attention edit, both streams recomputed at every step."""
    ids, text = inputs["input_ids"], _text_only(model, inputs, 0)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    scores = []
    for _ in range(steps):
        step = _combined(model(input_ids=ids, **extra).logits[:, -1], model(input_ids=text).logits[:, -1], gamma)
        scores.append(step)
        token = step.argmax(-1, keepdim=True)
        ids, text = torch.cat([ids, token], 1), torch.cat([text, token], 1)
    return scores


def test_greedy_decoding_with_two_caches_equals_recompute_reference():
    model = _model("llava")
    inputs = make_inputs(model, "llava", PROMPTS[1:])
    with torch.no_grad():
        expected = _reference_decode(model, inputs, 2.0, 8)
        kwargs = {"max_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
        with iv.apply(model, "pai", alpha=0.0, use_cfg=True, gamma=2.0):
            cached = model.generate(**inputs, **kwargs)
            full = model.generate(**inputs, use_cache=False, **kwargs)
    assert len(cached.logits) == 8
    for got, recomputed, reference in zip(cached.logits, full.logits, expected):  # generate gives float32 scores
        torch.testing.assert_close(got, reference.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(recomputed, reference.float(), atol=1e-5, rtol=1e-5)


def test_official_first_token_quirk():
    """Spec conformance 5: with the quirk the first token is the un-intervened model's (same CFG); by default the
    first token is intervened; from the second token on both intervene."""
    model = _model("llava")
    inputs = make_inputs(model, "llava", PROMPTS[1:])
    kwargs = {"max_new_tokens": 2, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        plain = _reference_decode(model, inputs, 2.0, 2)
        with iv.apply(model, "pai", **PAI, use_cfg=True, gamma=2.0, official_cfg_first_token_quirk=True):
            quirk = model.generate(**inputs, **kwargs)
        with iv.apply(model, "pai", **PAI, use_cfg=True, gamma=2.0):
            default = model.generate(**inputs, **kwargs)
    torch.testing.assert_close(quirk.logits[0], plain[0].float(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(default.logits[0], plain[0].float(), atol=1e-4)
    assert int(quirk.sequences[0, -2]) == int(plain[0].argmax())  # same history, so step 2 differs by the edit
    assert not torch.allclose(quirk.logits[1], plain[1].float(), atol=1e-4)


def test_errors():
    model = build_model("llava")
    with pytest.raises(ValueError, match="official_cfg_first_token_quirk=True needs use_cfg=True"):
        iv.wrap(model, "pai", official_cfg_first_token_quirk=True)
    with pytest.raises(ValueError, match="pai: cutoff=1.0 is invalid"):
        iv.wrap(model, "pai", use_cfg=True, cutoff=1.0)
