"""GIFT's question span on LLaVA-1.5 with the real llava-hf chat template (spec check 7): the span from the token
roles (`Handle.set_template`) equals the official hard-coded offsets `[v_e + 3, len − 6]`, and
`official_span_offsets=True` reads exactly those.

The llava-hf Llama tokenizer cannot be downloaded here; the stand-in below segments the template's pieces as the
official offsets assume (a byte-fallback BPE behind a sentencepiece-style `▁` prefix on every text chunk): after
`<image>` the text starts with `▁`, `<0x0A>` (so the question starts 3 after the last image token), and
`" ASSISTANT:"` is the 5 tokens `▁A SS IST ANT :` (so it ends at `len − 6`). The question itself is spelled out
letter by letter.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from tiny_models import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, VOCAB_SIZE, build_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

import interventions as iv
from interventions.core import templates
from interventions.errors import ConfigError

TEMPLATE = json.loads((Path(__file__).parent.parent / "fixtures" / "chat_templates" /
                       "vlm_chat_templates.json").read_text())["llava"]["template"]
QUESTION = "what is in the image?"
MERGES = [("▁", "A"), ("S", "S"), ("I", "S"), ("IS", "T"), ("A", "N"), ("AN", "T")]


def llama_like_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Characters, `<0x0A>` by byte fallback, the merges of `▁ASSISTANT:`; BOS added; ids inside the tiny vocab."""
    text = " ".join([QUESTION, *templates.TEXTS, "USER: ASSISTANT:"]).replace(" ", "")
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<image>": IMAGE_ID}
    for piece in ["<0x0A>", "▁", *sorted(set(text)), *("".join(m) for m in MERGES)]:
        vocab.setdefault(piece, len(vocab) + 12)  # ids from 16 on: clear of the tiny layout's special ids
    assert max(vocab.values()) < VOCAB_SIZE
    core = Tokenizer(models.BPE(vocab, MERGES, byte_fallback=True, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>")
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


@functools.cache
def _setup():
    model = build_model("llava")
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16},
                                                         crop_size={"height": 16, "width": 16})
    processor = transformers.LlavaProcessor(image_processor, llama_like_tokenizer(), patch_size=4,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=TEMPLATE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == f"USER: <image>\n{QUESTION} ASSISTANT:"  # the llava-hf rendering
    image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 28, 3), dtype=np.uint8))
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    return model, processor, inputs


def _official(ids: torch.Tensor) -> list[int]:
    v_e = int((ids == IMAGE_ID).nonzero().max())
    return list(range(v_e + 3, len(ids) - 6 + 1))


@pytest.mark.parametrize("official", [False, True])
@torch.no_grad()
def test_gift_question_span_equals_the_official_offsets_on_llava(official):
    model, processor, inputs = _setup()
    ids = inputs["input_ids"][0]
    tok = processor.tokenizer
    v_e = int((ids == IMAGE_ID).nonzero().max())
    assert tok.convert_ids_to_tokens(ids[v_e + 1:v_e + 3].tolist()) == ["▁", "<0x0A>"]
    assert tok.convert_ids_to_tokens(ids[-5:].tolist()) == ["▁A", "SS", "IST", "ANT", ":"]
    with iv.apply(model, "gift", alpha=3.0, saliency_layers=[0], enhancement_layers=[1, 2], content_words="all",
                  official_span_offsets=official) as handle:
        handle.set_template(processor)
        model(**inputs)
        span = handle.methods[0].question(handle.roles)[0].nonzero().flatten().tolist()
        roles_span = handle.roles.question[0].nonzero().flatten().tolist()
    assert span == roles_span == _official(ids)
    assert tok.decode(ids[span]).strip() == QUESTION


def test_official_span_offsets_refused_where_the_official_code_has_none():
    with pytest.raises(ConfigError, match="official_span_offsets"):
        iv.wrap(build_model("gemma3"), "gift", alpha=3.0, saliency_layers=[0], enhancement_layers=[1, 2],
                official_span_offsets=True)
