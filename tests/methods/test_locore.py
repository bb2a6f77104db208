"""LocoRE (shared/specs/sgrs_locore.md §6): the window on toy rows, fp64 conformance of the decode rows against the
literal post-softmax ×(1+beta) + renormalisation through every tiny family (cached steps and no-cache recompute),
the family presets of beta, and the shared properties (neutral, KV cache, left padding, decode rows only)."""

from __future__ import annotations

import functools

import pytest
import torch
from capture import record_row_blocks
from test_var import capture, plain_probs
from tiny_models import (
    FAMILIES,
    FIRST_TEXT_ID,
    LLM_FAMILIES,
    VLM_FAMILIES,
    Prompt,
    build_model,
    make_inputs,
)

import interventions as iv
from interventions.core.roles import TokenRoles
from interventions.core.rows import RowLogits
from interventions.errors import ConfigError
from interventions.methods.base import AttentionCall, ModelInfo
from interventions.methods.locore import Locore, LocoreConfig

LAYER = 0  # its queries and keys do not depend on any edit, so a plain forward gives the reference's inputs


def locore_reference(a, image, first_row, beta, window, include_self=False):
    """On rows q >= first_row: keys j past the sample's last image token with lo <= q - j <= window get ×(1+beta);
    the row is renormalised."""
    out = a.clone()
    batch, _, length, _ = a.shape
    keys = torch.arange(length)
    lo = 0 if include_self else 1
    for b in range(batch):
        images = image[b].nonzero().flatten().tolist()
        text_start = images[-1] + 1 if images else 0
        for q in range(first_row, length):
            window_keys = (keys >= text_start) & (q - keys >= lo) & (q - keys <= window)
            row = a[b, :, q] * torch.where(window_keys, 1 + beta, 1.0).to(a.dtype)
            out[b, :, q] = row / row.sum(-1, keepdim=True)
    return out


# ---- toy rows through the method's own hooks ------------------------------------------------------------------------
def _run_toy(logits: torch.Tensor, prompt_len: int, image: list[int], **params) -> tuple[torch.Tensor, object]:
    batch, heads, length, _ = logits.shape
    valid = torch.ones(batch, length, dtype=torch.bool)
    flags = torch.zeros_like(valid)
    flags[:, image] = True
    roles = TokenRoles(valid, flags, torch.zeros_like(valid), prompt_len)
    method = Locore(LocoreConfig(**{"beta": 0.5, **params}))
    method.attach(ModelInfo("test", num_layers=1, num_heads=heads, num_kv_heads=heads, has_images=True))
    method.start_sequence(roles)  # as the core does before the first forward of a sequence
    call = AttentionCall(0, roles, torch.arange(length))
    request = method.request(call)
    allowed = torch.ones(length, length, dtype=torch.bool).tril().view(1, 1, length, length)
    view = RowLogits(logits.clone(), allowed, torch.arange(heads), torch.arange(length))
    if request is not None:
        method.edit(call, view, request)
    return view.probs(), request


def _toy_logits(length: int = 10) -> torch.Tensor:
    return torch.randn(2, 3, length, length, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("params", [{}, {"window": 2, "include_self": True}, {"apply_on_prefill_last_row": True}])
def test_bias_equals_post_softmax_gain_and_renormalisation(params):
    logits = _toy_logits()
    got, request = _run_toy(logits, prompt_len=6, image=[1, 2, 3, 4], **params)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    a = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    full = {"window": 5, "include_self": False, **params}
    first_row = 5 if params.get("apply_on_prefill_last_row") else 6
    expected = locore_reference(a, torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0, 0, 0]] * 2).bool(), first_row,
                                0.5, full["window"], full["include_self"])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert request.rows.tolist() == [q >= first_row for q in range(10)]
    # not vacuous: row 9 changes; a prompt row before `first_row` does not; rows still sum to 1
    assert not torch.allclose(got[:, :, 9], a[:, :, 9])
    torch.testing.assert_close(got[:, :, 4], a[:, :, 4], atol=1e-15, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, 10, dtype=torch.float64), atol=1e-12, rtol=0)


def test_only_window_keys_after_the_image_change_and_last_prompt_row_is_a_no_op():
    logits = _toy_logits()
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    a = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    got, _ = _run_toy(logits, prompt_len=6, image=[1, 2, 3, 4], window=3, apply_on_prefill_last_row=True)
    # row 5 is the first text position: its window (2, 3, 4) is image, so nothing changes
    torch.testing.assert_close(got[:, :, 5], a[:, :, 5], atol=1e-15, rtol=0)
    # row 9, window 3: keys 6, 7, 8 are scaled by 1.5 against every other key
    ratio = got[:, :, 9, :10] / a[:, :, 9, :10]
    scaled, other = ratio[..., [6, 7, 8]], ratio[..., [0, 1, 2, 3, 4, 5, 9]]
    torch.testing.assert_close(scaled / other[..., :1], torch.full_like(scaled, 1.5), atol=1e-12, rtol=0)
    torch.testing.assert_close(other / other[..., :1], torch.ones_like(other), atol=1e-12, rtol=0)


