"""Sink-dimension discovery (`evals.calibrate.sink_dims`, shared/specs/var.md §6): on the real SmolLM2-135M
(its massive channel and the token it marks, compared with ACT's attention sinks), on a tiny LLaVA with a planted
massive channel, the preset file round trip into `iv.wrap(..., "var", sink_dims=path)`, and the command line."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest
import torch
from tiny_models import BOS_ID, Prompt, build_model, make_inputs

import interventions as iv
from evals.loading import LoadedModel
from evals.calibrate import sink_dims
from evals.calibrate.sink_dims import DEFAULT_PROMPTS, find_sink_dims, write_preset
from interventions.errors import ConfigError
from interventions.methods.var import VarConfig

PLANTED = 7


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def test_smollm2_massive_channel_marks_the_token_act_finds_as_first_sink(smollm2):
    model, tokenizer = smollm2
    result = find_sink_dims(model, tokenizer, DEFAULT_PROMPTS[:2])
    assert result["sink_dims"] == [507]  # |x_507|/RMS(x) ≈ 23.8 of at most sqrt(576) = 24 at `<|im_start|>`
    assert result["candidates"][0]["fraction"] > 0.9
    marked = {(t["prompt"], t["position"], t["token"]) for t in result["sink_tokens"] if t["layers"] >= 20}
    assert marked == {(0, 0, "<|im_start|>"), (1, 0, "<|im_start|>")}
    # ACT's attention sinks: position 0 is the first detected sink of almost every head (224 of 243)
    with torch.no_grad(), iv.apply(model, "act") as handle:
        model(**_chat(tokenizer, DEFAULT_PROMPTS[0]))
        detected = handle.methods[0].sinks(calibrated=False)
    first = Counter(int(flags.nonzero()[0]) for found in detected.values() for flags in found[0] if flags.any())
    assert first.most_common(1)[0][0] == 0 and first[0] / sum(first.values()) > 0.9


@pytest.fixture(scope="module")
def planted():
    """A tiny LLaVA whose BOS embedding carries a massive channel, and two one-image prompts."""
    model = build_model("llava")
    with torch.no_grad():
        model.get_input_embeddings().weight[BOS_ID, PLANTED] = 10.0
    prompts = [make_inputs(model, "llava", [Prompt(3, 4, seed=seed)]) for seed in (1, 2)]
    return model, prompts


def test_planted_channel_is_found_written_and_read_back_by_var(planted, tmp_path):
    model, prompts = planted
    result = find_sink_dims(model, None, prompts, threshold=5.0, layers=[1, 2], model_id="tiny-llava")
    assert result["sink_dims"] == [PLANTED]
    assert [(t["position"], t["token"], t["layers"]) for t in result["sink_tokens"]] == [(0, BOS_ID, 2)] * 2
    path = write_preset(result, tmp_path / "dims.json")
    saved = json.loads(path.read_text())
    assert saved["sink_dims"] == [PLANTED] and saved["source"] == "discovered" and saved["model"] == "tiny-llava"
    assert saved["layers"] == [1, 2] and saved["threshold"] == 5.0 and len(saved["prompt_tokens_sha256"]) == 64
    assert {"date", "versions", "candidates", "hidden_size"} <= set(saved)

    inputs = make_inputs(model, "llava", [Prompt(3, 4, seed=1), Prompt(6, 2, seed=2)])
    with torch.no_grad():
        reference = model(**inputs).logits
        with iv.apply(model, "var", sink_dims=str(path), tau=5.0, layers=[1, 2]) as handle:
            changed = model(**inputs).logits
            sinks = handle.methods[0].sinks()[1]
            assert handle.config["stack"][0]["params"]["sink_dims"] == [PLANTED]
    bos = inputs["input_ids"] == BOS_ID
    assert torch.equal(sinks, bos)  # exactly the BOS tokens are sinks (text sinks; no visual sink here)
    assert not torch.allclose(changed, reference, atol=1e-5)  # their attention went to the image tokens


def test_discovery_errors_name_the_fix(planted):
    model, prompts = planted
    with pytest.raises(ConfigError, match="never reached.*sqrt"):
        find_sink_dims(model, None, prompts, threshold=8.0)
    with pytest.raises(ConfigError, match="no hidden dimension.*lower threshold"):
        find_sink_dims(build_model("llava"), None, prompts, threshold=5.0)  # without the planted channel
    with pytest.raises(ConfigError, match="need a tokenizer"):
        find_sink_dims(model, None, ["text"], threshold=5.0)
    with pytest.raises(ConfigError, match="layers"):
        find_sink_dims(model, None, prompts, threshold=5.0, layers=[3])


def test_sink_dims_file_forms(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text("[5, 2]")
    assert VarConfig(sink_dims=str(listed)).sink_dims == (2, 5)
    keyless = tmp_path / "keyless.json"
    keyless.write_text('{"dims": [1]}')
    with pytest.raises(ConfigError, match="no 'sink_dims' key"):
        VarConfig(sink_dims=str(keyless))
    with pytest.raises(ConfigError, match="cannot read sink dims file"):
        VarConfig(sink_dims=str(tmp_path / "missing.json"))


def test_command_line(smollm2, tmp_path, monkeypatch, capsys):
    model, tokenizer = smollm2
    monkeypatch.setattr(sink_dims, "load_model",
                        lambda *args: LoadedModel(model, tokenizer, "causal_lm", False, "builtin:smollm2", "float32"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name three primary colors.\n\n")
    parser = argparse.ArgumentParser()
    sink_dims.add_arguments(parser)
    args = parser.parse_args(["--model", "builtin:smollm2", "--prompts", str(prompts), "--top-k", "1", "--layers", "5", "6",
                              "--output", str(tmp_path / "out.json")])
    assert sink_dims.main(args) == 0
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["sink_dims"] == [507] and saved["num_prompts"] == 1 and saved["layers"] == [5, 6]
    assert "[507]" in capsys.readouterr().out
