"""Every registered family adapter implements the core's `Layout` contract, and the image layout facts it states
agree with the tiny model of its real HF class."""

from __future__ import annotations

import typing

import pytest
from tiny_models import LLM_FAMILIES, VLM_FAMILIES, build_model

import interventions as iv
from interventions.core.contract import Layout


def _members(protocol: type) -> set[str]:
    names = {n for n in vars(protocol) if not n.startswith("_")} | set(typing.get_type_hints(protocol))
    return names - {"register"}


@pytest.mark.parametrize("family", VLM_FAMILIES + LLM_FAMILIES)
def test_adapter_implements_the_layout_contract(family):
    adapter = iv.family(build_model(family))
    missing = [name for name in _members(Layout) if not hasattr(adapter, name)]
    assert not missing
    assert adapter.has_images == (family in VLM_FAMILIES)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_layout_facts_match_the_model(family):
    model = build_model(family)
    adapter = iv.family(model)
    assert adapter.multi_axis_positions == (family in ("qwen2_vl", "qwen2_5_vl"))
    tower = adapter.vision_tower()
    module, attentions = tower.find(model)
    assert attentions and all(a in set(module.modules()) for a in attentions)
    assert tower.cls_token == (family in ("llava", "llava_next"))
    if not adapter.multi_axis_positions and family != "llava_next":
        grid = adapter.fixed_grid(model.config, "test")
        image_id = model.config.image_token_id
        assert grid.length in {int(v) for v in _run_lengths(family, model, image_id)}


def _run_lengths(family, model, image_id):
    from tiny_models import Prompt, make_inputs

    ids = make_inputs(model, family, [Prompt(3, 4, seed=1)])["input_ids"][0]
    runs, length = [], 0
    for token in ids.tolist() + [-1]:
        if token == image_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs
