"""The eval runner and CLI end to end on a tiny LLaVA checkpoint loaded by path: results files, resume after
SIGKILL, multi-process sharding, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoint import save_tiny_llava

from evals.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny LLaVA, a folder of random images and a POPE question file over them."""
    base = tmp_path_factory.mktemp("runner")
    checkpoint = save_tiny_llava(base / "tiny-llava")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(30):
        name = f"img{i % 6}.jpg"
        if i < 6:
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / name)
        obj = ["dog", "cat", "car"][i % 3]
        lines.append(json.dumps({"question_id": i + 1, "image": name, "text": f"Is there a {obj} in the image?",
                                 "label": "yes" if i % 2 else "no"}))
    questions = base / "coco_pope_random.json"
    questions.write_text("\n".join(lines) + "\n")
    return {"model": str(checkpoint), "images": str(images), "questions": str(questions), "base": base}


def _pope_args(setup, out, *extra):
    return ["eval", "pope", "--model", setup["model"], "--questions", setup["questions"], "--images",
            setup["images"], "--out", str(out), "--no-progress", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_eval_pope_writes_results(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_pope_args(setup, out, "--methods", "none,pai", "--params", '{"pai": {"alpha": 0.5}}',
                           "--limit", "8", "--batch-size", "3", "--max-new-tokens", "3")) == 0
    table = capsys.readouterr().out
    assert "| none |" in table and "| pai |" in table
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["none", "pai"]
    assert results["runs"][1]["params"] == {"pai": {"alpha": 0.5}}
    for run in results["runs"]:
        metrics = run["metrics"]
        assert set(metrics) == {"random", "average"}
        assert set(metrics["average"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
        assert 0 <= metrics["average"]["accuracy"] <= 1
    assert results["samples"] == {"available": 30, "evaluated": 8, "limit": 8, "limit_per": "split"}
    assert results["decoding"]["max_new_tokens"] == 3
    assert results["data"]["files"]["random"]["md5"]
    assert {"interventions", "transformers", "torch"} <= set(results["versions"])
    assert len(_lines(out / "predictions" / "none.jsonl")) == 8
    assert (out / "results.md").exists() and (out / "results.png").stat().st_size > 0


def test_sigkill_then_resume_matches_uninterrupted_run(setup, tmp_path):
    args = ["--methods", "none", "--max-new-tokens", "24", "--batch-size", "1"]
    clean = tmp_path / "clean"
    assert main(_pope_args(setup, clean, *args)) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "evals.main", *_pope_args(setup, killed, *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    predictions = killed / "predictions" / "none.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if predictions.exists() and len(predictions.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(predictions.read_bytes().splitlines())
    assert 3 <= written < 30, "the run must be killed mid-way"
    with open(predictions, "ab") as f:  # and a line torn by the kill
        f.write(b'{"id": "random/99", "te')
    assert main(_pope_args(setup, killed, *args)) == 0
    ids = [r["id"] for r in _lines(predictions)]
    assert sorted(ids) == sorted(f"random/{i}" for i in range(1, 31))  # exactly one line per question
    metrics = [json.loads((d / "results.json").read_text())["runs"][0]["metrics"] for d in (clean, killed)]
    assert metrics[0] == metrics[1]


def test_two_processes_merge_to_the_single_process_result(setup, tmp_path):
    args = ["--methods", "none,pai", "--limit", "10", "--max-new-tokens", "3"]
    single = tmp_path / "single"
    assert main(_pope_args(setup, single, *args)) == 0
    sharded = tmp_path / "sharded"
    # without GPUs, `--multi_gpu` makes accelerate start torchrun workers on CPU (gloo, DistributedType.MULTI_CPU)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "evals.main"]
    done = subprocess.run(launch + _pope_args(setup, sharded, *args), capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (sharded / "predictions").glob("*.jsonl")) == [
        "none.rank0.jsonl", "none.rank1.jsonl", "pai.rank0.jsonl", "pai.rank1.jsonl"]
    runs = [json.loads((d / "results.json").read_text())["runs"] for d in (single, sharded)]
    assert [r["metrics"] for r in runs[0]] == [r["metrics"] for r in runs[1]]


def _bad(setup, tmp_path):
    q, img, model = setup["questions"], setup["images"], setup["model"]
    out = str(tmp_path / "o")
    (tmp_path / "corrupt").mkdir()
    corrupt = tmp_path / "corrupt" / "x_pope_random.json"
    corrupt.write_text('{"question_id": 1, "image": "a.jpg", "text": "x", "label": "yes"}\n{not json\n')
    (tmp_path / "missing_image").mkdir()
    missing_image = tmp_path / "missing_image" / "x_pope_random.json"
    missing_image.write_text('{"question_id": 1, "image": "nope.jpg", "text": "Is there a dog?", "label": "yes"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    base = ["eval", "pope", "--model", model, "--images", img, "--out", out, "--no-progress"]
    return {
        "missing question file": (base + ["--questions", str(tmp_path / "none.json"), "--methods", "none"],
                                  "no such file"),
        "corrupt question file": (base + ["--questions", str(corrupt), "--methods", "none"], "line 2"),
        "missing image": (base + ["--questions", str(missing_image), "--methods", "none"], "image file(s) not found"),
        "images not a folder": (["eval", "pope", "--model", model, "--questions", q, "--images", str(a_file),
                                 "--out", out, "--methods", "none"], "is not a folder"),
        "unknown method": (base + ["--questions", q, "--methods", "none,paii"], "unknown method 'paii'"),
        "unknown parameter": (base + ["--questions", q, "--methods", "pai", "--params", '{"pai": {"alpah": 1}}'],
                              "unknown parameter 'alpah'"),
        "out-of-range parameter": (base + ["--questions", q, "--methods", "pai", "--params", '{"pai": {"alpha": -1}}'],
                                   "alpha=-1"),
        "malformed JSON params": (base + ["--questions", q, "--methods", "pai", "--params", "{alpha: 1}"],
                                  "--params is not valid JSON"),
        "params for an unlisted method": (base + ["--questions", q, "--methods", "none", "--params",
                                                  '{"act": {}}'], "which --methods does not list"),
        "unknown parser": (base + ["--questions", q, "--methods", "none", "--parser", "regex"], "regex"),
        "output not writable": (["eval", "pope", "--model", model, "--questions", q, "--images", img, "--out",
                                 str(a_file / "sub"), "--methods", "none"], "is not writable"),
        "missing model path": (["eval", "pope", "--model", str(tmp_path / "no-model"), "--questions", q,
                                "--images", img, "--out", out, "--methods", "none"], "does not exist"),
        "limit zero": (base + ["--questions", q, "--methods", "none", "--limit", "0"], "--limit must be >= 1"),
        "batch size zero": (base + ["--questions", q, "--methods", "none", "--batch-size", "0"],
                            "--batch-size must be >= 1"),
        "empty methods": (base + ["--questions", q, "--methods", ","], "--methods is empty"),
        "unknown builtin": (["eval", "lm", "--model", "builtin:gpt9", "--tasks", "copa_local", "--methods", "none",
                             "--out", out], "unknown builtin model"),
        "chair bad id file": (["eval", "chair", "--model", model, "--images", img, "--image-ids",
                               str(tmp_path / "ids.txt"), "--objects", "x.gz", "--methods", "none", "--out", out],
                              "not found"),
        "unsupported family": (["eval", "pope", "--model", str(_gpt2(tmp_path)), "--questions", q, "--images", img,
                                "--out", out, "--methods", "none"], "unsupported model family"),
    }


def _gpt2(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16)).save_pretrained(path)
    return path


def test_bad_inputs_give_one_error_line_and_exit_2(setup, tmp_path, capsys):
    cases = _bad(setup, tmp_path)
    capsys.readouterr()  # drop the progress output of building the cases
    assert len(cases) >= 15
    for name, (argv, expected) in cases.items():
        code = main(argv)
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
        assert code == 2, (name, captured.err)
        assert len(errors) == 1 and expected in errors[0], (name, captured.err)
        assert "Traceback" not in captured.err


def test_eval_chair_writes_results(setup, tmp_path, capsys):
    ids = [226988, 337443, 112022]  # the first three of OPERA's 500
    images = tmp_path / "coco"
    images.mkdir()
    for i in ids:
        Image.new("RGB", (32, 24), (i % 255, 80, 160)).save(images / f"COCO_val2014_{i:012d}.jpg")
    id_file = tmp_path / "ids.txt"
    id_file.write_text("\n".join(map(str, ids)) + "\n")
    objects = ROOT / "evals" / "data" / "chair" / "coco2014_objects.json.gz"
    out = tmp_path / "out"
    assert main(["eval", "chair", "--model", setup["model"], "--images", str(images), "--image-ids", str(id_file),
                 "--objects", str(objects), "--methods", "none,pai", "--max-new-tokens", "6", "--out", str(out),
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["decoding"]["max_new_tokens"] == 6 and results["samples"]["evaluated"] == 3
    for run in results["runs"]:
        assert {"CHAIR_s", "CHAIR_i", "recall", "len"} <= set(run["metrics"])
    assert "CHAIR_s" in capsys.readouterr().out
