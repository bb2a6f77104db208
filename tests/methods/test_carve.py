"""CARVE (shared/specs/carve.md): contrast, step weights and pairing; token grid → pixel map for every VLM family
(a known hot region lands in the mask and the crop); threshold, 4-connected regions, black fill, crop, magnify;
captured rows equal eager `output_attentions` rows; end to end through `model.generate` with each family's real
processor class; what the passes reuse (vision-tower calls); neutral and unwrap bit-identical; the errors."""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from capture import record_row_blocks
from tiny_models import VLM_FAMILIES, build_model
from tiny_processors import build_processor, prompt_inputs, random_image, shared_processor

import interventions as iv
from interventions.core.roles import TokenRoles
from interventions.methods.carve import prompts
from interventions.core.geometry import Grid, Placed
from interventions.methods.carve.refine import (
    contrast,
    fuse,
    keep_regions,
    pixel_map,
    refine,
    step_weights,
    threshold,
)

QUESTION = "what is in the image ?"
LAYERS = [1, 2]
#: SmolVLM's processor class needs `num2words`; without it its grid is still checked through `pixel_view` below
PROCESSOR_FAMILIES = [pytest.param(f, marks=pytest.mark.skipif(
    f == "smolvlm" and importlib.util.find_spec("num2words") is None,
    reason="SmolVLMProcessor needs num2words (pip install num2words); grid mapping is tested without it"))
    for f in VLM_FAMILIES]


@functools.cache
def _model(family: str):
    return build_model(family)


_processor, _image = shared_processor, random_image


# ---- contrast, weights, fusion ---------------------------------------------------------------------------------
def test_contrast_pairs_steps_and_weights():
    task = torch.rand(5, 2, 6, dtype=torch.float64)
    general = torch.full((3, 2, 6), 0.25, dtype=torch.float64)
    con = contrast(task, general, 1e-8)
    assert con.shape == (3, 2, 6)  # min(T_Q, T_G) steps, paired by index
    torch.testing.assert_close(con, task[:3] / (0.25 + 1e-8))
    assert step_weights(4, "full").tolist() == [1, 2, 3, 4]
    assert step_weights(4, "start").tolist() == [1, 0, 0, 0]
    assert step_weights(4, "end").tolist() == [0, 0, 0, 1]
    torch.testing.assert_close(fuse(con, "full"), sum((t + 1) * con[t].sum(0) for t in range(3)))
    torch.testing.assert_close(fuse(con, "end"), con[2].sum(0))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@torch.no_grad()
def test_generate_with_original_image(family):
    """`generate(**inputs, images=original)` refines the original at its own resolution."""
    model, processor = _model(family), _processor(family)
    original = _image(4, (40, 56))
    inputs = prompt_inputs(processor, family, original, QUESTION)
    with iv.apply(model, "carve", processor=processor, layers=LAYERS, capture_new_tokens=2) as handle:
        out = model.generate(**inputs, images=original, max_new_tokens=2, do_sample=False)
        result = handle.methods[0].result
        with pytest.raises(ValueError, match="images= holds 2 images"):
            model.generate(**inputs, images=[original, original], max_new_tokens=2)
    assert result.image.size == (56, 40) and result.mask.shape == (40, 56)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_non_square_qwen_grid_uses_true_shape():
    """256 tokens on an 8 × 32 grid (spec §6.1): hot columns 24..31 of rows 0..3 map to the top-right of the image,
    not to a 16 × 16 square."""
    grid = Grid(8, 32)
    tokens = torch.zeros(8, 32, dtype=torch.float64)
    tokens[:4, 24:] = 1
    saliency = pixel_map(tokens.flatten(), [Placed(grid)], (80, 320))
    assert saliency.shape == (80, 320)
    mask = threshold(saliency, 0.1)
    ys, xs = np.nonzero(mask)
    assert ys.max() < 45 and xs.min() >= 230


def test_padded_canvas_box():
    """An image filling the top 3/4 of a square canvas (Idefics3 padding): the map samples only that part."""
    tokens = torch.zeros(4, 4, dtype=torch.float64)
    tokens[3] = 5  # the padding row
    saliency = pixel_map(tokens.flatten(), [Placed(Grid(4, 4), (0.0, 0.0, 0.75, 1.0))], (30, 40))
    assert saliency[:20].max() == 0 and saliency.max() < 5


# ---- threshold, regions, mask, crop, magnify -------------------------------------------------------------------
def _blobs() -> np.ndarray:
    s = np.zeros((40, 60))
    s[2:6, 2:6] = 1.0  # sum 16
    s[10:20, 30:40] = 0.5  # sum 50
    s[30:33, 50:58] = 3.0  # sum 72
    s[25:27, 5:7] = 2.0  # sum 8
    s[35:38, 20:22] = 0.9  # sum 5.4
    return s


def test_threshold_regions_four_connected():
    smooth = np.random.RandomState(0).rand(40, 60)
    assert abs(threshold(smooth, 0.1).mean() - 0.1) < 1e-3  # about p of the pixels
    s = _blobs()
    kept = keep_regions(s, s > 0, 2, "max", 0.1)
    assert kept[30, 50] and kept[15, 35] and not kept[3, 3] and not kept[26, 6]
    official = keep_regions(s, s > 0, 3, "official_min", 0.1)  # max(3, int(5 · 0.1)) = 3
    assert official[3, 3] and not official[26, 6]
    diagonal = np.zeros((5, 5))
    diagonal[1, 1] = diagonal[2, 2] = 1.0  # touching only by a corner: two regions under 4-connectivity
    assert keep_regions(diagonal, diagonal > 0, 1, "max", 0.5).sum() == 1


def test_refine_blacks_out_crops_and_magnifies():
    image = _image(1, (40, 60))
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 30:40] = True
    mask[12:14, 45:50] = True
    refined, box = refine(image, mask)
    assert box == (30, 10, 50, 20)  # union bbox (left, top, right, bottom)
    assert refined.size == (80, 40)  # s = max(W/cw, H/ch) = max(60/20, 40/10) = 4: height matches, width >= 60
    unscaled = np.asarray(PIL.Image.fromarray(np.asarray(image) * mask[..., None]).crop(box))
    assert (unscaled[:, 10:15] == 0).all() and (unscaled[0:2, 15:20] == 0).all()  # outside the regions: exactly 0
    assert refined.width / refined.height == pytest.approx(20 / 10)
    full, box = refine(image, np.ones((40, 60), dtype=bool))
    assert box == (0, 0, 60, 40) and np.array_equal(np.asarray(full), np.asarray(image))  # p = 1: pixel-identical
    with pytest.raises(ValueError, match="NaN"):
        threshold(np.full((4, 4), np.nan), 0.2)


# ---- prompts ----------------------------------------------------------------------------------------------------
def test_general_prompt_keeps_image_segment_and_template_suffix():
    """Pass G replaces only the question: the image segment (with Qwen's vision start/end) and the chat template's
    tail stay; pass F swaps the image segment."""
    processor = build_processor("llava")
    processor.chat_template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                               "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}ASSISTANT:")
    suffix = prompts.template_suffix(processor)
    assert processor.tokenizer.convert_ids_to_tokens(list(suffix)) == ["ASSISTANT:"]
    inputs = processor(text=["<s> USER: <image> what is in the image ? ASSISTANT:"], images=[_image()],
                       return_tensors="pt")
    ids = inputs["input_ids"][0]
    block = prompts.image_block(processor, [_image(1)], nested=False)
    prompt = prompts.split_prompt(ids, {}, block, 3, set(), suffix)
    general = torch.tensor(processor.tokenizer("write a general description", add_special_tokens=False)["input_ids"])
    g_ids = prompts.general_inputs(prompt, general)["input_ids"][0]
    q0, q1 = prompt.question
    assert torch.equal(g_ids, torch.cat([ids[:q0], general, ids[q1:]]))
    assert processor.tokenizer.decode(ids[q0:q1]) == "what is in the image ?"
    qwen = _processor("qwen2_vl")
    q_inputs = prompt_inputs(qwen, "qwen2_vl", _image(), QUESTION)
    q_ids = q_inputs["input_ids"][0]
    special = {i for i, t in qwen.tokenizer.added_tokens_decoder.items() if t.special} - {0, 1, 2, 3}
    q_prompt = prompts.split_prompt(q_ids, {"mm_token_type_ids": q_inputs["mm_token_type_ids"][0]},
                                    prompts.image_block(qwen, [_image()], nested=False), 3, special, ())
    s0, s1 = q_prompt.segment
    assert q_ids[s0] == 5 and q_ids[s1 - 1] == 6  # <|vision_start|> … <|vision_end|>
    two = [prompts.image_block(qwen, [im], nested=False) for im in (_image(), _image(1, (40, 20)))]
    final = prompts.final_inputs(q_prompt, two, prompts.image_block(qwen, [_image(), _image(1, (40, 20))], False))
    f_ids = final["input_ids"][0]
    assert (f_ids == 5).sum() == 2 and (f_ids == 6).sum() == 2 and final["image_grid_thw"].shape[0] == 2
    assert torch.equal(final["mm_token_type_ids"][0], (f_ids == 3).long())


def test_roles_follow_a_cache_grown_for_a_shared_prefix():
    """The core's token roles accept a batch grown by a whole factor after a prefill (the shared-prefix path)."""
    ids = torch.tensor([[1, 3, 3, 7]])
    roles = TokenRoles.from_prompt(ids, None, (3,), 4, 1, 4, torch.device("cpu"))
    grown = roles.extend(torch.tensor([[0, 9], [8, 9]]), torch.tensor([[1, 1, 1, 1, 0, 1], [1] * 6]), 4, 2, (3,))
    assert grown.batch_size == 2 and torch.equal(grown.image[:, :4], roles.image.expand(2, -1))
    assert grown.valid.tolist() == [[True] * 4 + [False, True], [True] * 6]
    with pytest.raises(ValueError, match="batch size changed from 2 to 3"):
        grown.extend(torch.ones(3, 1, dtype=torch.long), None, 6, 1, (3,))


# ---- through the model -----------------------------------------------------------------------------------------
@torch.no_grad()
def test_captured_rows_equal_eager_attention():
    """Pass Q's rows (recomputed last row, SDPA elsewhere, KV cache) equal eager `output_attentions` rows of a
    no-cache recompute, for every layer and step (spec conformance 2)."""
    family = "llava"
    model, processor = _model(family), _processor(family)
    inputs = prompt_inputs(processor, family, _image(), QUESTION)
    with iv.apply(model, "carve", processor=processor, layers=LAYERS, capture_new_tokens=4) as handle:
        model.generate(**inputs, max_new_tokens=1)
        rows, answer = handle.methods[0].result.task_attention, handle.methods[0].result.answer_ids
    assert rows.shape[0] == answer.numel() >= 2
    eager = build_model(family)
    eager.set_attn_implementation("eager")
    ids = inputs["input_ids"]
    image = (ids[0] == model.config.image_token_id)
    for step in range(rows.shape[0]):
        seq = torch.cat([ids, answer[None, :step]], 1)
        out = eager(input_ids=seq, pixel_values=inputs["pixel_values"], output_attentions=True, use_cache=False)
        for i, layer in enumerate(LAYERS):
            expected = out.attentions[layer][0, :, -1, : ids.shape[1]][:, image].mean(0)
            torch.testing.assert_close(rows[step, i], expected, atol=1e-5, rtol=1e-5)


def _vision_module(model):
    inner = model.model
    return next(getattr(inner, n) for n in ("vision_tower", "visual", "vision_model") if hasattr(inner, n))


