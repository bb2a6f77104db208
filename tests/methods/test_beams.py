"""Beam search and `num_return_sequences` for every (method, family) pair that supports them, against references:

- beam search: a beam search written out here (the same algorithm as transformers' `_beam_search` without EOS:
  log-softmax, then the logits processors, the top `num_beams` of all beam × token sums), in which every step
  recomputes each hypothesis from scratch through the wrapped model (no KV cache, no reordering, one image encoding
  per hypothesis), run inside the user's `generate` as a `custom_generate` so the wrapper knows where the prompt ends;
- `num_return_sequences` with sampling: the same prompt repeated in the batch by hand, with the same seed;
- the pairs that cannot follow a reordered cache (pag, pai `use_cfg`, sgrs) raise a clear error.
EOS and the other special ids are suppressed (`suppress_tokens`): no hypothesis finishes early or writes an image
placeholder (a generated one is text to the wrapper, an image to a full recompute); `length_penalty=0` makes a
sequence's score the sum of its token log-probabilities.
"""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import (
    FIRST_TEXT_ID,
    LLM_FAMILIES,
    VLM_FAMILIES,
    Prompt,
    build_model,
    make_inputs,
)

import interventions as iv
from interventions.errors import InputError

#: stacks for the tiny 3-layer models, and the families they run on
CASES = {
    "act": ("act", {"beta": 0.3, "threshold": 0.05, "layers": [0, 1, 2]}),
    "cca": ("cca", {}),
    "gift": ("gift", {"alpha": 3.0, "saliency_layers": [0], "enhancement_layers": [1, 2]}),
    "locore": ("locore", {"beta": 1.0}),
    "pai": ("pai", {"alpha": 0.5, "start_layer": 1}),
    "paint": ("paint", {"start_layer": 1}),
    "var": ("var", {"sink_dims": list(range(16)), "tau": 2.0, "layers": [1, 2]}),
    "vhr": ("vhr", {"alpha": 2.0, "layers": [0, 1, 2]}),
}
TEXT_CASES = ("act", "locore")
NO_CCA = ("qwen2_vl", "qwen2_5_vl")  # cca refuses M-RoPE families at wrap time (tested in test_cca)
PAIRS = ([(f, c) for f in VLM_FAMILIES for c in CASES if not (c == "cca" and f in NO_CCA)]
         + [(f, c) for f in LLM_FAMILIES for c in TEXT_CASES])
REFUSED = {"pag": ("pag", {"heads": [[0, 1], [1, 2]], "u": 1.0, "w": 2.0}),
           "pai-cfg": ("pai", {"alpha": 0.5, "start_layer": 1, "use_cfg": True, "gamma": 2.0}),
           "sgrs": ("sgrs", {"alpha": 1.0})}
STEPS, BEAMS = 3, 3
#: EOS, image placeholders and markers: no hypothesis finishes early or writes an image token
SPECIAL = list(range(FIRST_TEXT_ID))
BEAM_KWARGS = dict(max_new_tokens=STEPS, num_beams=BEAMS, do_sample=False, suppress_tokens=SPECIAL,
                   length_penalty=0.0, return_dict_in_generate=True, output_scores=True)


@functools.cache
def _model(family: str):
    return build_model(family)


def _prompts(family: str) -> list[Prompt]:
    """Two prompts of one length (no padding: the reference runs each alone)."""
    image = family in VLM_FAMILIES
    return [Prompt(3, 4, seed=1, image=image), Prompt(4, 3, seed=2, image=image)]


def _rows(model, family: str, prompt: Prompt, sequences: torch.Tensor) -> dict:
    """Inputs of `len(sequences)` rows, each the prompt (its own image encoding) continued by generated tokens."""
    inputs = make_inputs(model, family, [prompt] * sequences.shape[0])
    extra = sequences.shape[1] - inputs["input_ids"].shape[1]
    inputs["input_ids"] = sequences
    for key in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            fill = 1 if key == "attention_mask" else 0
            inputs[key] = torch.nn.functional.pad(inputs[key], (0, extra), value=fill)
    return inputs


