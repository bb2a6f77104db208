"""Wrapped models that accelerate dispatched (`device_map`, layers offloaded to disk) or bitsandbytes quantised:
the same wrap gives the outputs of the undispatched model, and on 4-bit weights those of a float model holding the
de-quantised weights."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
import transformers
from tiny_models import Prompt, build_model, make_inputs

import interventions as iv

STACKS = [("act", {"layers": [0, 1, 2], "threshold": 0.05}), ("locore", {"beta": 0.5, "window": 2})]
#: layer 0 on the CPU, layers 1 and 2 offloaded to disk (accelerate loads their weights at each forward)
DISK_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    build_model("llama").save_pretrained(folder)
    return folder


def _inputs(model):
    return make_inputs(model, "llama", [Prompt(9, 0, seed=1, image=False), Prompt(5, 0, seed=2, image=False)])


def _outputs(model, inputs, stack=None):
    """Prompt logits and the scores of a greedy 6-token continuation with the KV cache (under `stack`), stacked
    `(batch, prompt + 6, vocab)`, and the generated tokens."""
    with torch.no_grad(), iv.apply(model, [stack]) if stack else contextlib.nullcontext():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    return torch.cat([logits, torch.stack(out.scores, 1)], 1), out.sequences


@pytest.mark.parametrize("stack", STACKS, ids=[s[0] for s in STACKS])
def test_device_map_with_disk_offload_equals_the_undispatched_model(checkpoint, tmp_path, stack):
    plain = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    dispatched = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, device_map=DISK_MAP, offload_folder=tmp_path / "offload").eval()
    assert set(dispatched.hf_device_map.values()) == {"cpu", "disk"}
    assert hasattr(dispatched.model.layers[1], "_hf_hook")  # accelerate's hooks are in place
    inputs = _inputs(plain)
    ref_logits, ref_tokens = _outputs(plain, inputs, stack)
    logits, tokens = _outputs(dispatched, inputs, stack)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    assert torch.equal(tokens, ref_tokens)
    unwrapped, _ = _outputs(plain, inputs)
    assert (ref_logits - unwrapped).abs().max() > 1e-3  # the method does change the outputs
    torch.testing.assert_close(_outputs(dispatched, inputs)[0], unwrapped, rtol=0, atol=1e-6)  # unwrap restored


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes not installed (pip install 'interventions[quant]')")


def _quantised(checkpoint, **config):
    return transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(**config)).eval()


@needs_bnb
@pytest.mark.parametrize("stack", STACKS, ids=[s[0] for s in STACKS])
def test_4bit_edit_equals_the_edit_on_a_float_model_with_the_dequantised_weights(checkpoint, stack):
    """bitsandbytes' CPU 4-bit matmul is not the float matmul of the de-quantised weights (about 8e-3 per
    projection), so outputs differ by that kernel error; the method's change of the outputs is the same change."""
    import bitsandbytes as bnb

    quantised = _quantised(checkpoint, load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    assert isinstance(quantised.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in quantised.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                reference.get_submodule(name).weight.copy_(weight.to(torch.float32))
    inputs = _inputs(reference)
    change = {}
    for name, model in (("4bit", quantised), ("float", reference)):
        base, _ = _outputs(model, inputs)
        edited, _ = _outputs(model, inputs, stack)
        change[name] = edited - base
        assert torch.equal(_outputs(model, inputs)[0], base)  # unwrap restored
    size = change["float"].abs().max()
    assert size > 1e-3
    assert (change["4bit"] - change["float"]).abs().max() < 0.1 * size


@needs_bnb
def test_8bit_wrap_neutral_changes_and_unwrap(checkpoint):
    """LLM.int8 also quantises activations, so there is no float reference; the wrap contract holds on it."""
    import bitsandbytes as bnb

    model = _quantised(checkpoint, load_in_8bit=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    inputs = _inputs(model)
    with torch.no_grad():
        base = model(**inputs).logits
        with iv.apply(model, "act", layers=[0, 1, 2], threshold=0.05, beta=1.0):  # beta = 1: ACT's neutral value
            assert torch.equal(model(**inputs).logits, base)
        with iv.apply(model, *STACKS[0][:1], **STACKS[0][1]):
            edited = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert (edited - base).abs().max() > 1e-3
        assert tokens.shape == (2, inputs["input_ids"].shape[1] + 4)
        assert torch.equal(model(**inputs).logits, base)
