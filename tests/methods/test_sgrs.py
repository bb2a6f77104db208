"""SGRS (shared/specs/sgrs_locore.md §3-§5): the saliency of every evaluated candidate against direct autograd on an
uncached full forward with eager attention, the acceptance rule on scripted saliencies, real rejections, α = 0 as
transformers' own top-K sampling, generation unchanged by the probing when nothing is rejected, every tiny family,
left-padded batches, unwrap, stacking and errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from tiny_models import EOS_ID, FAMILIES, VLM_FAMILIES, Prompt, build_model, image_token_id, make_inputs

import interventions as iv
from interventions.errors import ConfigError, InputError
from interventions.families import resolve
from interventions.methods.sgrs import loop as sgrs_loop
from interventions.methods.sgrs.method import preset_layers
from interventions.methods.sgrs.select import History, Sampler, choose, sample_seeds

NEW = 4
#: no EOS before NEW tokens, so every sample stays active (finished samples are only padded)
GEN = {"max_new_tokens": NEW, "min_new_tokens": NEW}


@functools.cache
def _model(family: str):
    return build_model(family)


@functools.cache
def _eager(family: str):
    model = copy.deepcopy(_model(family))
    model.set_attn_implementation("eager")
    return model


def _inputs(family: str, n: int = 2) -> dict:
    image = family in VLM_FAMILIES
    prompts = [Prompt(3, 4, seed=1, image=image), Prompt(6, 2, seed=2, image=image)][:n]
    return make_inputs(_model(family), family, prompts)


def _extended(inputs: dict, ids: torch.Tensor) -> dict:
    """The prompt's model inputs with generated tokens appended (the no-cache full forward of a later step)."""
    extra = ids.shape[1] - inputs["input_ids"].shape[1]
    full = {**inputs, "input_ids": ids}
    for key in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            fill = torch.ones if key == "attention_mask" else torch.zeros
            full[key] = torch.cat([inputs[key], fill(ids.shape[0], extra, dtype=inputs[key].dtype)], 1)
    return full


def reference_saliency(family: str, inputs: dict, ids: torch.Tensor, tokens: torch.Tensor, layers) -> torch.Tensor:
    """𝒮 of `tokens` after the context `ids`, by the paper's recipe on the unwrapped eager model: one uncached full
    forward with output_attentions, L = −log p(token) at the last position, ∂L/∂A by autograd, S = |A ⊙ ∂L/∂A| on
    the last row, mean over heads, L2-normalised over keys, mean over J, mean over layers."""
    model = _eager(family)
    full = _extended(inputs, ids)
    with torch.enable_grad():
        out = model(**full, output_attentions=True, use_cache=False)
        loss = -torch.log_softmax(out.logits[:, -1], -1).gather(1, tokens[:, None]).sum()
        grads = torch.autograd.grad(loss, [out.attentions[layer] for layer in layers])
    length = ids.shape[1]
    pos = torch.arange(length)
    prompt_len = inputs["input_ids"].shape[1]
    image = (ids == image_token_id(model)) & (pos < prompt_len) if image_token_id(model) is not None else ids < 0
    last_image = torch.where(image, pos, -1).amax(1, keepdim=True)
    boundary = torch.isin(ids, torch.tensor(resolve(model).boundary_token_ids(model), dtype=torch.long))
    keys = full["attention_mask"].bool() & (pos > last_image) & ~boundary
    values = []
    for layer, grad in zip(layers, grads):
        s = (out.attentions[layer] * grad).abs()[:, :, -1].mean(1)
        s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        values.append((s * keys).sum(-1) / keys.sum(-1))
    return torch.stack(values).mean(0).detach()


@pytest.fixture
def recorder(monkeypatch):
    """Every saliency the loop computes: per step, a list of (candidate tokens, saliencies)."""
    steps: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    real = sgrs_loop.choose

    def recording(scores, top_k, rounds, draw, active, thresholds, saliency):
        calls: list = []
        steps.append(calls)

        def recorded(tokens):
            values = saliency(tokens)
            calls.append((tokens.clone(), values.detach().clone()))
            return values

        return real(scores, top_k, rounds, draw, active, thresholds, None if saliency is None else recorded)

    monkeypatch.setattr(sgrs_loop, "choose", recording)
    return steps


