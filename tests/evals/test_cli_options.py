"""Issue 21's eval options on the organism `builtin:shapes-vlm`: `--gen-kwargs` (beam search equal to the same
`generate` call by hand), labelled variants in `--methods`, `--limit` per split, `score pope` on the runner's
predictions, and one default output folder per configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.benchmarks import shapes
from evals.decoding import parse_gen_kwargs
from evals.loading import load_model
from evals.main import main
from evals.preflight import select_samples
from evals.runner import build_inputs
from evals.score import score_pope

SHAPES = ["--model", "builtin:shapes-vlm", "--no-progress"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pope_run(tmp_path_factory):
    """shapes-POPE, 10 questions per split, three columns: none and PAI at two strengths."""
    out = tmp_path_factory.mktemp("options") / "out"
    assert main(["eval", "pope", *SHAPES, "--methods", "none,pai@alpha=0.5,pai@alpha=1.0", "--limit", "10",
                 "--out", str(out)]) == 0
    return out


def test_gen_kwargs_parse_like_lm_eval():
    assert parse_gen_kwargs("num_beams=5,do_sample=False,temperature=0.7,top_k=3") == {
        "num_beams": 5, "do_sample": False, "temperature": 0.7, "top_k": 3}
    assert parse_gen_kwargs(None) == {} == parse_gen_kwargs(" ")


def test_beam_search_caption_equals_the_same_generate_by_hand(tmp_path):
    out = tmp_path / "chair"
    assert main(["eval", "chair", *SHAPES, "--methods", "none", "--limit", "4", "--gen-kwargs",
                 "num_beams=5,length_penalty=1.0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["decoding"] == {"do_sample": False, "num_beams": 5, "length_penalty": 1.0, "max_new_tokens": 16}
    loaded = load_model("builtin:shapes-vlm")
    samples = select_samples(shapes.shapes_chair().samples(), 4)
    inputs = build_inputs(loaded, samples)
    with torch.no_grad():
        ids = loaded.model.generate(**inputs, do_sample=False, num_beams=5, max_new_tokens=16)
        greedy = loaded.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=16)
    tokenizer = loaded.processor.tokenizer
    by_hand = [t.strip() for t in tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:],
                                                         skip_special_tokens=True)]
    written = {r["id"]: r["text"] for r in _lines(out / "predictions" / "none.jsonl")}
    assert [written[s.id] for s in samples] == by_hand
    assert not torch.equal(ids, greedy)  # 1 of these 4 captions differs under beam search (measured)
    key_beam = results["runs"][0]["run_key"]
    greedy_out = tmp_path / "greedy"
    assert main(["eval", "chair", *SHAPES, "--methods", "none", "--limit", "4", "--out", str(greedy_out)]) == 0
    assert json.loads((greedy_out / "results.json").read_text())["runs"][0]["run_key"] != key_beam


def test_limit_is_per_split(pope_run):
    results = json.loads((pope_run / "results.json").read_text())
    assert results["samples"]["evaluated"] == 30 and results["samples"]["limit"] == 10
    ids = [r["id"] for r in _lines(pope_run / "predictions" / "none.jsonl")]
    assert sorted(ids) == sorted(f"{split}/{i}" for split in ("random", "popular", "adversarial")
                                 for i in range(1, 11))
    for split in ("random", "popular", "adversarial"):
        assert results["runs"][0]["metrics"][split]["n"] == 10


def test_labelled_variants_are_separate_columns(pope_run, tmp_path):
    results = json.loads((pope_run / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["none", "pai@alpha=0.5", "pai@alpha=1.0"]
    assert [r["resolved_params"].get("pai", {}).get("alpha") for r in results["runs"]] == [None, 0.5, 1.0]
    assert len({r["run_key"] for r in results["runs"]}) == 3
    # a variant is the same configuration as the method with the same --params: same key, same predictions
    out = tmp_path / "params"
    assert main(["eval", "pope", *SHAPES, "--methods", "pai", "--params", '{"pai": {"alpha": 0.5}}', "--limit", "10",
                 "--out", str(out)]) == 0
    same = json.loads((out / "results.json").read_text())["runs"][0]
    assert same["run_key"] == results["runs"][1]["run_key"]
    assert same["metrics"] == results["runs"][1]["metrics"]


def test_score_pope_reads_the_runner_predictions(pope_run, capsys):
    results = json.loads((pope_run / "results.json").read_text())
    for run in results["runs"]:
        predictions = pope_run / "predictions" / f"{run['method']}.jsonl"
        scored = score_pope(shapes.SHAPES_DIR / "pope_quick", predictions, partial=True)
        assert {k: scored[k] for k in run["metrics"]} == run["metrics"]
        one = score_pope(shapes.SHAPES_DIR / "pope_quick" / "shapes_pope_popular.json", predictions, partial=True)
        assert {k: one["popular"][k] for k in run["metrics"]["popular"]} == run["metrics"]["popular"]
    with pytest.raises(ValueError, match="predictions cover 10 of 120 questions"):
        score_pope(shapes.SHAPES_DIR / "pope_quick", pope_run / "predictions" / "none.jsonl")  # not --partial
    capsys.readouterr()
    assert main(["score", "pope", "--questions", str(shapes.SHAPES_DIR / "pope_quick"), "--predictions",
                 str(pope_run / "predictions" / "none.jsonl"), "--partial"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["average"] == results["runs"][0]["metrics"]["average"]


def test_two_runs_on_one_day_keep_both(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "pope", *SHAPES, "--limit", "2", "--methods"]
    assert main([*argv, "none,pai@alpha=0.5"]) == 0
    assert main([*argv, "none,pai@alpha=1.0"]) == 0
    assert main([*argv, "none"]) == 0  # fewer methods: a folder of its own too
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 3
    methods = sorted(tuple(r["method"] for r in json.loads((f / "results.json").read_text())["runs"])
                     for f in folders)
    assert methods == [("none",), ("none", "pai@alpha=0.5"), ("none", "pai@alpha=1.0")]
    for folder in folders:
        date, run_id = folder.name.rsplit("-", 1)
        assert len(run_id) == 8 and date.count("-") == 2
    assert main([*argv, "none,pai@alpha=0.5"]) == 0  # the same command again resumes its own folder
    assert len(list((tmp_path / "runs").iterdir())) == 3
