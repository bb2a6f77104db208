"""Head-level perturbation guidance (shared/specs/head_perturbation.md §3) against a direct eager float64
reference: an attention function computing `(1−u)·softmax(QKᵀ)V + u·T` literally for the selected heads
(T = the query's own value, or the mean of the visible values), the guidance formula written out, and a greedy
decoder that recomputes both streams from scratch at every step. Shared properties: tests/methods/test_properties.py."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from tiny_models import Prompt, build_model, make_inputs
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import interventions as iv

HEADS = [[0, 0], [0, 3], [1, 1], [2, 2]]  # GQA: query heads 0/1 read KV head 0, 2/3 read KV head 1


def _prompts(family: str) -> list[Prompt]:
    image = family != "llama"
    return [Prompt(3, 4, seed=1, image=image), Prompt(6, 2, seed=2, image=image)]

_PERTURB: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention, then `(1−u)·A·V + u·T·V` on the selected heads of this layer (spec Eq. 7)."""
    k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)[None, None]
    else:
        allowed = attention_mask[..., :kv_len]
    z = (query @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    out = torch.softmax(z, -1).nan_to_num(0.0) @ v  # (batch, heads, q_len, head_dim)
    u = _PERTURB["u"]
    for layer, head in _PERTURB["heads"]:
        if layer != module.layer_idx:
            continue
        if _PERTURB["target"] == "identity":
            target = v[:, head, kv_len - q_len:]  # each row's own value
        else:
            weights = allowed.expand(query.shape[0], 1, q_len, kv_len)[:, 0].to(v.dtype)
            target = (weights @ v[:, head]) / weights.sum(-1, keepdim=True).clamp_min(1)  # padding rows: 0
        out[:, head] = (1 - u) * out[:, head] + u * target
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("test_pag_reference", _reference_attention)
AttentionMaskInterface.register("test_pag_reference", sdpa_mask)


@functools.cache
def _model(family: str):
    return build_model(family, dtype=torch.float64)


@torch.no_grad()
def _perturbed(model, inputs, u: float, target: str = "identity", heads=HEADS):
    """The reference perturbed stream: the unwrapped model with the eager reference attention."""
    config = model.get_decoder().config
    previous = config._attn_implementation_internal
    _PERTURB.update(u=u, target=target, heads=heads)
    config._attn_implementation_internal = "test_pag_reference"
    try:
        return model(**inputs)
    finally:
        config._attn_implementation_internal = previous


def _guided(original: torch.Tensor, perturbed: torch.Tensor, w: float, cutoff: float) -> torch.Tensor:
    log_p, log_q = original.log_softmax(-1), perturbed.log_softmax(-1)
    out = log_p + w * (log_p - log_q)
    return out.masked_fill(log_p < log_p.max(-1, keepdim=True).values + math.log(cutoff), float("-inf"))


def _capture_o_proj(model):
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda module, args, i=i: seen.setdefault(i, []).append(args[0].clone()))
        for i, layer in enumerate(model.get_decoder().layers)]
    return seen, hooks


@pytest.mark.parametrize("target", ["identity", "uniform"])
def test_perturbed_branch_equals_eager_reference(target):
    """Conformance 1 and 2: the branch's per-head outputs equal the eager formula (prefill of a left-padded batch
    and one decode step, float64, 1e-6); the original stream is bit-identical to the unwrapped model."""
    model = _model("llama")
    inputs = make_inputs(model, "llama", _prompts("llama"))
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        plain, hooks = _capture_o_proj(model)
        model(**inputs, position_ids=positions)
        for hook in hooks:
            hook.remove()
        seen, hooks = _capture_o_proj(model)
        with iv.apply(model, "pag", heads=HEADS, u=0.7, w=1.0, target=target):
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        for hook in hooks:
            hook.remove()
        full = {"input_ids": out.sequences[:, :-1], "attention_mask": torch.cat([mask, torch.ones_like(mask[:, :1])], 1)}
        full["position_ids"] = (full["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        reference, hooks = _capture_o_proj(model)
        _perturbed(model, full, u=0.7, target=target)
        for hook in hooks:
            hook.remove()
    valid = mask.bool()
    for layer in range(3):
        prefill_branch, prefill_main, decode_branch, _ = seen[layer]  # the branch runs before the main stream
        assert torch.equal(prefill_main, plain[layer][0])
        expected = reference[layer][0]
        torch.testing.assert_close(prefill_branch[valid], expected[:, :-1][valid], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(decode_branch[:, -1], expected[:, -1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_guided_scores_equal_two_forward_reference(family):
    model = _model(family)
    inputs = make_inputs(model, family, _prompts(family))
    with torch.no_grad():
        original = model(**inputs).logits
        perturbed = _perturbed(model, inputs, u=0.6).logits
        with iv.apply(model, "pag", heads=HEADS, u=0.6, w=1.5, cutoff=0.1):
            got = model(**inputs).logits
    expected = _guided(original, perturbed, 1.5, 0.1)
    valid = inputs["attention_mask"].bool()
    assert torch.equal(got[valid].isinf(), expected[valid].isinf())
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama"])
def test_greedy_decoding_with_two_caches_equals_recompute_reference(family):
    """16 greedy steps of the wrapped model (its cache and the branch's) against a loop that recomputes the
    original and the perturbed stream from scratch at every step and applies the guidance formula."""
    model = _model(family)
    inputs = make_inputs(model, family, _prompts(family))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    steps = []
    with torch.no_grad():
        for _ in range(16):
            step = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
                    **extra}
            scores = _guided(model(**step).logits[:, -1], _perturbed(model, step, u=0.8).logits[:, -1], 2.0, 0.1)
            steps.append(scores)
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        with iv.apply(model, "pag", heads=HEADS, u=0.8, w=2.0):
            cached = model.generate(**inputs, max_new_tokens=16, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    assert torch.equal(cached.sequences, ids)
    for got, expected in zip(cached.logits, steps):  # generate hands out float32 scores
        torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_neutral_w_or_u_is_bit_identical_without_a_branch(family):
    model = build_model(family)
    inputs = make_inputs(model, family, _prompts(family))
    calls = []
    counter = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            forwards = len(calls)
            for neutral in ({"w": 0.0}, {"u": 0.0}):
                with iv.apply(model, "pag", heads=HEADS, **neutral):
                    assert torch.equal(model(**inputs).logits, logits)
                    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), tokens)
            assert len(calls) == 3 * forwards  # no perturbed forward
    finally:
        counter.remove()


def test_errors():
    model = build_model("llama")
    inputs = make_inputs(model, "llama", _prompts("llama")[:1])
    with pytest.raises(ValueError, match="pag: heads is required"):
        iv.wrap(model, "pag")
    with pytest.raises(ValueError, match=r"pag: heads \[\(3, 0\)\] out of range"):
        iv.wrap(model, "pag", heads=[[3, 0]])
    with pytest.raises(ValueError, match="pag: target='max' is invalid"):
        iv.wrap(model, "pag", heads=HEADS, target="max")
    with iv.apply(model, "pag", heads=HEADS), pytest.raises(ValueError, match="beam search"):
        model.generate(**inputs, max_new_tokens=2, num_beams=2)
