"""Small CLI input defects: a prompt template's unknown placeholder, `--dtype auto`, and git's stderr when lm-eval
runs outside a checkout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from evals.benchmarks.lm import _quiet_git
from evals.benchmarks.pope import check_template
from evals.loading import load_model
from evals.main import main


@pytest.mark.parametrize("template, message", [
    ("Q: {foo} {question}", "unknown placeholder(s) {foo}"),
    ("Q: {question} {answer!r}", "unknown placeholder(s) {answer}"),
    ("Q: {question", "not a valid template"),
    ("Q: none", "no '{question}' placeholder"),
])
def test_prompt_template_errors_name_the_problem(template, message):
    with pytest.raises(ValueError) as error:
        check_template(template)
    assert message in str(error.value)
    check_template("Q: {question} {{literal}}")  # escaped braces are text


def test_unknown_placeholder_is_one_error_line_before_the_model_loads(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    questions = tmp_path / "coco_pope_random.json"
    questions.write_text(json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"}))
    code = main(["eval", "pope", "--model", str(tmp_path / "no-model"), "--questions", str(questions), "--images",
                 str(tmp_path), "--out", str(tmp_path / "out"), "--methods", "none", "--prompt", "{foo}: {question}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: pope: prompt_template") and "{foo}" in err


def test_dtype_auto_loads_in_the_checkpoint_dtype_and_a_bad_dtype_fails_first():
    loaded = load_model("builtin:shapes-vlm", "auto")
    assert loaded.dtype == "float32" and str(loaded.model.dtype) == "torch.float32"
    with pytest.raises(ValueError, match="--dtype 'fp8' invalid"):
        load_model("builtin:smollm2", "fp8")  # refused before any weights are read


def test_lm_eval_git_lookup_is_quiet_outside_a_checkout(tmp_path, monkeypatch, capfd):
    from lm_eval import evaluator

    monkeypatch.chdir(tmp_path)  # tmp_path is not inside a git checkout
    original = evaluator.get_git_commit_hash
    with _quiet_git():
        assert evaluator.get_git_commit_hash() is None
    assert evaluator.get_git_commit_hash is original  # restored
    assert "fatal" not in capfd.readouterr().err
