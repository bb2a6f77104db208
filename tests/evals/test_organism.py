"""The shipped organism `builtin:shapes-vlm` and its benchmarks: offline loading through the ordinary HF classes,
the world's determinism, the benchmark files read by the real POPE / CHAIR readers, short evals through the CLI,
and a deterministic training step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from PIL import Image

from evals.benchmarks.chair import ChairBenchmark, read_image_ids
from evals.benchmarks.pope import load_questions
from evals.benchmarks.shapes import IMAGE_NAME, IMAGES, SHAPES_DIR, shapes_chair, shapes_pope
from evals.organism import model as M
from evals.organism import world
from evals.organism.build_benchmarks import scenes
from evals.main import main
from evals.loading import BUILTIN_FOLDERS, load_model

FOLDER = BUILTIN_FOLDERS["builtin:shapes-vlm"]


def test_builtin_loads_offline_as_an_ordinary_llava(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = transformers.AutoProcessor.from_pretrained(FOLDER)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(FOLDER)
    assert isinstance(processor, transformers.LlavaProcessor)
    assert model.config.model_type == "llava" and model.config.text_config.num_key_value_heads == 2
    assert M.TOKEN_ID[M.IMAGE] in model.generation_config.suppress_tokens
    assert model.generation_config.eos_token_id == M.TOKEN_ID[M.EOS]
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    loaded = load_model("builtin:shapes-vlm")
    assert (loaded.family, loaded.has_images, loaded.model_id) == ("llava", True, "builtin:shapes-vlm")
    # the processor lays the prompt out exactly as training did (ids and pixels)
    image = Image.open(IMAGES / IMAGE_NAME.format(image_id=1)).convert("RGB")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "is there a sun"}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == M.prompt_ids("is there a sun")
    assert np.array_equal(inputs["pixel_values"].numpy(), M.pixel_values([image]).numpy())


def test_builtin_grounds_on_a_few_scenes():
    loaded = load_model("builtin:shapes-vlm")
    from evals.runner import build_inputs

    samples = shapes_pope().samples()[:24]  # 4 scenes of the random split: 12 yes, 12 no
    inputs = build_inputs(loaded, samples)
    out = loaded.model.generate(**inputs, max_new_tokens=3)
    answers = loaded.processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    labels = [q["label"] for q in load_questions(SHAPES_DIR / "pope_quick" / "shapes_pope_random.json")[0][:24]]
    assert set(answers) <= {"yes", "no"}
    assert sum(a == lab for a, lab in zip(answers, labels)) >= 21


def test_scene_generator_is_deterministic_and_matches_the_shipped_data():
    a = [world.sample_scene(np.random.default_rng([3, 1])) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(7)
    for _ in range(200):
        s = world.sample_scene(rng)
        assert 1 <= len(s.objects) <= world.MAX_OBJECTS and list(s.objects) == sorted(set(s.objects))
    regenerated = scenes(5, seed=1000)
    truth = json.loads((SHAPES_DIR / "chair" / "objects.json").read_text())
    for image_id, scene in enumerate(regenerated, start=1):
        assert truth[str(image_id)] == [world.WORDS[o] for o in scene.objects]
        shipped = np.asarray(Image.open(IMAGES / IMAGE_NAME.format(image_id=image_id)).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(world.render(scene)))


def test_benchmark_files_parse_with_the_pope_and_chair_readers():
    for split in ("random", "popular", "adversarial"):
        questions, info = load_questions(SHAPES_DIR / "pope" / f"shapes_pope_{split}.json")
        assert (info["questions"], info["yes"], info["no"], info["images"]) == (3000, 1500, 1500, 500)
        assert all((IMAGES / q["image"]).is_file() for q in questions[:30])
        quick, _ = load_questions(SHAPES_DIR / "pope_quick" / f"shapes_pope_{split}.json")
        assert quick == questions[: len(quick)] and len(quick) == 120
    # adversarial negatives are mostly absent group mates; random ones mostly are not
    mates = {}
    for split in ("random", "adversarial"):
        questions, _ = load_questions(SHAPES_DIR / "pope" / f"shapes_pope_{split}.json")
        words = {w: i for i, w in enumerate(world.WORDS)}
        present: dict[str, set[int]] = {}
        for q in questions:
            if q["label"] == "yes":
                present.setdefault(q["image"], set()).add(words[q["text"].split()[-1]])
        negatives = [(q["image"], words[q["text"].split()[-1]]) for q in questions if q["label"] == "no"]
        mates[split] = np.mean([any(o in world.group_of(p) for p in present[img]) for img, o in negatives])
    assert mates["adversarial"] > 0.3 > 0.15 > mates["random"]
    ids = read_image_ids(SHAPES_DIR / "chair" / "image_ids.txt")
    bench = ChairBenchmark(ids, objects=SHAPES_DIR / "chair" / "objects.json",
                           synonyms=SHAPES_DIR / "chair" / "synonyms.txt", image_name=IMAGE_NAME)
    assert len(ids) == 1000 and bench.vocabulary.nodes == frozenset(world.WORDS)
    first = bench.ground_truth.objects[1]
    scored = bench.score([{"id": "1", "text": " ".join(sorted(first)) + " sun moon"}], require_all=False)
    assert scored["n_mentions"] == len(first) + 2
    assert scored["n_hallucinated_mentions"] == len({"sun", "moon"} - first)


@pytest.mark.parametrize("task", ["pope", "chair"])  # not `benchmark`: pytest-benchmark's fixture name
def test_short_eval_on_the_builtin_needs_no_data_arguments(task, tmp_path, capsys):
    out = tmp_path / task
    code = main(["eval", task, "--model", "builtin:shapes-vlm", "--methods", "none,pai", "--limit", "12",
                 "--batch-size", "12", "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    per_split = 3 if task == "pope" else 1  # --limit counts per split: three POPE splits, one CHAIR set
    assert results["samples"]["evaluated"] == 12 * per_split and results["decoding"]["max_new_tokens"] == 16
    none = results["runs"][0]["metrics"]
    if task == "pope":
        assert none["random"]["n"] == 12 and none["random"]["accuracy"] >= 0.75
        assert "{question}" == results["data"]["prompt"]
    else:
        assert none["n_captions"] == 12 and none["recall"] >= 75
        assert results["data"]["prompt"] == "describe the image ."
    assert "| none |" in capsys.readouterr().out


def test_the_readme_main_job_needs_no_output_argument(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # results go to runs/<today's date>-<run key> under the working folder
    code = main(["eval", "pope", "--model", "builtin:shapes-vlm", "--methods", "none", "--limit", "3",
                 "--no-progress"])
    assert code == 0
    (folder,) = (tmp_path / "runs").iterdir()
    assert json.loads((folder / "results.json").read_text())["samples"]["evaluated"] == 9  # 3 per split
    assert "| none |" in capsys.readouterr().out


def test_data_arguments_stay_required_for_other_models(tmp_path, capsys):
    for argv, message in (
        (["eval", "pope", "--model", "some/model"], "needs --questions and --images"),
        (["eval", "chair", "--model", "some/model"], "needs --images, --image-ids"),
        (["eval", "pope", "--model", "builtin:shapes-vlm", "--images", str(IMAGES)], "needs --questions too"),
        (["eval", "pope", "--model", "some/model", "--questions", "q.json", "--images", "x", "--full"], "--full"),
        (["eval", "chair", "--model", "some/model", "--shapes", "--images", "x"], "--shapes replaces"),
    ):
        assert main(argv + ["--methods", "none", "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def test_quick_and_full_shapes_benchmarks():
    assert len(shapes_pope().samples()) == 360 and len(shapes_pope(full=True).samples()) == 9000
    assert len(shapes_chair().samples()) == 100 and len(shapes_chair(full=True).samples()) == 1000


def test_training_steps_are_deterministic():
    from evals.organism.train import train

    runs = [train(seed=0, out=None, steps=2, batch_size=4, log_every=1, heldout=4, quiet=True) for _ in range(2)]
    assert [e["loss"] for e in runs[0]["log"]] == [e["loss"] for e in runs[1]["log"]]
    assert runs[0]["log"][0]["loss"] > 0
    state = [r["model"].state_dict() for r in runs]
    assert all((state[0][k] == state[1][k]).all() for k in state[0])
