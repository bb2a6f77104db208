"""CARVE against the official code's prompts and mapping on LLaVA-1.5: pass G's prompt equals the official one
token for token (`<image>\\nUSER: {general} {suffix}\\nASSISTANT:`, the image segment and the template kept), and
`compat="official"` stretches the token grid over the whole original image (the code's upsampling) where the
default follows the processor's centre crop."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from tiny_models import build_model
from tiny_processors import build_processor, tokenizer

import interventions as iv
from interventions.core import templates
from interventions.methods.carve.method import Carve
from interventions.methods.carve.prompts import OFFICIAL_LLAVA_TEMPLATE
from interventions.methods.carve.refine import Placed, contrast, fuse, pixel_map
from interventions.core.geometry import Grid

GENERAL = "Write a general description of the image."
SUFFIX = "Answer the question using a single word or phrase."
QUESTION = "what is in the image ?"
WORDS = ("USER:", "ASSISTANT:", "Write", "Answer", "image.", "phrase.", *" ".join(templates.TEXTS).split())


def _llava():
    processor = build_processor("llava", tokenizer("llava", words=WORDS, newlines=True))
    processor.chat_template = OFFICIAL_LLAVA_TEMPLATE
    return build_model("llava"), processor


def _image(size=(20, 28)) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (*size, 3), dtype=np.uint8))


def _run(model, processor, monkeypatch, **params):
    """CARVE's capture batch (pass Q, pass G) and its result, for the official task prompt."""
    batches = []
    capture = Carve._capture_passes
    monkeypatch.setattr(Carve, "_capture_passes", lambda self, m, batch, *a: batches.append(batch) or capture(
        self, m, batch, *a))
    image = _image()
    inputs = dict(processor(text=[f"<image>\nUSER: {QUESTION} {SUFFIX}\nASSISTANT:"], images=[image],
                            return_tensors="pt"))
    with torch.no_grad(), iv.apply(model, "carve", processor=processor, layers=[1, 2], capture_new_tokens=2,
                                   **params) as handle:
        model.generate(**inputs, images=image, max_new_tokens=1, do_sample=False)
    return inputs, batches[0], handle.methods[0].result


def test_pass_g_prompt_equals_the_official_prompt_token_for_token(monkeypatch):
    model, processor = _llava()
    inputs, batch, _ = _run(model, processor, monkeypatch)
    official = processor(text=[f"<image>\nUSER: {GENERAL} {SUFFIX}\nASSISTANT:"], images=[_image()],
                         return_tensors="pt")["input_ids"]
    assert torch.equal(batch[0]["input_ids"], inputs["input_ids"])  # pass Q: the user's prompt
    assert batch[1]["input_ids"].tolist() == official.tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(official[0].tolist())
    assert "\n" in tokens and tokens[-2:] == ["\n", "ASSISTANT:"]  # the newline after <image> and the tail stay


def test_official_compat_stretches_the_grid_over_the_whole_image(monkeypatch):
    model, processor = _llava()
    results = {compat: _run(model, processor, monkeypatch, compat=compat)[2] for compat in ("project", "official")}
    official, project = results["official"], results["project"]
    torch.testing.assert_close(official.task_attention, project.task_attention)
    fused = fuse(contrast(official.task_attention, official.general_attention, 1e-8), "full")
    side = int(round(fused.numel() ** 0.5))
    stretched = pixel_map(fused, [Placed(Grid(side, side))], (official.image.height, official.image.width))
    np.testing.assert_allclose(official.saliency, stretched, rtol=1e-6, atol=1e-9)
    assert not np.allclose(project.saliency, stretched)  # the default maps through LLaVA's centre crop
