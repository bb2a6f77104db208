"""Stale predictions are never reused: for each thing that decides a prediction, change it, rerun into the same
folder, and get a refusal (before the model loads) that says what changed; what decides nothing (2 vs 2.0) reuses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from eval_setup import error_line, lines, pope_args, tiny_pope, write_questions
from safetensors.torch import load_file, save_file

import evals.cli
from evals.main import main
from evals.predictions import load_predictions


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_pope(tmp_path_factory.mktemp("run_keys"))


def _forbid_load(monkeypatch) -> None:
    """Fail the test if the CLI gets as far as loading the model."""
    def fail(args):
        raise AssertionError("the model was loaded; the refusal must come first")

    monkeypatch.setattr(evals.cli, "_load", fail)


def _refused(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return error_line(capsys.readouterr().err)


def _first_run(argv, capsys) -> None:
    assert main(argv) == 0
    capsys.readouterr()


def test_question_file_with_other_images_is_refused(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _first_run(pope_args(setup, out, "--methods", "none"), capsys)
    other = tmp_path / "q" / "coco_pope_random.json"
    other.parent.mkdir()
    write_questions(other, [f"img{(i + 1) % 4}.jpg" for i in range(12)])  # same ids, other images
    _forbid_load(monkeypatch)
    error = _refused(pope_args(setup, out, "--methods", "none", questions=str(other)), capsys)
    assert "another configuration" in error and "benchmark.data_md5.random" in error


def test_image_edited_in_place_is_refused_naming_the_sample(setup, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(setup["images"], images)
    mine = {**setup, "images": str(images)}
    out = tmp_path / "out"
    _first_run(pope_args(mine, out, "--methods", "none"), capsys)
    shutil.copy(images / "img0.jpg", images / "img1.jpg")  # same names and question file, img1 now shows img0
    _forbid_load(monkeypatch)
    error = _refused(pope_args(mine, out, "--methods", "none"), capsys)
    assert "sample random/2 was predicted from another input (image_md5" in error


def test_weights_changed_in_place_are_refused(setup, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(setup["model"], model)
    mine = {**setup, "model": str(model)}
    out = tmp_path / "out"
    _first_run(pope_args(mine, out, "--methods", "none"), capsys)
    weights = load_file(model / "model.safetensors")
    name = min(weights)
    weights[name] = weights[name] + 0.5
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    _forbid_load(monkeypatch)
    error = _refused(pope_args(mine, out, "--methods", "none"), capsys)
    assert "model.fingerprint.files.model.safetensors" in error


def test_edited_heads_file_is_refused(setup, tmp_path, capsys, monkeypatch):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"heads": [[0, 1]]}))
    out = tmp_path / "out"
    argv = pope_args(setup, out, "--methods", "act", "--params", json.dumps({"act": {"heads": str(heads)}}))
    _first_run(argv, capsys)
    heads.write_text(json.dumps({"heads": [[1, 2]]}))
    _forbid_load(monkeypatch)
    error = _refused(argv, capsys)
    assert "stack" in error and "heads" in error and "[[0,1]]" in error.replace(" ", "")


@pytest.mark.parametrize(("change", "expected"), [
    (["--dtype", "bfloat16"], 'model.dtype: "float32" -> "bfloat16"'),
    (["--gen-kwargs", "num_beams=2"], "decoding.num_beams: 1 -> 2"),
    (["--max-new-tokens", "3"], "decoding.max_new_tokens: 2 -> 3"),
    (["--prompt", "{question} Answer yes or no."], "benchmark.prompt"),
    (["--seed", "1"], "seed: 0 -> 1"),
    (["--params", '{"pai": {"alpha": 0.5}}'], "stack"),
])
def test_changed_setting_is_refused_before_the_model_loads(setup, tmp_path, capsys, monkeypatch, change, expected):
    out = tmp_path / "out"
    base = ["--methods", "pai"]
    _first_run(pope_args(setup, out, *base, "--limit", "3"), capsys)
    if change[0] == "--max-new-tokens":  # replaces the helper's --max-new-tokens 2
        argv = [a for a in pope_args(setup, out, *base, "--limit", "3")]
        argv[argv.index("--max-new-tokens") + 1] = change[1]
    else:
        argv = pope_args(setup, out, *base, "--limit", "3", *change)
    _forbid_load(monkeypatch)
    error = _refused(argv, capsys)
    assert "another configuration" in error and expected in error, error


def test_two_and_two_point_zero_are_one_configuration(setup, tmp_path, capsys):
    out = tmp_path / "out"
    _first_run(pope_args(setup, out, "--methods", "pai", "--params", '{"pai": {"alpha": 2}}', "--limit", "3"), capsys)
    before = (out / "predictions" / "pai.jsonl").read_text()
    assert main(pope_args(setup, out, "--methods", "pai", "--params", '{"pai": {"alpha": 2.0}}', "--limit", "3")) == 0
    assert (out / "predictions" / "pai.jsonl").read_text() == before  # reused, nothing generated again
    error = _refused(pope_args(setup, tmp_path / "o2", "--methods", "none,pai@alpha=2,pai@alpha=2.0"), capsys)
    assert "the same configuration" in error


def test_duplicate_ids_and_records_without_id_are_errors(setup, tmp_path, capsys):
    out = tmp_path / "out"
    argv = pope_args(setup, out, "--methods", "none", "--limit", "3")
    _first_run(argv, capsys)
    path = out / "predictions" / "none.jsonl"
    original = path.read_text()
    path.write_text(original + original.splitlines()[0] + "\n")
    assert "sample random/1 appears twice (lines 1 and 4)" in _refused(argv, capsys)
    key = lines(path)[0]["run_key"]
    path.write_text(original + json.dumps({"run_key": key, "text": "yes"}) + "\n")
    assert "line 4 has no string 'id'" in _refused(argv, capsys)
    with pytest.raises(ValueError, match="no string 'id'"):
        load_predictions(path, key)


def test_results_of_another_run_are_not_overwritten(setup, tmp_path, capsys):
    out = tmp_path / "out"
    _first_run(pope_args(setup, out, "--methods", "none,pai", "--limit", "2"), capsys)
    results = (out / "results.json").read_text()
    error = _refused(pope_args(setup, out, "--methods", "none", "--limit", "2"), capsys)
    assert "holds the results of another run" in error
    assert (out / "results.json").read_text() == results
    assert main(pope_args(setup, out, "--methods", "none,pai", "--limit", "2")) == 0  # the same run: fine


def test_results_record_what_the_key_covers(setup, tmp_path, capsys):
    out = tmp_path / "out"
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps([[0, 1], [1, 0]]))
    _first_run(pope_args(setup, out, "--methods", "none,act", "--params", json.dumps({"act": {"heads": str(heads)}}),
                         "--limit", "3"), capsys)
    results = json.loads((out / "results.json").read_text())
    model = results["model"]
    assert model["dtype"] == "float32" and model["quantisation"] is None and model["device_map"] is None
    assert set(model["fingerprint"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert results["data"]["files"]["random"]["md5"]
    assert set(results["images"]) == {"img0.jpg", "img1.jpg", "img2.jpg"}
    assert results["runs"][1]["resolved_params"]["act"]["heads"] == [[0, 1], [1, 0]]  # the file's contents
    assert results["runs"][1]["resolved_params"]["act"]["beta"] == 0.4  # a default, filled
    stored = json.loads((out / "predictions" / "act.key.json").read_text())
    assert set(stored) == {"model", "benchmark", "stack", "decoding", "seed"}
    line = lines(out / "predictions" / "none.jsonl")[0]
    assert line["image"] == "img0.jpg" and len(line["image_md5"]) == 32 and len(line["prompt_md5"]) == 32


def test_eval_lm_does_not_reuse_a_result_of_another_dtype(tmp_path, monkeypatch):
    from evals import lm_model
    from evals.benchmarks import lm
    from evals.loading import LoadedModel
    from evals.method_specs import parse_methods
    from evals.runner import LmOptions, run_lm

    calls = []

    class FakeLM:  # stands in for the lm-eval model type: records which weights it would score with
        def __init__(self, model, **kwargs):
            self.model, self.handle = model, None

        def close(self):
            pass

    def fake_evaluate(fake, tasks, manager, options):
        calls.append(fake.model.weight.dtype)
        return {"metrics": {"copa": {"acc": 0.5 + 0.1 * len(calls)}}, "stderr": {}, "versions": {},
                "n-samples": {}, "samples": {}, "per_sample": {}}

    monkeypatch.setattr(lm, "evaluate_lm", fake_evaluate)
    monkeypatch.setattr(lm, "task_manager", lambda *args: None)
    monkeypatch.setattr(lm_model, "InterventionsLM", FakeLM)
    runs = parse_methods("none")
    fp32 = LoadedModel(torch.nn.Linear(1, 1), None, "llama", False, "tiny-lm", "float32")
    first = run_lm(fp32, ["copa_local"], runs, tmp_path, LmOptions(limit=5))
    again = run_lm(fp32, ["copa_local"], runs, tmp_path, LmOptions(limit=5))  # the same configuration: cached
    bf16 = LoadedModel(torch.nn.Linear(1, 1).to(torch.bfloat16), None, "llama", False, "tiny-lm", "bfloat16")
    other = run_lm(bf16, ["copa_local"], runs, tmp_path, LmOptions(limit=5))
    assert calls == [torch.float32, torch.bfloat16]
    assert first["runs"][0]["metrics"] == again["runs"][0]["metrics"] != other["runs"][0]["metrics"]
    assert other["model"]["dtype"] == "bfloat16"
