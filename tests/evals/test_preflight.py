"""Every check before the model loads: image paths inside --images, each image opened once (a text file named .jpg,
an empty or truncated PNG named in the error), split names, prompt templates, stacks, flags a builtin cannot honour,
calibrate's options; and an error during generation comes after the progress bar, naming the sample."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from eval_setup import error_line, pope_args, tiny_pope, write_questions
from PIL import Image

import evals.cli
import evals.runner
import interventions as iv
from evals.benchmarks.generation import pope_benchmark
from evals.main import main
from evals.preflight import check_images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_pope(tmp_path_factory.mktemp("preflight"))


@pytest.fixture
def forbid_load(monkeypatch):
    """The model must not load: every failure here is found before."""
    def fail(args):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(evals.cli, "_load", fail)


def _error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return error_line(capsys.readouterr().err)


def _questions(tmp_path, images: list[str], name: str = "coco_pope_random.json"):
    path = tmp_path / "q" / name
    path.parent.mkdir(exist_ok=True)
    return str(write_questions(path, images))


@pytest.mark.parametrize("ref", ["../outside.jpg", "sub/../../outside.jpg", "/etc/hostname", "C:\\x.jpg"])
def test_image_paths_outside_the_images_folder_are_refused(setup, tmp_path, capsys, forbid_load, ref):
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (8, 8)).save(outside)
    questions = _questions(tmp_path, ["img0.jpg", ref])
    error = _error(pope_args(setup, tmp_path / "out", "--methods", "none", questions=questions), capsys)
    assert repr(ref) in error and ("absolute" in error or "leaves --images" in error)


def _png(size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("notes.jpg", b"this is text, not a JPEG\n", "cannot identify image file"),
    ("empty.png", b"", "an empty file"),
    ("truncated.png", _png()[:-200], "truncated"),
])
def test_unreadable_images_fail_in_the_preflight_by_name(setup, tmp_path, capsys, forbid_load, name, content,
                                                         reason):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "good.jpg")
    (images / name).write_bytes(content)
    questions = _questions(tmp_path, ["good.jpg", "good.jpg", name])
    argv = pope_args({**setup, "images": str(images)}, tmp_path / "out", "--methods", "none", questions=questions)
    error = _error(argv, capsys)
    assert f"{images / name}" in error and "(sample random/3)" in error and reason in error


def test_each_image_is_opened_once(setup, tmp_path, monkeypatch):
    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(1) or real(fp, *a, **k))
    bench = pope_benchmark(Path(setup["questions"]), Path(setup["images"]))
    facts = check_images(bench.samples(), bench.images)
    assert len(opened) == len(facts) == 4 < len(bench.samples())


def test_split_names_and_two_files_for_one_split(setup, tmp_path, capsys, forbid_load):
    questions = _questions(tmp_path, ["img0.jpg"], name="questions.json")
    assert "'questions' is not a POPE split" in _error(
        pope_args(setup, tmp_path / "out", "--methods", "none", questions=questions), capsys)
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("coco_pope_random.json", "aokvqa_pope_random.json"):
        write_questions(folder / name, ["img0.jpg"])
    error = _error(pope_args(setup, tmp_path / "out", "--methods", "none", questions=str(folder)), capsys)
    assert "2 files for the random split (aokvqa_pope_random.json, coco_pope_random.json)" in error


@pytest.mark.parametrize(("prompt", "fragment"), [("{question} {foo}", "{foo}"), ("{question} {0}", "{0}"),
                                                  ("{question} {", "not a valid template")])
def test_prompt_templates_are_test_formatted(setup, tmp_path, capsys, forbid_load, prompt, fragment):
    error = _error(pope_args(setup, tmp_path / "out", "--methods", "none", "--prompt", prompt), capsys)
    assert "cannot be formatted" in error and fragment in error


@pytest.mark.parametrize(("argv", "expected"), [
    (["--methods", "pai+pai"], "applies pai twice"),
    (["--methods", "pai@alpha"], "is not name=value"),
    (["--methods", "pai@alhpa=1"], "unknown parameter 'alhpa'"),
    (["--methods", "none,pai,pai"], "lists 'pai' twice"),
    (["--gen-kwargs", "num_beam=5"], "unknown generation option 'num_beam'; did you mean 'num_beams'?"),
    (["--gen-kwargs", "num_return_sequences=2"], "one answer per sample"),
    (["--gen-kwargs", "temperature=0.7"], "do_sample"),
    (["--gen-kwargs", "num_beams=0"], "num_beams must be an integer >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--dtype", "float64"], "--dtype 'float64' invalid"),
    (["--load-in-4bit", "--load-in-8bit"], "exclude each other"),
])
def test_bad_options_are_refused_before_the_model_loads(setup, tmp_path, capsys, forbid_load, argv, expected):
    base = pope_args(setup, tmp_path / "out")
    if "--max-new-tokens" in argv:
        base = base[:-2]  # drop the helper's --max-new-tokens 2
    if "--methods" not in argv:
        argv = ["--methods", "none", *argv]
    assert expected in _error(base + argv, capsys)


@pytest.mark.parametrize("flag", [["--load-in-4bit"], ["--load-in-8bit"], ["--device-map", "auto"]])
def test_flags_builtin_smollm2_cannot_honour(tmp_path, capsys, forbid_load, flag):
    argv = ["eval", "lm", "--model", "builtin:smollm2", "--methods", "none", "--out", str(tmp_path), *flag]
    assert f"builtin:smollm2 cannot honour {flag[0]}" in _error(argv, capsys)


@pytest.mark.parametrize(("argv", "expected"), [
    (["sink-dims", "--threshold", "-5"], "threshold=-5.0 is invalid"),
    (["sink-dims", "--min-fraction", "0"], "min_fraction=0.0 is invalid"),
    (["sink-dims", "--top-k", "0"], "top_k=0 is invalid"),
    (["act-heads", "--task", "copa", "--beta", "2"], "act: beta=2.0 is invalid"),
    (["act-heads", "--task", "copa", "--stride", "0"], "stride must be a positive integer"),
    (["perturb-heads", "--task", "copa", "--rounds", "0"], "rounds and top_k must be positive"),
    (["act-heads", "--task", "copa", "--limit", "0"], "--limit must be positive"),
])
def test_calibrate_checks_options_before_loading(tmp_path, capsys, monkeypatch, argv, expected):
    from evals.calibrate import sink_dims

    def fail(*a, **k):
        raise AssertionError("loaded")

    monkeypatch.setattr(sink_dims, "load_model", fail)
    monkeypatch.setattr("evals.loading.load_model", fail)  # what the head searches import when they load
    error = _error(["calibrate", *argv, "--model", "builtin:smollm2", "--output", str(tmp_path / "x.json")], capsys)
    assert expected in error


def test_calibrate_output_path_is_checked_before_loading(tmp_path, capsys, monkeypatch):
    from evals.calibrate import sink_dims

    monkeypatch.setattr(sink_dims, "load_model", lambda *a, **k: pytest.fail("loaded"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    for output, expected in ((tmp_path, "is a folder"), (blocker / "x.json", "is not a folder")):
        argv = ["calibrate", "sink-dims", "--model", "builtin:smollm2", "--output", str(output)]
        assert expected in _error(argv, capsys)


def test_generation_error_names_the_sample_after_the_bar(setup, tmp_path, capsys, monkeypatch):
    real = evals.runner.build_inputs

    def failing(loaded, batch):
        if any(s.id == "random/3" for s in batch):
            raise RuntimeError("boom")
        return real(loaded, batch)

    monkeypatch.setattr(evals.runner, "build_inputs", failing)
    argv = [a for a in pope_args(setup, tmp_path / "out", "--methods", "none", "--limit", "4") if a != "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.rstrip("\n").splitlines()
    assert err[-1] == "error: none: generation failed on sample(s) random/3 (img2.jpg): RuntimeError: boom"
    assert "2/4" in "\n".join(err[:-1])  # the bar was drawn, and closed, before the error line
    assert len((tmp_path / "out" / "predictions" / "none.jsonl").read_text().splitlines()) == 2


def test_runner_sets_the_template_for_every_method(setup, tmp_path, capsys, monkeypatch):
    calls = []
    real = iv.Handle.set_template
    monkeypatch.setattr(iv.Handle, "set_template", lambda self, tok: calls.append((self.config, tok)) or real(self, tok))
    gift = {"gift": {"alpha": 1.0, "saliency_layers": [0], "enhancement_layers": [1, 2]}}
    assert main(pope_args(setup, tmp_path / "out", "--methods", "none,gift,pai", "--params", json.dumps(gift),
                          "--limit", "2")) == 0
    assert [[e["method"] for e in c["stack"]] for c, _ in calls] == [["gift"], ["pai"]]
    assert all(type(tok).__name__ == "LlavaProcessor" for _, tok in calls)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"][1]["method"] == "gift"