# ---- exactness -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_saliency_equals_autograd_reference(family, recorder):
    """Every candidate the loop evaluates (first step on the rolled-back cache, cached decode steps, rejections
    and fallbacks; left-padded batch of 2) against the uncached eager reference, 1e-5."""
    model, inputs = _model(family), _inputs(family)
    layers = [0, 2]
    with torch.no_grad(), iv.apply(model, "sgrs", alpha=1.5, layers=layers) as handle:
        sequences = model.generate(**inputs, do_sample=True, **GEN)
    assert handle.methods[0].stats["rejected"] > 0  # rejections and fallbacks are among the checked candidates
    prompt_len = inputs["input_ids"].shape[1]
    assert len(recorder) == NEW
    for step, calls in enumerate(recorder):
        context = sequences[:, :prompt_len + step]
        for tokens, values in calls:
            expected = reference_saliency(family, inputs, context, tokens, layers)
            torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)


def test_saliency_without_cache_equals_cached(recorder):
    model, inputs = _model("llava"), _inputs("llava")
    with torch.no_grad(), iv.apply(model, "sgrs", alpha=1.5):
        cached = model.generate(**inputs, do_sample=True, output_logits=True, return_dict_in_generate=True, **GEN)
        steps = [list(calls) for calls in recorder]
        recorder.clear()
        full = model.generate(**inputs, do_sample=True, use_cache=False, output_logits=True,
                              return_dict_in_generate=True, **GEN)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(steps, recorder):
        for (tokens_a, values_a), (tokens_b, values_b) in zip(a, b, strict=True):
            assert torch.equal(tokens_a, tokens_b)
            torch.testing.assert_close(values_a, values_b, atol=1e-5, rtol=1e-5)


# ---- the acceptance rule -------------------------------------------------------------------------------------------
def _scripted(saliency_table: torch.Tensor, seen: list):
    def saliency(tokens):
        seen.append(tokens.clone())
        return saliency_table.gather(1, tokens[:, None])[:, 0]

    return saliency


def test_rule_on_scripted_saliencies():
    """Sample 0: τ = 0, first draw accepted. Sample 1: the two best candidates fall under τ and are removed, then
    the fallback takes the most salient of the original top-3, which was never drawn. Sample 2: the second draw
    passes. Greedy draws make the order deterministic."""
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    table = torch.tensor([[0.1, 0.2, 0.3, 0.9],
                          [0.1, 0.2, 0.3, 0.9],
                          [0.1, 0.6, 0.3, 0.9]])
    seen: list = []
    choice = choose(scores, top_k=3, rounds=2, draw=Sampler(False, None, torch.device("cpu")),
                    active=torch.ones(3, dtype=torch.bool), thresholds=torch.tensor([0.0, 0.5, 0.5]),
                    saliency=_scripted(table, seen))
    assert choice.tokens.tolist() == [0, 2, 1]  # token 3 (saliency 0.9) is outside the top-3
    assert choice.accepted.tolist() == [True, False, True]
    assert choice.rejected.tolist() == [0, 2, 1]
    torch.testing.assert_close(choice.saliency, torch.tensor([0.1, 0.3, 0.6]))
    assert [t[1].item() for t in seen] == [0, 1, 2]  # sample 1: each candidate evaluated once, the fallback included


def test_rule_never_redraws_a_rejected_candidate():
    torch.manual_seed(0)
    scores = torch.randn(64, 50)
    table = torch.rand(64, 50)
    seen: list = []
    draw = Sampler(True, sample_seeds(3, torch.arange(64)[:, None], None), torch.device("cpu"))
    choice = choose(scores, top_k=5, rounds=3, draw=draw, active=torch.ones(64, dtype=torch.bool),
                    thresholds=torch.full((64,), 2.0), saliency=_scripted(table, seen))  # τ = 2: all rejected
    drawn = torch.stack(seen[:3], 1)  # (batch, rounds)
    assert all(len(set(row.tolist())) == 3 for row in drawn)
    top5 = scores.topk(5).indices
    assert torch.equal(choice.tokens, top5.gather(1, table.gather(1, top5).argmax(1, keepdim=True))[:, 0])
    assert not choice.accepted.any() and (choice.rejected == 3).all()


def test_history_threshold():
    history = History(batch=2, window=2, alpha=0.5, device=torch.device("cpu"))
    assert history.thresholds().tolist() == [0.0, 0.0]  # the first token is always accepted
    for value in (1.0, 2.0, 4.0):
        history.add(torch.tensor([value, value]), torch.tensor([True, False]))
    assert history.thresholds().tolist() == [0.5 * 3.0, 0.0]  # last W = 2 accepted of sample 0