def hand_beam_search(model, family: str, prompt: Prompt, num_beams: int, steps: int) -> list[tuple[list[int], float]]:
    """`(new tokens, summed log-prob)` of the final beams of one prompt, best first (see the module docstring)."""
    found: list[tuple[list[int], float]] = []

    def search(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None, **kwargs):
        beams = [(input_ids[0], 0.0)]
        for _ in range(steps):
            sequences = torch.stack([seq for seq, _ in beams])
            logits = model(**_rows(model, family, prompt, sequences), use_cache=False).logits[:, -1].float()
            log_probs = logits_processor(sequences, torch.log_softmax(logits, -1))
            total = (torch.tensor([score for _, score in beams])[:, None] + log_probs).flatten()
            top = total.topk(num_beams)
            vocab = log_probs.shape[-1]
            beams = [(torch.cat([beams[i // vocab][0], torch.tensor([i % vocab])]), float(v))
                     for v, i in zip(top.values.tolist(), top.indices.tolist())]
        found.extend((seq[input_ids.shape[1]:].tolist(), score) for seq, score in beams)
        return torch.stack([seq for seq, _ in beams])

    with torch.no_grad():
        model.generate(**make_inputs(model, family, [prompt]), custom_generate=search, max_new_tokens=steps,
                       do_sample=False, suppress_tokens=SPECIAL)
    return found


def _stack(case: str):
    name, params = CASES[case]
    return [(name, params)]


@pytest.mark.parametrize("family, case", PAIRS)
def test_beam_search_equals_hand_beam_search(family, case):
    model = _model(family)
    prompts = _prompts(family)
    inputs = make_inputs(model, family, prompts)
    with torch.no_grad(), iv.apply(model, _stack(case)):
        out = model.generate(**inputs, num_return_sequences=BEAMS, **BEAM_KWARGS)
        references = [hand_beam_search(model, family, prompt, BEAMS, STEPS) for prompt in prompts]
    width = inputs["input_ids"].shape[1]
    for i, reference in enumerate(references):
        rows = slice(i * BEAMS, (i + 1) * BEAMS)
        assert out.sequences[rows, width:].tolist() == [tokens for tokens, _ in reference]
        torch.testing.assert_close(out.sequences_scores[rows], torch.tensor([s for _, s in reference]),
                                   atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # the method changes the beams (the reference is not the plain model's)
        plain = model.generate(**inputs, num_return_sequences=BEAMS, **BEAM_KWARGS)
    assert not torch.allclose(plain.sequences_scores, out.sequences_scores, atol=1e-4)


@pytest.mark.parametrize("family, case", PAIRS)
def test_sampled_return_sequences_equal_a_batch_repeated_by_hand(family, case):
    model = _model(family)
    prompts = _prompts(family)
    kwargs = dict(max_new_tokens=STEPS, do_sample=True, top_k=0, suppress_tokens=SPECIAL)
    with torch.no_grad(), iv.apply(model, _stack(case)):
        torch.manual_seed(7)
        out = model.generate(**make_inputs(model, family, prompts), num_return_sequences=2, **kwargs)
        torch.manual_seed(7)
        by_hand = model.generate(**make_inputs(model, family, [p for p in prompts for _ in range(2)]), **kwargs)
    assert torch.equal(out, by_hand)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_beam_search_refusals_are_clear(case):
    family = "llava"
    model = _model(family)
    with torch.no_grad(), iv.apply(model, [REFUSED[case]]), pytest.raises(InputError, match="beam search"):
        model.generate(**make_inputs(model, family, _prompts(family)), max_new_tokens=2, num_beams=2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "llama"])
def test_sgrs_sampled_return_sequences_equal_a_batch_repeated_by_hand(family):
    """SGRS draws per-sample seeds from each prompt and its rank among identical prompts: copies differ."""
    model = _model(family)
    prompts = _prompts(family)
    kwargs = dict(max_new_tokens=STEPS, do_sample=True, suppress_tokens=SPECIAL)
    with torch.no_grad(), iv.apply(model, "sgrs", alpha=1.0, layers=[1]):
        out = model.generate(**make_inputs(model, family, prompts), num_return_sequences=2, **kwargs)
        by_hand = model.generate(**make_inputs(model, family, [p for p in prompts for _ in range(2)]), **kwargs)
    assert torch.equal(out, by_hand)
    assert not torch.equal(out[0], out[1]) or not torch.equal(out[2], out[3])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_carve_beams_are_the_plain_beam_search_of_its_final_prompt(family, monkeypatch):
    """CARVE's pass F is the user's generation config on the refined prompt: with beams and several return
    sequences its answer equals transformers' beam search of the unwrapped model on that prompt."""
    import numpy as np
    import PIL.Image
    from tiny_processors import build_processor, prompt_inputs

    from interventions.methods.carve.method import Carve

    model, processor = _model(family), build_processor(family)
    image = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 28, 3), dtype=np.uint8))
    inputs = prompt_inputs(processor, family, image, "what is in the image ?")
    finals = []
    run = Carve._run
    monkeypatch.setattr(Carve, "_run", lambda self, *a: finals.append(run(self, *a)) or finals[-1])
    kwargs = {**BEAM_KWARGS, "return_dict_in_generate": False}
    with torch.no_grad(), iv.apply(model, "carve", processor=processor, layers=[1, 2], capture_new_tokens=2):
        out = model.generate(**inputs, num_return_sequences=2, **kwargs)
    with torch.no_grad():
        reference = model.generate(**finals[0], num_return_sequences=2, **kwargs)
    prompt_len, final_len = inputs["input_ids"].shape[1], finals[0]["input_ids"].shape[1]
    assert torch.equal(out[:, prompt_len:], reference[:, final_len:])
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"].expand(2, -1))
