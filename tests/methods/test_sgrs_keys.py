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
from interventions.methods.sgrs.method import history_keys

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


@torch.no_grad()
def test_idefics3_closing_fake_token_is_not_a_key_once_the_tokenizer_names_it():
    """Idefics3's config names no image markers: `<fake_token_around_image>` after the image is excluded from J
    once `set_template` gives the processor's tokenizer (its id becomes a boundary token)."""
    model = build_model("idefics3")
    tok = tokenizer("idefics3", words=("User:", "Assistant:", *" ".join(templates.TEXTS).split()),
                    specials=("<|begin_of_text|>",), newlines=True)
    processor = build_processor("idefics3", tok)
    processor.chat_template = json.loads((Path(__file__).parent.parent / "fixtures" / "chat_templates" /
                                          "vlm_chat_templates.json").read_text())["idefics3"]["template"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = tok.apply_chat_template(messages, chat_template=processor.chat_template, add_generation_prompt=True,
                                   tokenize=False)
    image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 28, 3), dtype=np.uint8))
    inputs = dict(processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False))
    ids = inputs["input_ids"][0]
    fake = tok.convert_tokens_to_ids("<fake_token_around_image>")
    after_image = int((ids == IMAGE_ID).nonzero().max()) + 1
    assert ids[after_image] == fake
    with iv.apply(model, "sgrs", alpha=1.0, layers=[1]) as handle:
        model(**inputs)
        call = SimpleNamespace(roles=handle.roles, query_positions=torch.tensor([len(ids) - 1]))
        before = history_keys(call, "after_image", handle.methods[0].boundary_ids)[0]
        handle.set_template(processor)
        model(**inputs)
        call = SimpleNamespace(roles=handle.roles, query_positions=torch.tensor([len(ids) - 1]))
        keys = history_keys(call, "after_image", handle.methods[0].boundary_ids)[0]
    assert bool(before[after_image]) and not bool(keys[after_image])
    assert keys.nonzero().flatten().tolist() == list(range(after_image + 1, len(ids)))
