"""`interventions tune` on the shipped organism: tuned.json's test metrics equal a plain `eval` with the chosen
parameters, a killed tune resumes, the grid parser, and the dev split is disjoint from the test split."""

from __future__ import annotations

import json
import shutil

import pytest

from evals.benchmarks.shapes import shapes_chair, shapes_pope
from evals.tune import higher_is_better, parse_grid, point_key
from evals.main import main

TUNE = ["tune", "pope", "--model", "builtin:shapes-vlm", "--method", "pai", "--grid", '{"alpha": [0.0, 3.0]}',
        "--limit", "12", "--dev-limit", "12", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    """One finished 2-point tune (PAI α ∈ {0, 3}) on 12 dev and 12 test questions."""
    out = tmp_path_factory.mktemp("tune") / "out"
    assert main([*TUNE, "--out", str(out)]) == 0
    return out


def test_tuned_json_test_metrics_equal_a_plain_eval(tuned_dir, tmp_path, capsys):
    out = tuned_dir
    tuned = json.loads((out / "tuned.json").read_text())
    assert tuned["method"] == "pai" and tuned["metric"] == "average.f1"
    assert set(tuned["dev"]) == {point_key({"alpha": 0.0}), point_key({"alpha": 3.0})}
    best = max(tuned["dev"].values())
    assert tuned["dev"][point_key(tuned["params"])] == best  # the chosen point is a best dev point
    assert (out / "dev_curve.png").stat().st_size > 0
    capsys.readouterr()
    plain = tmp_path / "eval"
    assert main(["eval", "pope", "--model", "builtin:shapes-vlm", "--methods", "none,pai", "--params",
                 str(out / "tuned.json"), "--limit", "12", "--max-new-tokens", "2", "--no-progress",
                 "--out", str(plain)]) == 0
    evaluated = json.loads((plain / "results.json").read_text())
    assert [r["metrics"] for r in tuned["test"]["runs"]] == [r["metrics"] for r in evaluated["runs"]]
    assert tuned["test"]["runs"][1]["paired_vs_none"] == evaluated["runs"][1]["paired_vs_none"]
    assert evaluated["runs"][1]["params"] == {"pai": tuned["params"]}
    dev_lines = (out / "dev" / "point_000" / "predictions" / "pai.jsonl").read_text().splitlines()
    assert len(dev_lines) == 12


def test_a_killed_tune_resumes(tuned_dir, tmp_path):
    out = tmp_path / "tune"
    shutil.copytree(tuned_dir, out)
    first = json.loads((out / "tuned.json").read_text())
    shard = out / "dev" / "point_001" / "predictions" / "pai.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:5]) + lines[5][:7])  # as if killed mid-write in the second grid point
    (out / "tuned.json").unlink()
    done = (out / "dev" / "point_000" / "predictions" / "pai.jsonl").stat().st_mtime_ns
    assert main([*TUNE, "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "tuned.json").read_text())
    assert {k: v for k, v in again.items() if k != "test"} == {k: v for k, v in first.items() if k != "test"}
    assert [r["metrics"] for r in again["test"]["runs"]] == [r["metrics"] for r in first["test"]["runs"]]
    assert len(shard.read_text().splitlines()) == 12  # completed, nothing duplicated
    assert (out / "dev" / "point_000" / "predictions" / "pai.jsonl").stat().st_mtime_ns == done  # not redone


def test_parse_grid_product_budget_file_and_errors(tmp_path):
    points = parse_grid('{"alpha": [0.1, 0.2], "start_layer": [1, 2, 3]}', "pai")
    assert points[:2] == [{"alpha": 0.1, "start_layer": 1}, {"alpha": 0.1, "start_layer": 2}] and len(points) == 6
    grid = tmp_path / "grid.json"
    grid.write_text('{"alpha": [0.1, 0.2], "start_layer": [1, 2, 3]}')
    assert parse_grid(str(grid), "pai") == points
    chosen = parse_grid(str(grid), "pai", budget=3, seed=4)
    assert len(chosen) == 3 and chosen == [p for p in points if p in chosen]  # a subset, in grid order
    assert chosen == parse_grid(str(grid), "pai", budget=3, seed=4)
    with pytest.raises(ValueError, match="non-empty list"):
        parse_grid('{"alpha": 0.2}', "pai")
    with pytest.raises(ValueError, match="unknown parameter"):
        parse_grid('{"beta": [1]}', "pai")
    with pytest.raises(ValueError, match="budget"):
        parse_grid('{"alpha": [0.1]}', "pai", budget=0)
    assert not higher_is_better("CHAIR_i") and not higher_is_better("adversarial.fp_rate")
    assert higher_is_better("average.f1")


def test_bad_metric_and_missing_dev_split_are_one_line_errors(tmp_path, capsys):
    assert main([*TUNE, "--metric", "average.nope", "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "average.f1" in capsys.readouterr().err
    assert main(["tune", "lm", "--model", "builtin:smollm2", "--method", "act", "--grid", '{"beta": [0.4]}',
                 "--out", str(tmp_path / "b")]) == 2
    assert "--dev-limit" in capsys.readouterr().err


def test_shapes_dev_split_is_disjoint_from_test():
    for dev, test in ((shapes_pope(dev=True), shapes_pope(full=True)), (shapes_chair(dev=True),
                                                                         shapes_chair(full=True))):
        dev_images = {s.image.read_bytes() for s in dev.samples()}
        assert dev_images and not dev_images & {s.image.read_bytes() for s in test.samples()}
