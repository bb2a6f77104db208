"""The core's capabilities beyond row edits, each driven by a toy method registered for the test and compared
with the same change made by hand on the unwrapped model: per-head outputs before `o_proj`, decoder-layer input
hidden states, position-id overrides, and control of `generate`'s decoding loop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny_models import Prompt, build_model, make_inputs
from transformers.generation.utils import GenerationMixin

import interventions as iv
from interventions.methods.base import METHODS, Method, ModelInfo
from interventions.core.params import MethodConfig, number, param

LAYER, HEAD, STRETCH = 1, 2, 2


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    NAME = "toy"
    STRENGTH = "strength"
    NEUTRAL = 0.0
    strength: float = param(1.0, "on/off", "test", number(0.0))


class ToyMethod(Method):
    config_class = ToyConfig

    def bind(self, model: ModelInfo) -> None:
        self.touched_layers = frozenset() if self.config.is_neutral else frozenset({LAYER})
        self.seen: list[tuple[int, ...]] = []


class ZeroHead(ToyMethod):
    needs = frozenset({"head_outputs"})

    def edit_head_outputs(self, call, out):
        out = out.clone()
        out[:, :, HEAD] = 0
        return out


class DoubleLayerInput(ToyMethod):
    needs = frozenset({"layer_inputs"})

    def on_layer_input(self, layer, hidden, roles):
        self.seen.append(tuple(hidden.shape))
        return hidden * 2


def _stretched(valid: torch.Tensor, new_len: int) -> torch.Tensor:
    """Positions 0, 2, 4, ... over the valid tokens (RoPE is relative: a uniform shift would change nothing)."""
    return (valid.long().cumsum(-1) - 1).clamp_min(0)[:, -new_len:] * STRETCH


class StretchPositions(ToyMethod):
    needs = frozenset({"positions"})

    def positions(self, roles, position_ids, new_len):
        return _stretched(roles.valid, new_len)


class CountingLoop(ToyMethod):
    needs = frozenset({"decoding_loop"})

    def decoding_loop(self, model, input_ids, **kwargs):
        self.seen.append(tuple(input_ids.shape))
        return GenerationMixin._sample(model, input_ids, **kwargs)


@pytest.fixture
def register(monkeypatch):
    def add(cls):
        monkeypatch.setitem(METHODS._items, "toy", cls)

    return add


@pytest.fixture(scope="module")
def llava():
    model = build_model("llava")
    return model, make_inputs(model, "llava", [Prompt(3, 4, seed=1), Prompt(6, 2, seed=2)])


@torch.no_grad()
def _logits_with_hook(model, inputs, module, hook):
    handle = module.register_forward_pre_hook(hook)
    try:
        return model(**inputs).logits
    finally:
        handle.remove()


@torch.no_grad()
def test_head_outputs_before_o_proj(register, llava):
    model, inputs = llava
    register(ZeroHead)
    attn = model.get_decoder().layers[LAYER].self_attn
    head_dim = attn.head_dim

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., HEAD * head_dim:(HEAD + 1) * head_dim] = 0
        return (x,)

    expected = _logits_with_hook(model, inputs, attn.o_proj, zero_slice)
    with iv.apply(model, "toy"):
        got = model(**inputs).logits
    assert torch.equal(got, expected)


@torch.no_grad()
def test_layer_input_hidden_states(register, llava):
    model, inputs = llava
    register(DoubleLayerInput)
    expected = _logits_with_hook(model, inputs, model.get_decoder().layers[LAYER], lambda m, a: (a[0] * 2, *a[1:]))
    with iv.apply(model, "toy") as handle:
        got = model(**inputs).logits
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(got, expected)
    length = inputs["input_ids"].shape[1]
    assert handle.methods[0].seen == [(2, length, 64), (2, length, 64), (2, 1, 64)]  # forward, prefill, decode


@torch.no_grad()
def test_position_id_override(register, llava):
    model, inputs = llava
    register(StretchPositions)
    length = inputs["input_ids"].shape[1]
    expected = model(**inputs, position_ids=_stretched(inputs["attention_mask"].bool(), length)).logits
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with iv.apply(model, "toy"):
        got = model(**inputs).logits
        cached = model.generate(**inputs, **kwargs)
        full = model.generate(**inputs, use_cache=False, **kwargs)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.allclose(got, model(**inputs).logits, atol=1e-4)  # the remap matters
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decoding_loop_control(register, llava):
    model, inputs = llava
    register(CountingLoop)
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with iv.apply(model, "toy") as handle:
        looped = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert handle.methods[0].seen == [tuple(inputs["input_ids"].shape)]
        with pytest.raises(ValueError, match="runs its own decoding loop"):
            model.generate(**inputs, max_new_tokens=1, custom_generate=GenerationMixin._sample)
    assert torch.equal(looped, plain)
    with pytest.raises(ValueError, match="stack at most one of them"):
        iv.wrap(model, [("toy", {}), ("toy", {})])
