"""The core's second-stream mechanism (interventions/core/branch.py), driven by a toy method whose combination
returns the branch's logits unchanged: a wrapped VLM with a `no_image` branch must then score and generate exactly
what the unwrapped model does on each prompt without its image (every VLM family, left-padded batch, KV cache and
no-cache recompute). Plus the shared guidance formula and the errors for caches a branch cannot follow."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from tiny_models import VLM_FAMILIES, Prompt, build_model, make_inputs

import interventions as iv
from interventions.core.branch import Branch
from interventions.methods.guidance import guidance
from interventions.families import resolve
from interventions.methods.base import METHODS, Method, ModelInfo
from interventions.core.params import MethodConfig, number, param

PROMPTS = [Prompt(3, 4, seed=1), Prompt(6, 2, seed=2)]


@dataclass(frozen=True)
class EchoConfig(MethodConfig):
    NAME = "echo"
    STRENGTH = "strength"
    NEUTRAL = 0.0
    strength: float = param(1.0, "on/off", "test", number(0.0))


class EchoTextOnly(Method):
    """Replaces the next-token logits by those of the text-only branch."""

    config_class = EchoConfig
    needs = frozenset({"branch"})

    def bind(self, model: ModelInfo) -> None:
        self.branches = (Branch("echo:text", "no_image", "every_forward"),)

    def combine_logits(self, branch, main, other):
        return other


@pytest.fixture
def echo(monkeypatch):
    monkeypatch.setitem(METHODS._items, "echo", EchoTextOnly)


def _text_only(model, family: str, prompt: Prompt) -> tuple[dict, int]:
    """The prompt without image placeholders and boundary markers, and how many tokens follow the last dropped one."""
    ids = make_inputs(model, family, [prompt])["input_ids"][0]
    adapter = resolve(model)
    drop = torch.isin(ids, torch.tensor(adapter.image_token_ids(model) + adapter.boundary_token_ids(model)))
    return {"input_ids": ids[~drop][None]}, len(ids) - 1 - int(drop.nonzero().max())


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_no_image_branch_reproduces_the_text_only_model(echo, family):
    model = build_model(family)
    inputs = make_inputs(model, family, PROMPTS)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        plain = model(**inputs).logits
        text_only = [_text_only(model, family, p) for p in PROMPTS]
        singles = [model.generate(**text, **kwargs) for text, _ in text_only]
        texts = [model(**text).logits[0] for text, _ in text_only]
        with iv.apply(model, "echo"):
            got = model(**inputs).logits
            cached = model.generate(**inputs, **kwargs)
            full = model.generate(**inputs, use_cache=False, **kwargs)
    for sample, (_, after) in enumerate(text_only):  # rows after the image: the text-only stream's, from the right
        torch.testing.assert_close(got[sample, -after:], texts[sample][-after:], atol=1e-5,
                                   rtol=1e-5)
        assert torch.equal(got[sample, :-after], plain[sample, :-after])  # rows without a counterpart: main's
        single = singles[sample]
        new = single.sequences[0, -4:]
        for run in (cached, full):
            assert torch.equal(run.sequences[sample, -4:], new)
            for a, b in zip(run.logits, single.logits):
                torch.testing.assert_close(a[sample], b[0], atol=1e-5, rtol=1e-5)


def test_guidance_formula():
    main = torch.tensor([[2.0, 1.0, -3.0, float("-inf")]])
    other = torch.tensor([[0.5, 1.5, 0.0, 0.0]])
    log_p, log_q = main.log_softmax(-1), other.log_softmax(-1)
    got = guidance(main, other, 1.5, 0.1)
    keep = log_p >= log_p.max() + math.log(0.1)
    assert keep.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(got[keep], (log_p + 1.5 * (log_p - log_q))[keep])
    assert got[~keep].eq(float("-inf")).all()
    no_cutoff = guidance(main, other, 1.5, 0.0)
    assert no_cutoff[0, :3].isfinite().all() and no_cutoff[0, 3] == float("-inf")  # never NaN


def test_right_padding_is_refused(echo):
    model = build_model("llava")
    inputs = make_inputs(model, "llava", PROMPTS, padding_side="right")
    with torch.no_grad(), iv.apply(model, "echo"), pytest.raises(ValueError, match="needs left padding"):
        model(**inputs)


def test_rolled_back_cache_is_refused(echo):
    model = build_model("llava")
    inputs = make_inputs(model, "llava", PROMPTS[:1])
    with torch.no_grad(), iv.apply(model, "echo"):
        out = model(**inputs, use_cache=True)
        cache = out.cache
        cache.crop(-2)
        next_ids = inputs["input_ids"][:, -1:]
        mask = inputs["attention_mask"][:, :-1]
        with pytest.raises(ValueError, match="cannot be followed"):
            model(input_ids=next_ids, attention_mask=mask, cache=cache)
