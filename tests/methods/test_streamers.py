"""Streamers in the methods that run their own decoding loop (sgrs, carve): every generated token is `put`, in order,
after the prompt, then `end()` once; a `TextIteratorStreamer` read with a timeout from another thread yields the
decoded answer and stops."""

from __future__ import annotations

import functools
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_models import Prompt, build_model, make_inputs
from tiny_processors import build_processor, prompt_inputs, tokenizer
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

import interventions as iv

NEW_TOKENS = 5


class Counting(BaseStreamer):
    """Records every `put` and counts the `end()` calls."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ends = 0

    def put(self, value: torch.Tensor) -> None:
        assert self.ends == 0, "put after end()"
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ends += 1


@functools.cache
def _model(family: str):
    return build_model(family)


def _sgrs_case():
    model = _model("llava")
    return model, make_inputs(model, "llava", [Prompt(3, 4, seed=1)]), [("sgrs", {"alpha": 1.0, "layers": [1]})]


def _carve_case():
    family = "llava"
    model, processor = _model(family), build_processor(family)
    image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 28, 3), dtype=np.uint8))
    inputs = prompt_inputs(processor, family, image, "what is in the image ?")
    return model, inputs, [("carve", {"processor": processor, "layers": [1, 2], "capture_new_tokens": 2})]


CASES = {"sgrs": _sgrs_case, "carve": _carve_case}
KWARGS = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_counting_streamer_gets_every_token_then_end(case):
    model, inputs, stack = CASES[case]()
    streamer = Counting()
    with iv.apply(model, stack):
        out = model.generate(**inputs, streamer=streamer, **KWARGS)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(streamer.puts[0], inputs["input_ids"])  # the user's prompt, once
    assert len(streamer.puts) == 1 + NEW_TOKENS and all(p.numel() == 1 for p in streamer.puts[1:])
    assert torch.cat([p.flatten() for p in streamer.puts[1:]]).tolist() == out[0, prompt_len:].tolist()
    assert streamer.ends == 1


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_text_iterator_streamer_with_timeout_yields_the_answer(case):
    model, inputs, stack = CASES[case]()
    tok = tokenizer("llava")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=20)
    result: dict = {}

    def run() -> None:
        with torch.no_grad():
            result["out"] = model.generate(**inputs, streamer=streamer, **KWARGS)

    with iv.apply(model, stack):
        thread = threading.Thread(target=run)
        thread.start()
        text = "".join(streamer)  # raises queue.Empty if a token or the end never comes
        thread.join(timeout=20)
    assert not thread.is_alive()
    answer = result["out"][0, inputs["input_ids"].shape[1]:]
    assert text == tok.decode(answer) and text.strip()
