"""Saved method configs: `Handle.save_pretrained` writes `interventions_config.json`, `iv.wrap(model, DIR or FILE)`
reads it back to the same outputs, and a config made for another model shape is refused before anything is patched."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import Prompt, build_model, make_inputs

import interventions as iv
from evals.runner import parse_methods

STACK = [("pai", {"alpha": 0.5, "start_layer": 1}), ("act", {"beta": 0.3, "heads": {1: [0, 3], 2: [1]}})]


@pytest.fixture(scope="module")
def llava():
    return build_model("llava")


def test_save_and_load_round_trip(llava, tmp_path):
    inputs = make_inputs(llava, "llava", [Prompt(3, 2, seed=1), Prompt(5, 1, seed=2)])
    with torch.no_grad(), iv.apply(llava, STACK) as handle:
        written = handle.save_pretrained(tmp_path / "saved", model_id="tiny/llava")
        expected = llava(**inputs).logits
        config = handle.config
    saved = json.loads(written.read_text())
    assert written.name == "interventions_config.json"
    assert saved["schema"] == 2 and saved["library"] == f"interventions {iv.__version__}"
    assert saved["model"] == {"id": "tiny/llava", "family": "llava", "num_layers": 3, "num_heads": 4,
                              "num_kv_heads": 2}
    assert saved["stack"] == config["stack"]
    assert saved["stack"][1]["params"]["heads"] == [[1, 0], [1, 3], [2, 1]]  # head lists inline
    for location in (tmp_path / "saved", str(tmp_path / "saved"), str(written)):
        with torch.no_grad(), iv.apply(llava, location) as again:
            assert again.config["stack"] == config["stack"]
            assert torch.equal(llava(**inputs).logits, expected)


def test_config_for_another_shape_is_refused_before_patching(llava, tmp_path):
    with iv.apply(llava, STACK) as handle:
        path = handle.save_pretrained(tmp_path / "saved")
    config = json.loads(path.read_text())
    config["model"].update(id="llava-hf/llava-1.5-7b-hf", num_layers=32, num_heads=32, num_kv_heads=32)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"made for llava-hf/llava-1\.5-7b-hf \(llava: num_layers=32, num_heads=32, "
                                         r"num_kv_heads=32\); this model \(llava\) has num_layers=3, num_heads=4, "
                                         r"num_kv_heads=2"):
        iv.wrap(llava, tmp_path / "saved")
    assert llava.get_decoder().config._attn_implementation == "sdpa"


def test_missing_or_malformed_saved_config(llava, tmp_path):
    with pytest.raises(ValueError, match="no saved interventions config at"):
        iv.wrap(llava, tmp_path)
    (tmp_path / "other.json").write_text('{"heads": []}')
    with pytest.raises(ValueError, match="is not an interventions config"):
        iv.wrap(llava, str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="unknown method 'paii'"):
        iv.wrap(llava, "paii")


def test_cli_params_take_a_saved_config(llava, tmp_path):
    with iv.apply(llava, STACK) as handle:
        handle.save_pretrained(tmp_path)
        saved = handle.config["stack"]
    runs = parse_methods("none,pai+act", str(tmp_path))
    assert runs[1].stack == [(e["method"], e["params"]) for e in saved]  # every parameter, defaults included
    assert runs[1].made_for["num_layers"] == 3
    (only,) = parse_methods(None, str(tmp_path / "interventions_config.json"))
    assert only.label == "pai+act"
    with iv.apply(llava, only.wrap_target()) as again:
        assert again.config["stack"] == saved
