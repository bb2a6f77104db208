"""Every (method, family) pair under the cache layouts and padding users run: a sliding window shorter than prompt +
generation (Mistral; Gemma3 with its real 5 local : 1 global layout), `cache_implementation="static"`, and a
right-padded batch; plus the roles' view of each layout's keys."""

from __future__ import annotations

import functools

import pytest
import torch
from method_cases import REFUSE_RIGHT_PADDING, STACKS, cases
from tiny_models import LLM_FAMILIES, Prompt, build_model, make_inputs

import interventions as iv
from interventions.core.roles import TokenRoles
from interventions.errors import InputError

#: windows shorter than the tiny prompts (8 text tokens; 27 with Gemma3's image block) plus 3 generated tokens
WINDOWED = {
    "mistral": {"sliding_window": 6},
    # the real Gemma3 layout: five sliding-window layers, then one global layer
    "gemma3": {"sliding_window": 8, "num_hidden_layers": 6,
               "layer_types": ["sliding_attention"] * 5 + ["full_attention"]},
}
GREEDY = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}


@functools.cache
def _model(family: str, windowed: bool = False):
    return build_model(family, **(WINDOWED[family] if windowed else {}))


def _prompts(family: str) -> list[Prompt]:
    image = family not in LLM_FAMILIES
    return [Prompt(3, 4, seed=1, image=image), Prompt(6, 2, seed=2, image=image)]


def _assert_same_generation(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):  # guidance puts -inf on implausible tokens: equal there, 1e-5 elsewhere
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, case", cases(tuple(WINDOWED)))
@torch.no_grad()
def test_sliding_window_cached_decode_equals_recompute(family, case):
    model = _model(family, windowed=True)
    inputs = make_inputs(model, family, _prompts(family))
    assert inputs["input_ids"].shape[1] + GREEDY["max_new_tokens"] > model.config.get_text_config().sliding_window
    plain = model.generate(**inputs, **GREEDY)
    with iv.apply(model, STACKS[case]):
        cached = model.generate(**inputs, **GREEDY)
        full = model.generate(**inputs, use_cache=False, **GREEDY)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(plain.logits, cached.logits))  # it edits
    _assert_same_generation(cached, full)


@pytest.mark.parametrize("family, case", cases(("mistral", "gemma3")))
@torch.no_grad()
def test_static_cache_equals_dynamic_cache(family, case):
    model = _model(family)
    inputs = make_inputs(model, family, _prompts(family))
    with iv.apply(model, STACKS[case]):
        dynamic = model.generate(**inputs, **GREEDY)
        static = model.generate(**inputs, cache_implementation="static", **GREEDY)
    _assert_same_generation(dynamic, static)


@pytest.mark.parametrize("family, case", cases(("mistral", "llava", "qwen2_vl")))
@torch.no_grad()
def test_right_padded_batch_equals_single_runs(family, case):
    """The scoring layout (log-likelihood batches pad on the right): each sample's valid logits as alone, with its
    own last row edited; the methods whose branch needs left padding refuse it."""
    model = _model(family)
    prompts = _prompts(family)
    inputs = make_inputs(model, family, prompts, padding_side="right")
    assert not bool(inputs["attention_mask"][:, -1].all())  # the short sample ends in padding
    with iv.apply(model, STACKS[case]):
        if case in REFUSE_RIGHT_PADDING:
            with pytest.raises(InputError, match="needs left padding"):
                model(**inputs)
            return
        batch = model(**inputs).logits
        for i, prompt in enumerate(prompts):
            single = model(**make_inputs(model, family, [prompt])).logits[0]
            torch.testing.assert_close(batch[i, : single.shape[0]], single, atol=5e-5, rtol=1e-5)


@torch.no_grad()
def test_sgrs_refuses_a_static_window_it_cannot_roll_back():
    model = _model("gemma3", windowed=True)
    inputs = make_inputs(model, "gemma3", _prompts("gemma3"))
    with iv.apply(model, STACKS["sgrs"]), pytest.raises(InputError, match="cannot undo"):
        model.generate(**inputs, cache_implementation="static", **GREEDY)


# ---- the roles of each layout's keys ----------------------------------------------------------------------------
def _roles(valid: list[list[int]], image: list[list[int]], prompt_len: int) -> TokenRoles:
    v, im = torch.tensor(valid, dtype=torch.bool), torch.tensor(image, dtype=torch.bool)
    return TokenRoles(v, im & v, torch.zeros_like(v), prompt_len)


def test_keys_of_a_sliding_window_are_the_newest_positions():
    roles = _roles([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], prompt_len=4)
    window = roles.keys(3)
    assert window.offset == 3 and window.prompt_len == 4
    assert window.positions.tolist() == [3, 4, 5]
    assert torch.equal(window.valid, roles.valid[:, 3:]) and torch.equal(window.image, roles.image[:, 3:])
    assert window.generated.tolist() == [[False, True, True]] * 2  # absolute: positions >= prompt_len
    assert window.index(torch.tensor([4, 5])).tolist() == [1, 2]
    per_prompt_key = torch.arange(1.0, 5.0).expand(2, 4)  # a statistic over the 4 prompt positions
    assert window.align(per_prompt_key).tolist() == [[4.0, 0.0, 0.0]] * 2


def test_keys_of_a_static_cache_pad_the_unused_tail():
    roles = _roles([[1, 1, 1]], [[0, 1, 0]], prompt_len=3)
    static = roles.keys(5)
    assert static.offset == 0 and static.valid.tolist() == [[True, True, True, False, False]]
    assert static.align(torch.tensor([[1, 2, 3]])).tolist() == [[1, 2, 3, 0, 0]]


def test_last_prompt_row_of_left_and_right_padding():
    left = _roles([[0, 0, 1, 1], [1, 1, 1, 1]], [[0] * 4] * 2, prompt_len=4)
    right = _roles([[1, 1, 0, 0], [1, 1, 1, 1]], [[0] * 4] * 2, prompt_len=4)
    assert left.last_prompt.tolist() == [3, 3]
    assert right.last_prompt.tolist() == [1, 3]
    rows = torch.arange(6)
    assert right.from_last_prompt(rows).tolist() == [[False, True, True, True, True, True],
                                                     [False, False, False, True, True, True]]
    assert right.from_last_prompt(rows, 1)[:, 4:].all() and not right.from_last_prompt(rows, 1)[1, 3]


@pytest.mark.parametrize("additive", [False, True])
def test_validity_from_a_four_dimensional_mask(additive):
    """A static cache's 4-D mask (bool for SDPA, additive for eager), at prefill and at a decode step: padding keys
    are masked for every row, a real token is seen by its own row."""
    pad = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    i = torch.arange(5)
    causal = i[None, :] <= i[:3, None]  # 3 prompt rows over a 5-key static cache
    mask = (causal[None, None] & torch.cat([pad, torch.zeros(2, 2, dtype=torch.bool)], 1)[:, None, None, :])
    if additive:
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    roles = TokenRoles.from_prompt(torch.full((2, 3), 20), mask, (), 3, 2, 3, torch.device("cpu"))
    assert torch.equal(roles.valid, pad)
    step = mask[:, :, -1:].clone()
    step[..., 3] = True if not additive else 0.0  # the new token at position 3 sees itself
    grown = roles.extend(torch.full((2, 1), 20), step, 3, 1, ())
    assert grown.valid.tolist() == [[False, True, True, True], [True, True, True, True]]
    assert torch.equal(TokenRoles.from_prompt(None, {"full_attention": mask}, (), 3, 2, 3,
                                              torch.device("cpu")).valid, pad)
