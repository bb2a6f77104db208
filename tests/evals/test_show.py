"""`iv.attention_map` and `interventions show` on the shipped organism: the heat map is the `output_attentions`
weights of the last prompt row over the image tokens, reshaped to the 6 × 6 grid, unwrapped and wrapped; the
figure plots exactly those values; the share line is the generated rows' image mass."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import interventions as iv
from evals.benchmarks.base import Sample
from evals.benchmarks.shapes import IMAGES
from evals.runner import build_inputs
from evals.show import DEFAULT_SHAPES_IMAGE, figure
from evals.main import main
from evals.loading import load_model


@pytest.fixture(scope="module")
def shapes():
    loaded = load_model("builtin:shapes-vlm")
    inputs = build_inputs(loaded, [Sample("s", "describe the image .", IMAGES / DEFAULT_SHAPES_IMAGE)])
    return loaded, inputs


def _reference(model, inputs, layers):
    """The last prompt row's weights over the image tokens from a plain forward with output_attentions."""
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    rows = torch.stack([attentions[i][0, :, -1] for i in layers]).mean(dim=(0, 1))
    return rows[image].reshape(6, 6), float(rows[image].sum())


def test_heat_equals_output_attentions_unwrapped_and_wrapped(shapes):
    loaded, inputs = shapes
    model = loaded.model
    plain = iv.attention_map(model, inputs, max_new_tokens=4)
    assert plain.layers == (1, 2) and plain.heat.shape == (6, 6) and len(plain.image_positions) == 36
    model.set_attn_implementation("eager")  # the reference needs explicit weights from the unmodified model
    try:
        heat, share = _reference(model, inputs, plain.layers)
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(plain.heat, heat, rtol=0, atol=1e-6)
    assert plain.share[0] == pytest.approx(share, abs=1e-6)
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert plain.tokens == greedy[0, inputs["input_ids"].shape[1]:].tolist()
    handle = iv.wrap(model, "pai", alpha=2.0)
    try:
        edited = iv.attention_map(model, inputs, layers=[2], max_new_tokens=4)
        heat, _ = _reference(model, inputs, [2])  # the wrapped model returns its edited weights
    finally:
        handle.unwrap()
    torch.testing.assert_close(edited.heat, heat, rtol=0, atol=1e-6)
    assert not torch.allclose(edited.heat, iv.attention_map(model, inputs, layers=[2], max_new_tokens=1).heat)


def test_show_writes_the_png_of_those_values(shapes, tmp_path, capsys):
    loaded, inputs = shapes
    out = tmp_path / "show"
    assert main(["show", "--model", "builtin:shapes-vlm", "--methods", "none,pai", "--params",
                 '{"pai": {"alpha": 2.0}}', "--layers", "1,2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert "pai:" in capsys.readouterr().out
    with Image.open(out / "attention.png") as png:
        assert png.size[0] > 500 and png.size[1] > 400
    maps = json.loads((out / "attention.json").read_text())["methods"]
    model = loaded.model
    model.set_attn_implementation("eager")
    try:
        none_heat, _ = _reference(model, inputs, [1, 2])
    finally:
        model.set_attn_implementation("sdpa")
    handle = iv.wrap(model, "pai", alpha=2.0)
    try:
        pai_heat, _ = _reference(model, inputs, [1, 2])
    finally:
        handle.unwrap()
    torch.testing.assert_close(torch.tensor(maps["none"]["heat"]), none_heat, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(maps["pai"]["heat"]), pai_heat, rtol=0, atol=1e-6)
    fig = figure(maps, IMAGES / DEFAULT_SHAPES_IMAGE, "llava", "t")
    heat_axes = [ax for ax in fig.axes if len(ax.images) == 2]  # image + heat layer, one per method
    for ax, label in zip(heat_axes, ("none", "pai")):
        assert ax.images[1].get_array().tolist() == maps[label]["heat"]  # what the PNG draws


def test_errors(shapes, tmp_path, capsys):
    loaded, inputs = shapes
    two = build_inputs(loaded, [Sample(str(i), "describe the image .", IMAGES / DEFAULT_SHAPES_IMAGE)
                                for i in range(2)])
    with pytest.raises(iv.InputError, match="one prompt"):
        iv.attention_map(loaded.model, two)
    with pytest.raises(iv.InputError, match="out of range"):
        iv.attention_map(loaded.model, inputs, layers=[7])
    assert main(["show", "--model", "llava-hf/x", "--out", str(tmp_path)]) == 2
    assert "--image" in capsys.readouterr().err