def test_low_saliency_candidates_are_rejected(recorder):
    """With α = 1.5 the threshold exceeds typical saliencies: candidates under τ are rejected and other tokens are
    chosen than the same seed picks without saliency. (The released code reads the candidate's own row, whose
    gradient is exactly 0, so its saliency is 0 = τ and it never rejects; the predicting row's is positive.)"""
    model, inputs = _model("llava"), _inputs("llava")
    with torch.no_grad():
        with iv.apply(model, "sgrs", alpha=1.5) as handle:
            guided = model.generate(**inputs, do_sample=True, **GEN)
            stats = handle.methods[0].stats
        steps = list(recorder)
        with iv.apply(model, "sgrs", alpha=0.0):
            plain = model.generate(**inputs, do_sample=True, **GEN)
    assert stats["rejected"] > 0 and stats["fallbacks"] > 0
    assert not torch.equal(guided, plain)
    assert all((values > 0).all() for calls in steps for _, values in calls)
    # step 0 accepts its first draw (no history); the rejections come later, from values under α · history
    assert len(steps[0]) == 1 and any(len(calls) > 1 for calls in steps[1:])


# ---- neutral, α = 0 and the probing's invisibility -----------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
def test_alpha_zero_is_transformers_top_k_sampling(batch):
    """seed=None draws from torch's global generator as transformers does: same tokens and scores as
    `generate(do_sample=True, top_k=5)` of the unwrapped model after the same `torch.manual_seed`."""
    model, inputs = _model("llava"), _inputs("llava", batch)
    kwargs = {"do_sample": True, "max_new_tokens": 8, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        torch.manual_seed(7)
        expected = model.generate(**inputs, top_k=5, **kwargs)
        with iv.apply(model, "sgrs", alpha=0.0, seed=None):
            torch.manual_seed(7)
            got = model.generate(**inputs, top_k=5, **kwargs)
            torch.manual_seed(7)
            default_top_k = model.generate(**inputs, **kwargs)  # top-50 processor, then sgrs's top-5
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(default_top_k.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        assert torch.equal(a, b)


def test_seeded_alpha_zero_is_top_k_sampling_with_the_sample_seed():
    model, inputs = _model("qwen2"), _inputs("qwen2", 1)
    seed = sample_seeds(11, inputs["input_ids"], inputs["attention_mask"])[0]
    with torch.no_grad():
        torch.manual_seed(seed)
        expected = model.generate(**inputs, do_sample=True, top_k=5, max_new_tokens=8)
        with iv.apply(model, "sgrs", alpha=0.0, seed=11):
            torch.manual_seed(123)  # ignored: the config's seed decides
            got = model.generate(**inputs, do_sample=True, max_new_tokens=8)
    assert torch.equal(got, expected)


def test_greedy_alpha_zero_is_greedy():
    model, inputs = _model("gemma3"), _inputs("gemma3")
    with torch.no_grad():
        expected = model.generate(**inputs, do_sample=False, max_new_tokens=6)
        with iv.apply(model, "sgrs", alpha=0.0):
            assert torch.equal(model.generate(**inputs, do_sample=False, max_new_tokens=6), expected)


@functools.cache
def _windowed_mistral():
    """Sliding window 4 < the prompts: the first step's rollback needs the cache's past recording."""
    model = build_model("mistral")
    model.config.sliding_window = 4
    return model


@pytest.mark.parametrize("family, do_sample", [("qwen2_vl", True), ("qwen2_vl", False), ("mistral-window-4", True)])
def test_probing_without_rejection_leaves_generation_unchanged(family, do_sample):
    """A tiny α rejects nothing: the grad-enabled forwards, the first step's `Cache.crop(-1)` + re-feed and the
    detached cache give the tokens and logits of the run that computes no saliency, with the same seed."""
    model = _windowed_mistral() if family == "mistral-window-4" else _model(family)
    inputs = _inputs(family.split("-")[0])
    kwargs = {"do_sample": do_sample, "max_new_tokens": 8, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        with iv.apply(model, "sgrs", alpha=1e-6) as handle:
            probed = model.generate(**inputs, **kwargs)
            assert handle.methods[0].stats["rejected"] == 0
            cache = probed.cache
        with iv.apply(model, "sgrs", alpha=0.0):
            plain = model.generate(**inputs, **kwargs)
    assert torch.equal(probed.sequences, plain.sequences)
    for a, b in zip(probed.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not any(t.requires_grad for layer in cache.layers for t in (layer.keys, layer.values))
    assert all(p.grad is None for p in model.parameters())


def test_frozen_parameters_give_the_same_run(recorder):
    """The probe is a leaf of its own: parameters without requires_grad change nothing."""
    model, inputs = _model("llama"), _inputs("llama")
    with torch.no_grad(), iv.apply(model, "sgrs", alpha=1.0):
        trainable = model.generate(**inputs, do_sample=True, **GEN)
        saliencies = [values for calls in recorder for _, values in calls]
        recorder.clear()
        model.requires_grad_(False)
        try:
            frozen = model.generate(**inputs, do_sample=True, **GEN)
        finally:
            model.requires_grad_(True)
    assert torch.equal(trainable, frozen)
    torch.testing.assert_close(torch.stack([v for calls in recorder for _, v in calls]), torch.stack(saliencies))


# ---- families, batches, unwrap, stacking ---------------------------------------------------------------------------
def test_forward_unchanged_and_unwrap_bit_identical():
    model, inputs = _model("llava_next"), _inputs("llava_next")
    with torch.no_grad():
        reference = model(**inputs).logits
        greedy = model.generate(**inputs, do_sample=False, max_new_tokens=4)
        with iv.apply(model, "sgrs", alpha=2.0):
            assert torch.equal(model(**inputs).logits, reference)  # sgrs never edits a forward
            model.generate(**inputs, do_sample=True, **GEN)
        assert torch.equal(model(**inputs).logits, reference)
        assert torch.equal(model.generate(**inputs, do_sample=False, max_new_tokens=4), greedy)
    assert "generate" not in vars(model)


def test_stacks_with_row_methods():
    """Under α = 0, sgrs adds nothing to locore's or pai's edits (greedy); with α > 0 the stack runs and its
    saliency sees the edited attention."""
    model, inputs = _model("llava"), _inputs("llava")
    with torch.no_grad():
        for other in (("locore", {"beta": 0.5}), ("pai", {"alpha": 0.5})):
            with iv.apply(model, [other]):
                alone = model.generate(**inputs, do_sample=False, max_new_tokens=5)
            with iv.apply(model, [("sgrs", {"alpha": 0.0}), other]):
                assert torch.equal(model.generate(**inputs, do_sample=False, max_new_tokens=5), alone)
            with iv.apply(model, [("sgrs", {"alpha": 1.0, "layers": [1, 2]}), other]) as handle:
                model.generate(**inputs, do_sample=True, **GEN)
                assert handle.methods[0].stats["steps"] == NEW


def test_stack_with_a_mirroring_branch_raises():
    model = _model("llava")
    with pytest.raises(ConfigError, match="rolls the KV cache back"):
        iv.wrap(model, [("sgrs", {}), ("pag", {"heads": [[0, 1]], "w": 1.0})])
    assert not hasattr(model, "generate") or "generate" not in vars(model)


# ---- errors and presets --------------------------------------------------------------------------------------------
def test_errors():
    model, inputs = _model("llava"), _inputs("llava")
    with pytest.raises(ConfigError, match="sgrs: top_k=0"):
        iv.wrap(model, "sgrs", top_k=0)
    with pytest.raises(ConfigError, match="layers=\\[7\\] out of range"):
        iv.wrap(model, "sgrs", layers=[7])
    with torch.no_grad(), iv.apply(model, "sgrs"):
        with pytest.raises(InputError, match="beam search"):
            model.generate(**inputs, num_beams=2, max_new_tokens=2)
        with pytest.raises(InputError, match="attentions or hidden states"):
            model.generate(**inputs, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)


def test_eos_pads_finished_samples_and_copies_differ():
    model, inputs = _model("llama"), _inputs("llama")
    with torch.no_grad(), iv.apply(model, "sgrs", alpha=0.3):  # rarely a (deterministic) fallback
        out = model.generate(**inputs, do_sample=True, max_new_tokens=12, eos_token_id=EOS_ID, pad_token_id=0,
                             num_return_sequences=2)
    rows = out[:, inputs["input_ids"].shape[1]:].tolist()
    assert rows[0] != rows[1]  # copies of one prompt draw from different per-sample generators
    for row in rows:
        if EOS_ID in row:
            assert set(row[row.index(EOS_ID) + 1:]) <= {0}


def test_preset_layers():
    assert list(preset_layers("llava", 32)) == [6, 7, 8]  # the official code's default for LLaVA-1.5-7B
    assert list(preset_layers("llava", 40)) == [8, 9, 10]  # other depths: the same relative depth
    assert list(preset_layers("qwen2_vl", 28)) == [5, 6, 7]
    assert list(preset_layers("llama", 3)) == [1]
