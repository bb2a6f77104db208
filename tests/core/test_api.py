"""The public API contract of shared/DESIGN.md: names, config round-trip, and every error rule."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import Prompt, build_model, make_inputs

import interventions as iv


@pytest.fixture(scope="module")
def llava():
    return build_model("llava")


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


def _attn_state(model):
    return model.get_decoder().config._attn_implementation, "generate" in vars(model)


def test_names():
    assert {"act", "gift", "locore", "pai", "var"} <= set(iv.methods())
    assert iv.methods() == sorted(iv.methods())
    for family in ("llama", "qwen2", "mistral", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3",
                   "smolvlm", "gemma3"):
        assert family in iv.families()


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("paii", {}, r"unknown method 'paii'; did you mean 'pai'\?"),
        ("pai", {"alpah": 0.2}, r"pai: unknown parameter 'alpah'; did you mean 'alpha'\?"),
        ("pai", {"alpha": "0.2"}, r"pai: alpha='0.2' is invalid; expected a number in \[0.0, inf\]"),
        ("pai", {"alpha": -0.1}, r"pai: alpha=-0.1 is invalid"),
        ("pai", {"start_layer": 1.5}, r"pai: start_layer=1.5 is invalid; expected an integer"),
        ("pai", {"start_layer": 9}, r"pai: layers \[9, 3\) invalid"),
        ("act", {"beta": 1.5}, r"act: beta=1.5 is invalid; expected a number in \[0.0, 1.0\]"),
        ("act", {"threshold": 0.0}, r"act: threshold=0.0 is invalid"),
        ("act", {"decode_policy": "always"}, r"act: decode_policy='always' is invalid; expected one of"),
        ("act", {"layers": [7]}, r"act: layers=\[7\] out of range"),
        ("act", {"heads": [[0, 9]]}, r"act: heads \[\(0, 9\)\] out of range"),
        ("act", {"heads": [[0, 1]], "layers": [0]}, r"act: give either heads or layers"),
        ("act", {"layers": []}, r"act: layers=\[\] is invalid"),
    ],
)
def test_bad_parameters_raise_before_patching(llava, name, params, match):
    before = _attn_state(llava)
    with pytest.raises(ValueError, match=match):
        iv.wrap(llava, name, **params)
    assert _attn_state(llava) == before


def test_method_needing_images_on_text_model(llama):
    with pytest.raises(ValueError, match="pai needs image tokens, and the causal_lm family has none"):
        iv.wrap(llama, "pai")
    assert _attn_state(llama) == ("sdpa", False)


def test_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16))
    with pytest.raises(ValueError, match=r"unsupported model family: GPT2LMHeadModel \(model_type='gpt2'\).*llava"):
        iv.wrap(model, "act")


def test_unsupported_attention_backend(llama):
    config = llama.get_decoder().config
    config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="needs 'sdpa' or 'eager'"):
            iv.wrap(llama, "act", layers=[1])
    finally:
        config._attn_implementation_internal = "sdpa"


def test_double_wrap(llava):
    with iv.apply(llava, "pai"):
        with pytest.raises(ValueError, match="already wrapped"):
            iv.wrap(llava, "act", layers=[1])
    assert _attn_state(llava) == ("sdpa", False)


def test_prompt_without_image_tokens(llava):
    inputs = make_inputs(llava, "llava", [Prompt(3, 2, seed=1), Prompt(4, 0, seed=2, image=False)])
    inputs.pop("pixel_values")
    with iv.apply(llava, "pai"), pytest.raises(ValueError, match=r"pai need image tokens, but sample\(s\) \[1\]"):
        llava(**inputs)


def test_config_round_trip(llava):
    inputs = make_inputs(llava, "llava", [Prompt(3, 2, seed=1)])
    stack = [("pai", {"alpha": 0.5, "start_layer": 1}), ("act", {"beta": 0.3, "heads": {1: [0, 3], 2: [1]}})]
    with torch.no_grad(), iv.apply(llava, stack) as handle:
        config = handle.config
        first = llava(**inputs).logits
    text = json.dumps(config, sort_keys=True)
    assert config["stack"][1]["params"]["heads"] == [[1, 0], [1, 3], [2, 1]]
    with torch.no_grad(), iv.apply(llava, json.loads(text)) as again:
        assert again.config == config
        assert torch.equal(llava(**inputs).logits, first)


def test_head_list_file(tmp_path, llava):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"model": "tiny", "heads": [[1, 2], [2, 0]]}))
    with iv.apply(llava, "act", heads=str(path)) as handle:
        assert handle.config["stack"][0]["params"]["heads"] == [[1, 2], [2, 0]]
    with pytest.raises(ValueError, match="cannot read head list"):
        iv.wrap(llava, "act", heads=str(tmp_path / "missing.json"))


def test_apply_unwraps_on_exception(llava):
    with pytest.raises(RuntimeError, match="boom"), iv.apply(llava, "pai"):
        assert _attn_state(llava) == ("interventions_sdpa", True)
        raise RuntimeError("boom")
    assert _attn_state(llava) == ("sdpa", False)


def test_unwrap_twice_and_module_unwrap(llava):
    handle = iv.wrap(llava, "pai", alpha=0.1)
    iv.unwrap(llava)
    handle.unwrap()
    iv.unwrap(llava)
    assert _attn_state(llava) == ("sdpa", False)


def test_bad_stack_shapes(llava):
    with pytest.raises(ValueError, match="keyword parameters go with a single method name"):
        iv.wrap(llava, [("pai", {})], alpha=0.1)
    with pytest.raises(ValueError, match="a config dict has keys"):
        iv.wrap(llava, {"methods": []})
    with pytest.raises(ValueError, match="the stack is empty"):
        iv.wrap(llava, [])