@pytest.mark.parametrize("family", PROCESSOR_FAMILIES)
@torch.no_grad()
def test_end_to_end_generate(family):
    """A plain `model.generate(**inputs)` runs the three passes with the family's processor: the output starts with
    the user's prompt; pass Q's answer is the unmodified greedy answer (read-only rows); the vision tower runs twice
    (the user's call encodes the image once and passes Q and G reuse it; pass F encodes the refined image); the
    prefix Q and G share is prefilled once."""
    model, processor = _model(family), _processor(family)
    inputs = prompt_inputs(processor, family, _image(), QUESTION)
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    other = prompt_inputs(processor, family, _image(9, (40, 20)), "where")
    model.generate(**other, max_new_tokens=1)  # state a model keeps between calls (Qwen's rope deltas) must not leak
    prompt_len = inputs["input_ids"].shape[1]
    calls, prefills = [], []
    tower = _vision_module(model).register_forward_hook(lambda *a: calls.append(1))
    try:
        with iv.apply(model, "carve", processor=processor, layers=LAYERS, capture_new_tokens=3) as handle:
            hook = model.register_forward_pre_hook(
                lambda m, a, k: prefills.append(tuple(k["input_ids"].shape)) if k.get("input_ids") is not None
                and k["input_ids"].shape[1] > 1 else None, with_kwargs=True)
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            hook.remove()
            result = handle.methods[0].result
    finally:
        tower.remove()
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"]) and out.shape[1] <= prompt_len + 3
    assert torch.equal(result.answer_ids, plain[0, prompt_len:])
    assert len(calls) == 2
    # the prefix shared by Q and G (up to the question) once, their two different tails as a batch, then F
    assert [shape[0] for shape in prefills] == [1, 2, 1] and prefills[0][1] < prompt_len
    assert result.mask.shape == (result.image.height, result.image.width) and result.mask.any()
    assert result.overlay().size == result.image.size
    left, top, right, bottom = result.box
    assert max(result.image.width / (right - left), result.image.height / (bottom - top)) * (right - left) == \
        pytest.approx(result.refined.width, abs=1)


@torch.no_grad()
def test_only_last_rows_of_capture_layers_are_materialised(monkeypatch):
    """Capture passes recompute one row (the last) of every head in each capture layer per forward; the final pass
    and the other layers stay on SDPA."""
    family = "llava"
    model, processor = _model(family), _processor(family)
    inputs = prompt_inputs(processor, family, _image(), QUESTION)
    blocks = record_row_blocks(monkeypatch)
    with iv.apply(model, "carve", processor=processor, layers=[2], capture_new_tokens=3) as handle:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        steps = max(len(handle.methods[0].result.answer_ids), 1)
    assert {(rows, heads) for rows, heads, _ in blocks} == {(1, model.config.text_config.num_attention_heads)}
    assert steps <= len(blocks) <= 3  # one per capture forward of the [Q, G] batch