def test_beta_defaults_per_family_preset():
    def bound(family, **params):
        method = Locore(LocoreConfig(**params))
        method.attach(ModelInfo(family, num_layers=4, num_heads=2, num_kv_heads=2, has_images=True))
        return method

    assert [bound(f).beta for f in ("llava", "qwen2_vl", "gemma3", "causal_lm")] == [0.15, 0.2, 0.15, 0.15]
    assert bound("qwen2_vl", beta=0.3).beta == 0.3
    assert bound("llava").touched_layers == frozenset(range(4))  # all layers by default
    assert not bound("llava", beta=0.0).touched_layers
    for bad in ({"beta": -0.1}, {"window": 0}, {"include_self": 1}):
        with pytest.raises(ConfigError, match="locore"):
            LocoreConfig(**bad)
    with pytest.raises(ConfigError, match="out of range"):
        bound("llava", layers=[4])


# ---- end to end, fp64, every family ----------------------------------------------------------------------------------
@functools.cache
def _model(family: str, dtype: torch.dtype = torch.float32):
    return build_model(family, dtype=dtype)


def _prompts(family: str) -> list[Prompt]:
    image = family in VLM_FAMILIES
    return [Prompt(3, 4, seed=1, image=image), Prompt(6, 2, seed=2, image=image)]


def _inputs(model, family, prompts):
    inputs = make_inputs(model, family, prompts)
    return {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_rows_equal_spec_formula_fp64_cached_and_recomputed(family):
    model = _model(family, torch.float64)
    inputs = _inputs(model, family, _prompts(family))
    new, beta, window = 4, 1.0, 3
    kwargs = dict(max_new_tokens=new, do_sample=False, output_attentions=True, return_dict_in_generate=True,
                  suppress_tokens=list(range(FIRST_TEXT_ID)))  # generated ids stay ordinary text, never image ids
    with torch.no_grad(), iv.apply(model, "locore", beta=beta, window=window):
        cached = model.generate(**inputs, **kwargs)
        full = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, full.sequences)
    grow = new - 1
    sequence = {**inputs, "input_ids": cached.sequences[:, :-1],
                "attention_mask": torch.nn.functional.pad(inputs["attention_mask"], (0, grow), value=1)}
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            sequence[key] = torch.nn.functional.pad(inputs[key], (0, grow))
    a = plain_probs(capture(model, sequence)[LAYER])
    prompt_len = inputs["input_ids"].shape[1]
    image = sequence["input_ids"] == (getattr(model.config, "image_token_id", None) or -1)
    expected = locore_reference(a, image, prompt_len, beta, window)
    got = full.attentions[-1][LAYER]
    valid = sequence["attention_mask"].bool()[:, None, :, None]
    torch.testing.assert_close(got.where(valid, 0), expected.where(valid, 0), atol=1e-6, rtol=0)
    assert not torch.allclose(expected[:, :, prompt_len:], a[:, :, prompt_len:])  # not vacuous
    for step in range(1, new):  # each cached step's row equals the recomputed row at its position
        position = prompt_len + step - 1
        torch.testing.assert_close(cached.attentions[step][LAYER][:, :, 0], expected[:, :, position, :position + 1],
                                   atol=1e-6, rtol=0)


# ---- shared properties, fp32 ----------------------------------------------------------------------------------------
_GENERATE = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_neutral_bit_identical_prompt_forward_untouched_and_unwraps(family):
    model = _model(family)
    inputs = _inputs(model, family, _prompts(family))
    with torch.no_grad():
        reference = model.generate(**inputs, **_GENERATE)
        with iv.apply(model, "locore", beta=0.0) as handle:
            assert not handle.methods[0].touched_layers
            neutral = model.generate(**inputs, **_GENERATE)
        with iv.apply(model, "locore", beta=1.0):
            assert model.get_decoder().config._attn_implementation == "interventions_sdpa"  # never eager
            prompt_only = model(**inputs).logits
            changed = model.generate(**inputs, **_GENERATE)
        after = model.generate(**inputs, **_GENERATE)
        assert torch.equal(prompt_only, model(**inputs).logits)  # a prompt forward has no decode row
    for a, b, c in zip(reference.logits, neutral.logits, after.logits):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(changed.logits[0], reference.logits[0])  # the first token comes from the prompt's last row
    assert not torch.allclose(torch.stack(changed.logits[1:]), torch.stack(reference.logits[1:]), atol=1e-5)


@pytest.mark.parametrize("first_row, prefill", [(False, []), (True, [(1, 4)])])
def test_only_decode_rows_are_materialised(monkeypatch, first_row, prefill):
    family = LLM_FAMILIES[0]
    model = _model(family)
    inputs = _inputs(model, family, _prompts(family))
    blocks = record_row_blocks(monkeypatch)
    with torch.no_grad(), iv.apply(model, "locore", beta=1.0, layers=[1], apply_on_prefill_last_row=first_row):
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert [(rows, heads) for rows, heads, _ in blocks] == prefill + [(1, 4), (1, 4)]  # one row of all heads per decode step, in layer 1 only
