"""GIFT (shared/specs/gift.md): float64 conformance of the gaze-shift map and of the enhanced last rows against
direct implementations of the spec formulas, end to end through a tiny LLaVA; the bias form against the
post-softmax formula; content words; presets and config errors; and, for every VLM family, neutral = bit-identical,
KV-cache decode = full recompute, left-padded batch = single runs."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import LLM_FAMILIES, Prompt, build_model, make_inputs
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.integrations.sdpa_attention import repeat_kv

import interventions as iv
from interventions.core import attention
from interventions.core.call import AttentionCall
from interventions.core.roles import TokenRoles
from interventions.core.rows import RowLogits
from interventions.errors import ConfigError
from interventions.methods.base import ModelInfo
from interventions.methods.gift import Gift, GiftConfig, content_mask

LAYERS = dict(saliency_layers=[0], enhancement_layers=[1, 2])
#: the Qwen2-VL-7B preset's layout: a saliency layer inside the enhancement range needs the separate saliency pass
INSIDE = dict(saliency_layers=[1], enhancement_layers=[0, 1, 2])
KWARGS = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


@functools.cache
def _model(family: str, dtype: torch.dtype = torch.float32):
    return build_model(family, dtype=dtype)


def _prompts() -> list[Prompt]:
    return [Prompt(3, 4, seed=1), Prompt(6, 2, seed=2)]


class WordTokenizer:
    """Decodes id i to " the" (a stop word) when `stop(i)`, else to a made-up content word " w<i>"."""

    def __init__(self, stop=lambda i: i % 3 == 0) -> None:
        self.stop = stop

    def decode(self, ids) -> str:
        return "".join(" the" if self.stop(i) else f" w{i}" for i in ids)


# ---- references (float64, literal spec formulas) -----------------------------------------------------------------
def _plain_probs(q, k, scaling, valid):
    length = valid.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    return torch.softmax((q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf")), -1).nan_to_num(0)


def saliency_reference(probs_by_layer, image, content, clip=True):
    """Spec §3: G = max(0, A[t] − A[t−1]) on image keys for content rows t; per layer the top H/2 heads by ΣG;
    mean over (layers, heads, tokens); clip to μ ± 3σ (torch's unbiased σ, as the official code); min-max."""
    out = torch.zeros(image.shape, dtype=torch.float64)
    for b, tokens in enumerate(content):
        img = image[b].nonzero().flatten()
        kept = []
        for a in probs_by_layer:
            g = torch.stack([(a[b, :, t, img] - a[b, :, t - 1, img]).clamp_min(0) for t in tokens], 1)
            kept.append(g[g.sum((1, 2)).topk(a.shape[1] // 2).indices])
        h = torch.stack(kept).mean((0, 1, 2))
        mu, sigma = h.mean(), h.std()
        if clip:
            h = h.clamp(float(mu - 3 * sigma), float(mu + 3 * sigma))
        out[b, img] = (h - h.min()) / (h.max() - h.min())
    return out


def enhanced_reference(a, hat, image, question, alpha, row):
    """Spec §4 on row `row`: image × S in the top-H/2 image heads, question × new/orig in the top-H/2 question
    heads (both from the unmodified row), renormalise."""
    out = a.clone()
    k = a.shape[1] // 2
    for b in range(a.shape[0]):
        p = a[b, :, row]  # (heads, keys)
        img, qst = image[b], question[b]
        s = torch.exp(alpha * hat[b])
        visual = p[:, img].sum(-1).topk(k).indices.tolist()
        textual = p[:, qst].sum(-1).topk(k).indices.tolist()
        orig = sum(p[h, img].sum() for h in visual)
        new = sum((p[h, img] * s[img]).sum() for h in visual)
        edited = p.clone()
        for h in visual:
            edited[h, img] = p[h, img] * s[img]
        for h in textual:
            edited[h, qst] = edited[h, qst] * (new / orig)
        out[b, :, row] = edited / edited.sum(-1, keepdim=True)
    return out


@pytest.fixture
def capture(monkeypatch):
    """q and k (GQA-expanded) of every text layer, per layer in call order (a saliency branch's before the main
    forward's)."""
    captured: dict[int, list] = {}
    original = attention.intervened_attention

    def spy(module, query, key, value, attention_mask, **kwargs):
        entry = (query, repeat_kv(key, module.num_key_value_groups), kwargs["scaling"])
        captured.setdefault(module.layer_idx, []).append(entry)
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(attention.AttentionInterface._global_mapping, attention.KEYS["sdpa"], spy)
    return captured


# ---- conformance ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saliency, enhancement, tokenizer", [
    ([0], [1, 2], None),
    ([0], [1, 2], WordTokenizer()),
    ([0, 1], [2], WordTokenizer()),
])
def test_map_and_last_rows_equal_spec_formulas_fp64(capture, saliency, enhancement, tokenizer):
    model = _model("llava", torch.float64)
    inputs = make_inputs(model, "llava", [Prompt(2, 6, seed=3), Prompt(5, 4, seed=4)])
    alpha = 2.5
    with torch.no_grad(), iv.apply(model, "gift", alpha=alpha, saliency_layers=saliency,
                                   enhancement_layers=enhancement) as handle:
        if tokenizer is not None:
            handle.methods[0].use_tokenizer(tokenizer)
        got = model(**inputs, output_attentions=True).attentions
        got_map = handle.methods[0].saliency_map()
        roles = handle.roles
    valid = inputs["attention_mask"].bool()
    image, question = roles.image, roles.question
    content = [[t for t in question[b].nonzero().flatten().tolist()
                if tokenizer is None or not tokenizer.stop(int(inputs["input_ids"][b, t]))] for b in range(2)]
    if tokenizer is not None:  # the filter keeps some question tokens and drops others
        assert all(0 < len(c) < int(question[b].sum()) for b, c in enumerate(content))
    plain = {layer: _plain_probs(*capture[layer][-1], valid) for layer in range(3)}

    expected_map = saliency_reference([plain[layer] for layer in saliency], image, content)
    torch.testing.assert_close(got_map, expected_map, atol=1e-10, rtol=0)
    assert torch.equal(got_map.amax(1), torch.ones(2, dtype=torch.float64))  # min S = 1, max S = e^alpha

    rows = valid[:, None, :, None]
    last = valid.shape[1] - 1
    for layer in range(3):
        expected = plain[layer]
        if layer in enhancement:
            expected = enhanced_reference(expected, expected_map, image, question, alpha, last)
            assert (got[layer][:, :, last] - plain[layer][:, :, last]).abs().max() > 1e-2  # the edit is not vacuous
        torch.testing.assert_close(got[layer].where(rows, 0), expected.where(rows, 0), atol=1e-6, rtol=0)
        sums = got[layer].sum(-1)[valid[:, None, :].expand(-1, 4, -1)]
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-12, rtol=0)


def test_separate_saliency_pass_reads_the_unmodified_model_fp64(capture):
    """A saliency layer inside the enhancement range: the map comes from an extra unmodified prefill (its layers run
    first, see `capture`), the enhancement from the main forward's own rows."""
    model = _model("llava", torch.float64)
    inputs = make_inputs(model, "llava", [Prompt(2, 6, seed=3), Prompt(5, 4, seed=4)])
    alpha = 2.5
    with torch.no_grad(), iv.apply(model, "gift", alpha=alpha, **INSIDE) as handle:
        got = model(**inputs, output_attentions=True).attentions
        got_map = handle.methods[0].saliency_map()
        roles = handle.roles
    valid = inputs["attention_mask"].bool()
    assert [len(capture[layer]) for layer in range(3)] == [2, 2, 2]  # one saliency pass, one main forward
    unmodified = _plain_probs(*capture[1][0], valid)
    expected_map = saliency_reference([unmodified], roles.image, [q.nonzero().flatten().tolist()
                                                                  for q in roles.question])
    torch.testing.assert_close(got_map, expected_map, atol=1e-10, rtol=0)
    rows, last = valid[:, None, :, None], valid.shape[1] - 1
    for layer in range(3):
        expected = enhanced_reference(_plain_probs(*capture[layer][1], valid), expected_map, roles.image,
                                      roles.question, alpha, last)
        torch.testing.assert_close(got[layer].where(rows, 0), expected.where(rows, 0), atol=1e-6, rtol=0)


def test_separate_pass_equals_same_prefill_where_both_apply():
    """Spec check 8: both sources of the map give the same map (1e-6) and logits (1e-5) in float32."""
    model = _model("llava")
    inputs = make_inputs(model, "llava", _prompts())
    results = []
    with torch.no_grad():
        for saliency_pass in ("same_prefill", "separate"):
            with iv.apply(model, "gift", alpha=3.0, saliency_pass=saliency_pass, **LAYERS) as handle:
                out = model.generate(**inputs, **KWARGS)
                results.append((handle.methods[0].saliency_map(), out))
    (map_a, a), (map_b, b) = results
    torch.testing.assert_close(map_a, map_b, atol=1e-6, rtol=0)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_bias_equals_post_softmax_formula():
    """Spec conformance 1 on a hand-built row: head 0 in H_vis only, 1 in both, 2 in H_q only, 3 in neither."""
    gift = Gift(GiftConfig(alpha=1.3, saliency_layers=[0], enhancement_layers=[1]))
    gift.attach(ModelInfo("test", num_layers=2, num_heads=4, num_kv_heads=2, has_images=True))
    image = torch.tensor([[False, True, True, True, True, False, False, False]])
    template = torch.tensor([[False] * 7 + [True]])
    roles = TokenRoles(torch.ones_like(image), image, template, prompt_len=8)
    assert roles.question.nonzero()[:, 1].tolist() == [5, 6]
    p = torch.tensor([[.05, .20, .20, .20, .20, .05, .05, .05],   # image 0.80, question 0.10
                      [.02, .15, .15, .15, .15, .15, .15, .08],   # image 0.60, question 0.30
                      [.30, .05, .05, .05, .05, .20, .20, .10],   # image 0.20, question 0.40
                      [.60, .02, .02, .02, .02, .02, .02, .28]],  # image 0.08, question 0.04
                     dtype=torch.float64)
    hat = torch.tensor([[0, 0.0, 0.4, 1.0, 0.7, 0, 0, 0]], dtype=torch.float64)
    gift._map = hat
    call = AttentionCall(1, roles, torch.arange(8))
    view = RowLogits(p.log()[None, :, None], torch.ones(1, 1, 1, 8, dtype=torch.bool), torch.arange(4),
                     torch.tensor([7]))
    gift.edit(call, view, gift.request(call))

    s = torch.exp(1.3 * hat[0])
    orig = p[:2, 1:5].sum()
    scale = (p[:2, 1:5] * s[1:5]).sum() / orig
    assert scale >= 1
    expected = p.clone()
    expected[:2, 1:5] *= s[1:5]
    expected[1:3, 5:7] *= scale
    expected /= expected.sum(-1, keepdim=True)
    torch.testing.assert_close(view.probs()[0, :, 0], expected, atol=1e-12, rtol=0)
    assert torch.equal(expected[3], p[3])


def test_map_with_outlier_clip_on_hand_built_rows():
    """Stage 1 driven through the method's hooks on given float64 logits, with an image key whose gaze shift is
    an outlier beyond μ + 3σ, so the clip (and its unbiased σ) decides the map."""
    gift = Gift(GiftConfig(alpha=1.0, saliency_layers=[0], enhancement_layers=[1]))
    gift.attach(ModelInfo("test", num_layers=2, num_heads=4, num_kv_heads=4, has_images=True))
    length = 17  # 0: BOS, 1..12: image, 13: image end marker, 14..15: question, 16: template
    image = torch.zeros(1, length, dtype=torch.bool)
    image[0, 1:13] = True
    template = torch.zeros_like(image)
    template[0, [13, 16]] = True
    roles = TokenRoles(torch.ones_like(image), image, template, prompt_len=length)
    logits = torch.randn(1, 4, length, length, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits[0, :, 14, 5] += 6.0  # a strong shift towards image key 5 at question token 14
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    call = AttentionCall(0, roles, torch.arange(length))
    request = gift.request(call)
    assert request.rows.nonzero().flatten().tolist() == [13, 14, 15]
    gift.start_sequence(roles)
    view = RowLogits(logits[:, :, request.rows].clone(), allowed[:, :, request.rows], torch.arange(4),
                     request.rows.nonzero().flatten())
    gift.edit(call, view, request)
    plain = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    expected = saliency_reference([plain], image, [[14, 15]])
    assert not torch.allclose(expected, saliency_reference([plain], image, [[14, 15]], clip=False), atol=1e-3)
    torch.testing.assert_close(gift.saliency_map(), expected, atol=1e-12, rtol=0)
    assert torch.equal(view.logits, logits[:, :, request.rows])  # read-only: no bias at the saliency layer


# ---- content words ----------------------------------------------------------------------------------------------
def test_content_mask_with_fake_and_real_bpe_tokenizers():
    pieces = {1: " Is", 2: " there", 3: " an", 4: " ele", 5: "phant", 6: " in", 7: " the", 8: " picture", 9: "?",
              10: " 2"}

    class Pieces:
        def decode(self, ids):
            return "".join(pieces[i] for i in ids)

    assert content_mask(list(range(1, 11)), Pieces()) == [False, False, False, True, True, False, False, True,
                                                          False, True]
    # a real byte-level BPE whose merges split words: align against the tokenizer's own offsets
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Is there an elephant in the picture? What colour is the man's shirt?"] * 4,
                            trainers.BpeTrainer(vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = "Is there an elephant in the picture? What colour is the man's shirt?"
    encoded = tokenizer(text, return_offsets_mapping=True)
    words = [(text.index(w), text.index(w) + len(w)) for w in ("elephant", "picture", "colour", "man", "shirt")]
    expected = [any(s < we and e > ws for ws, we in words) for s, e in encoded["offset_mapping"]]
    assert len(encoded["input_ids"]) > len(text.split()) + 4  # words are split into several tokens
    assert content_mask(encoded["input_ids"], tokenizer) == expected


@pytest.mark.parametrize("fallback", ["all_query_tokens", "disable"])
def test_question_without_content_word(fallback):
    model = _model("llava")
    inputs = make_inputs(model, "llava", _prompts())
    with torch.no_grad():
        reference = model(**inputs).logits
        with iv.apply(model, "gift", alpha=3.0, **LAYERS) as handle:
            all_tokens = model(**inputs).logits
            all_map = handle.methods[0].saliency_map()
        with iv.apply(model, "gift", alpha=3.0, empty_content_fallback=fallback, **LAYERS) as handle:
            handle.methods[0].use_tokenizer(WordTokenizer(stop=lambda i: True))
            got = model(**inputs).logits
            got_map = handle.methods[0].saliency_map()
    assert torch.isfinite(got).all() and torch.isfinite(got_map).all()
    if fallback == "all_query_tokens":
        assert torch.equal(got_map, all_map) and torch.equal(got, all_tokens)
    else:
        assert not got_map.any()  # S = 1 and query scale 1: the rows are the unmodified ones
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)


def test_sample_without_question_gets_no_enhancement():
    model = _model("llava")
    prompts = [Prompt(3, 4, seed=1), Prompt(3, 0, seed=2)]  # the second prompt ends with its image
    inputs = make_inputs(model, "llava", prompts)
    with torch.no_grad(), iv.apply(model, "gift", alpha=3.0, **LAYERS) as handle:
        got = model(**inputs).logits
        saliency = handle.methods[0].saliency_map()
        alone = model(**make_inputs(model, "llava", prompts[1:])).logits
        assert handle.methods[0].saliency_map() is None
    assert torch.isfinite(got).all() and saliency[0].any() and not saliency[1].any()
    with torch.no_grad():
        torch.testing.assert_close(alone, model(**make_inputs(model, "llava", prompts[1:])).logits, atol=1e-5, rtol=0)


# ---- presets and errors -----------------------------------------------------------------------------------------
def _bind(info: ModelInfo, **params) -> Gift:
    gift = Gift(GiftConfig.from_params(params))
    gift.attach(info)
    return gift


def test_presets_by_family_and_size():
    gift = _bind(ModelInfo("llava", 32, 32, 32, True))
    assert (gift.alpha, sorted(gift.saliency_layers)) == (5.0, [11])
    assert sorted(gift.enhancement_layers) == list(range(12, 23))
    gift = _bind(ModelInfo("llava", 40, 40, 40, True), alpha=2.0)
    assert (gift.alpha, sorted(gift.saliency_layers)) == (2.0, [10])  # an explicit alpha wins over the preset's
    assert sorted(gift.enhancement_layers) == list(range(14, 21))
    qwen = ModelInfo("qwen2_vl", 28, 28, 4, True)
    gift = _bind(qwen)  # official saliency layer 14 lies inside the enhancement layers 5..18: an extra pass
    assert (gift.alpha, sorted(gift.saliency_layers), gift.separate) == (4.0, [14], True)
    assert [(b.schedule, b.inputs, sorted(b.layers)) for b in gift.branches] == [("prefill", "same", [14])]
    assert gift.touched_layers == frozenset(range(5, 19))
    gift = _bind(qwen, saliency_layers=[4])
    assert (gift.alpha, sorted(gift.enhancement_layers), gift.separate, gift.branches) == (
        4.0, list(range(5, 19)), False, ())


@pytest.mark.parametrize("params, match", [
    (dict(alpha=1.0), "no preset for a llava model with 3 layers × 4 heads.*saliency_layers, enhancement_layers"),
    (dict(saliency_layers=[0], enhancement_layers=[1]), "pass alpha explicitly"),
    (dict(alpha=1.0, saliency_pass="same_prefill", **INSIDE),
     "same_prefill' needs saliency_layers \\[1\\] to all precede enhancement_layers 0..2"),
    (dict(alpha=1.0, saliency_layers=[0], enhancement_layers=[1, 3]), "out of range"),
    (dict(alpha=-1.0, **LAYERS), "alpha=-1.0 is invalid"),
    (dict(content_words="pos", **LAYERS), "content_words='pos' is invalid; expected one of 'auto', 'spacy'"),
])
def test_config_errors(params, match):
    model = _model("llava")
    with pytest.raises(ConfigError, match=match):
        iv.wrap(model, "gift", **params)
    assert model.get_decoder().config._attn_implementation == "sdpa"  # nothing was patched


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_llm_family_raises(family):
    with pytest.raises(ConfigError, match="gift needs image tokens, and the .* family has none"):
        iv.wrap(_model(family), "gift", alpha=1.0, **LAYERS)


# ---- shared properties on every VLM family ---------------------------------------------------------------------


@pytest.mark.parametrize("layers", [LAYERS, INSIDE], ids=["same_prefill", "separate"])
def test_only_the_last_row_changes(layers):
    """The saliency rows are read only: every row but the last keeps SDPA's output bit for bit."""
    model = _model("llava")
    inputs = make_inputs(model, "llava", _prompts())
    with torch.no_grad():
        reference = model(**inputs).logits
        with iv.apply(model, "gift", alpha=3.0, **layers):
            changed = model(**inputs).logits
    assert not torch.allclose(changed[:, -1], reference[:, -1], atol=1e-3)
    assert torch.equal(changed[:, :-1], reference[:, :-1])