@torch.no_grad()
def test_cached_general_pass_equals_independent_runs():
    """`cache_general`: a second question on the same image runs pass Q alone and reuses pass G's rows; the map
    equals that of an independent run (spec conformance 9)."""
    family = "qwen2_vl"
    model, processor = _model(family), _processor(family)
    image = _image(5)
    first, second = (prompt_inputs(processor, family, image, q) for q in (QUESTION, "where is the red square ?"))
    batches = []
    hook = model.register_forward_pre_hook(lambda m, a, k: batches.append(k["input_ids"].shape[0])
                                           if k["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        with iv.apply(model, "carve", processor=processor, layers=LAYERS, capture_new_tokens=3) as handle:
            model.generate(**second, max_new_tokens=2, do_sample=False)
            alone = handle.methods[0].result
        with iv.apply(model, "carve", processor=processor, layers=LAYERS, capture_new_tokens=3,
                      cache_general=True) as handle:
            model.generate(**first, max_new_tokens=2, do_sample=False)
            general = handle.methods[0].result.general_attention
            batches.clear()
            model.generate(**second, max_new_tokens=2, do_sample=False)
            cached = handle.methods[0].result
    finally:
        hook.remove()
    assert batches == [1, 1]  # pass Q alone, then pass F
    assert torch.equal(cached.general_attention, general)
    torch.testing.assert_close(cached.general_attention, alone.general_attention, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.task_attention, alone.task_attention, atol=1e-5, rtol=1e-5)
    assert np.array_equal(cached.mask, alone.mask)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@torch.no_grad()
def test_original_plus_refined_and_beams(family):
    """The official two-image final pass builds a valid prompt; beams and several return sequences run in pass F."""
    model, processor = _model(family), _processor(family)
    inputs = prompt_inputs(processor, family, _image(2), QUESTION)
    prompt_len = inputs["input_ids"].shape[1]
    with iv.apply(model, "carve", processor=processor, layers=LAYERS, capture_new_tokens=2,
                  final_images="original+refined"):
        out = model.generate(**inputs, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 2 and torch.equal(out[:, :prompt_len], inputs["input_ids"].expand(2, -1))


@torch.no_grad()
def test_neutral_unwrap_bit_identical_and_config_round_trip():
    family = "qwen2_vl"
    model, processor = _model(family), _processor(family)
    inputs = prompt_inputs(processor, family, _image(), QUESTION)
    plain = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    logits = model(**inputs).logits
    with iv.apply(model, "carve", processor=processor, layers=LAYERS, keep=1.0):
        neutral = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    assert torch.equal(neutral.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(neutral.logits, plain.logits, strict=True))
    handle = iv.wrap(model, "carve", processor=processor, layers=LAYERS, capture_new_tokens=2)
    config = handle.config
    assert "processor" not in config["stack"][0]["params"]
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    handle.unwrap()
    assert torch.equal(model(**inputs).logits, logits)
    assert "generate" not in vars(model)
    again = iv.wrap(model, config, processor=processor)
    assert again.config == config
    again.unwrap()


def test_errors():
    model, processor = _model("llava"), _processor("llava")
    with pytest.raises(ValueError, match="carve: processor is required"):
        iv.wrap(model, "carve", layers=LAYERS)
    with iv.apply(model, "carve", processor=processor) as handle:  # 3 layers: the official 20..25 of 32, relative
        assert sorted(handle.methods[0].layers) == [1, 2]
    with pytest.raises(ValueError, match="not a VLM processor"):
        iv.wrap(model, "carve", processor=processor.tokenizer, layers=LAYERS)
    other = build_model("llava")
    other.config.image_token_id = 4  # the processor writes 3
    with pytest.raises(ValueError, match="without the model's image_token_id 4"):
        iv.wrap(other, "carve", processor=processor, layers=LAYERS)
    with pytest.raises(ValueError, match="keep=0"):
        iv.wrap(model, "carve", processor=processor, layers=LAYERS, keep=0)
    with pytest.raises(ValueError, match="text-only"):
        iv.wrap(build_model("llama"), "carve", processor=processor, layers=LAYERS)
    assert "generate" not in vars(model)
    inputs = dict(processor(text=["<s> <image> what is", "<s> <image> what is in the image ?"],
                            images=[_image(), _image(1)], return_tensors="pt", padding=True))
    two_images = dict(processor(text=["<s> <image> <image> what is"], images=[_image(), _image(1)],
                                return_tensors="pt"))
    with iv.apply(model, "carve", processor=processor, layers=LAYERS, capture_new_tokens=2):
        with pytest.raises(ValueError, match="a batch of 2 prompts runs prompt by prompt"):
            model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="images= holds 1 images for 2 prompt"):
            model.generate(**inputs, max_new_tokens=2, images=[_image()])
        with pytest.raises(ValueError, match="2 images or crops; CARVE refines one image per prompt"):
            model.generate(**two_images, max_new_tokens=2)


def test_processor_class_is_real():
    assert isinstance(_processor("qwen2_vl"), transformers.Qwen2VLProcessor)
