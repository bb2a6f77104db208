"""Token roles per sample: image spans, question, template, generated; with left padding and decoding."""

from __future__ import annotations

import torch
from tiny_models import IMAGE_ID, VISION_END_ID, VISION_START_ID, Prompt, build_model, make_inputs

import interventions as iv


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        if not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


@torch.no_grad()
def test_roles_left_padding_prefill_and_decode():
    model = build_model("llava")
    inputs = make_inputs(model, "llava", [Prompt(2, 5, seed=1), Prompt(6, 2, seed=2)])
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    with iv.apply(model, "pai") as handle:
        model(**inputs)
        roles = handle.roles
        for b in range(2):
            assert roles.image_spans(b) == _runs((ids[b] == IMAGE_ID).tolist())
        assert torch.equal(roles.valid, mask)
        last_image = [max(s[1] for s in roles.image_spans(b)) for b in range(2)]
        expected_question = torch.zeros_like(mask)
        for b in range(2):
            expected_question[b, last_image[b]:] = True
        assert torch.equal(roles.question, expected_question)  # 5 and 2 text tokens after the image
        assert roles.question.sum(1).tolist() == [5, 2]
        assert not roles.generated.any()
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        roles = handle.roles
        assert roles.length == out.shape[1] - 1  # the last token is sampled but never fed back
        assert roles.generated.sum(1).tolist() == [2, 2]
        assert roles.prompt_len == ids.shape[1]


@torch.no_grad()
def test_image_boundaries_are_template():
    model = build_model("qwen2_vl")
    inputs = make_inputs(model, "qwen2_vl", [Prompt(3, 4, seed=1)])
    with iv.apply(model, "pai") as handle:
        model(**inputs)
        roles = handle.roles
    ids = inputs["input_ids"][0]
    boundary = (ids == VISION_START_ID) | (ids == VISION_END_ID)
    assert torch.equal(roles.template[0], boundary)
    assert roles.question[0].sum() == 4  # the vision-end marker is not part of the question
