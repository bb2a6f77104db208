"""SGRS's key set J on a real chat template (LLaVA-1.5's, tests/fixtures/chat_templates): the paper's and the
official code's rule (`keys="after_image"`, default) takes every position after the image — the newline after
`<image>`, the question, the assistant tail; `keys="question"` keeps the question alone."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import torch
from tiny_models import IMAGE_ID, build_model
from tiny_processors import build_processor, tokenizer

import interventions as iv
from interventions.core import templates
from interventions.methods.sgrs import history_keys

TEMPLATE = json.loads((Path(__file__).parent.parent / "fixtures" / "chat_templates" /
                       "vlm_chat_templates.json").read_text())["llava"]["template"]
QUESTION = "what is in the image ?"


@torch.no_grad()
def test_after_image_keys_are_every_position_after_the_image_and_question_keys_the_question():
    model = build_model("llava")
    tok = tokenizer("llava", words=("USER:", "ASSISTANT:", *" ".join(templates.TEXTS).split()), newlines=True)
    processor = build_processor("llava", tok)
    processor.chat_template = TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 28, 3), dtype=np.uint8))
    inputs = dict(processor(text=[text], images=[image], return_tensors="pt"))
    ids = inputs["input_ids"][0]
    with iv.apply(model, "sgrs", alpha=1.0, layers=[1]) as handle:
        handle.set_template(processor)
        model(**inputs)
        call = SimpleNamespace(roles=handle.roles, query_positions=torch.tensor([len(ids) - 1]))
        official = history_keys(call, "after_image")[0]
        question = history_keys(call, "question")[0]
    after_image = int((ids == IMAGE_ID).nonzero().max()) + 1
    assert official.nonzero().flatten().tolist() == list(range(after_image, len(ids)))
    assert tok.convert_ids_to_tokens(ids[official].tolist()) == ["\n", *QUESTION.split(), "ASSISTANT:"]
    assert ids[question].tolist() == tok(QUESTION, add_special_tokens=False)["input_ids"]
