"""`Handle.set_template` on the real chat templates of every VLM family (tests/fixtures/chat_templates, sources
noted there): the question span of a prompt built as a user builds it (template rendered with an image and a text
part, then the processor) is exactly the user's text tokens — no template word, no image marker, no newline."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_models import VLM_FAMILIES, build_model
from tiny_processors import build_processor, tokenizer

import interventions as iv
from interventions.core import templates
from interventions.errors import ConfigError

FIXTURES = json.loads((Path(__file__).parent.parent / "fixtures" / "chat_templates" /
                       "vlm_chat_templates.json").read_text())
QUESTION = "what is in the image ?"
#: the chat templates' marker tokens (special: split out of the text before words)
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<start_of_turn>", "<end_of_turn>", "<end_of_utterance>")
#: the templates' words and `set_template`'s probe texts
WORDS = ("USER:", "ASSISTANT:", "[INST]", "[/INST]", "system", "user", "assistant", "model", "You", "helpful",
         "assistant.", "User:", "Assistant:", *" ".join(templates.TEXTS).split())


@functools.cache
def _model(family: str):
    return build_model(family)


def _processor(family: str):
    tok = tokenizer(family, words=WORDS, specials=SPECIALS, newlines=True)
    processor = build_processor(family, tok)
    processor.chat_template = FIXTURES[family]["template"]
    return processor


def _user_prompt(processor, family: str) -> dict:
    """As a user writes it: the processor's chat template with an image and the question, then the processor."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    # the processor's `apply_chat_template` renders this same Jinja (SmolVLM's also wants a video processor)
    text = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template,
                                                   add_generation_prompt=True, tokenize=False)
    image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 28, 3), dtype=np.uint8))
    images = [[image]] if family in ("idefics3", "smolvlm") else [image]
    bos = processor.tokenizer.bos_token
    return dict(processor(text=[text], images=images, return_tensors="pt",
                          add_special_tokens=not text.startswith(bos)))


def test_every_vlm_family_has_a_real_template_fixture():
    assert set(FIXTURES) == set(VLM_FAMILIES)
    assert all(entry["model"] and entry["found_in"] and entry["template"] for entry in FIXTURES.values())


@pytest.mark.parametrize("family", VLM_FAMILIES)
@torch.no_grad()
def test_question_span_is_exactly_the_users_text(family):
    if family == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words")
    model, processor = _model(family), _processor(family)
    inputs = _user_prompt(processor, family)
    expected = processor.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    with iv.apply(model, "pai", alpha=0.5) as handle:
        model(**inputs)
        before = handle.roles.question[0]
        handle.set_template(processor)
        model(**inputs)
        question = handle.roles.question[0]
    ids = inputs["input_ids"][0]
    assert ids[question].tolist() == expected
    assert ids[before].tolist() != expected  # without the template, template tokens count as question


def test_string_only_template_and_missing_template():
    """An LLM-style template (string content) renders as such; no template at all raises a clear error."""
    model, processor = _model("llava"), _processor("llava")
    tok = processor.tokenizer
    with iv.apply(model, "pai", alpha=0.5) as handle:
        tok.chat_template = "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
        assert handle.set_template(tok) == (tuple(tok("USER:")["input_ids"]), tuple(tok("ASSISTANT:")["input_ids"]))
        tok.chat_template = None
        with pytest.raises(ConfigError, match="no chat template"):
            handle.set_template(tok)
