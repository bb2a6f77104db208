"""The greedy perturbation-head search end to end on the real SmolLM2-135M-Instruct, with tiny limits: 2 COPA
examples, 6 candidate heads, 2 rounds of top 1. Checks the ranking rule against the logged scores, the resumable
log, the CLI and that the written file is a head list `pag` reads."""

from __future__ import annotations

import json

import pytest
import torch

import interventions as iv
from evals.calibrate.perturb_heads import search_perturb_heads
from evals.main import main
from evals.loading import LoadedModel

SEARCH = {"limit": 2, "layers": [28, 29], "heads": [0, 1, 2], "rounds": 2, "top_k": 1, "progress": False,
          "model_id": "builtin:smollm2"}


def _count_forwards(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda module, args: calls.append(1))


def test_search_resume_and_cli(smollm2, tmp_path, monkeypatch):
    model, tokenizer = smollm2
    log = tmp_path / "search.jsonl"
    with torch.no_grad():
        result = search_perturb_heads(model, tokenizer, "copa", results=log, **SEARCH)

    assert len(result["heads"]) == 2 and len(result["rounds"]) == 2
    selected = []
    for entry in result["rounds"]:
        candidates = entry["candidates"]
        assert {(c["layer"], c["head"]) for c in candidates} == {(l, h) for l in (28, 29) for h in (0, 1, 2)} - {
            tuple(p) for p in selected}
        best = max(candidates, key=lambda c: (c["accuracy"], c["margin"]))  # first of equals = pool order
        assert entry["chosen"] == [[best["layer"], best["head"]]]
        assert entry["set"] == {"accuracy": best["accuracy"], "margin": best["margin"]}  # top 1: the same set
        selected += entry["chosen"]
    assert result["heads"] == selected
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + result["cost"]["evaluations"] == 1 + 1 + 6 + 5  # header, baseline, both rounds

    calls, hook = _count_forwards(model)  # the same search again: everything comes from the log
    try:
        with torch.no_grad():
            again = search_perturb_heads(model, tokenizer, "copa", results=log, **SEARCH)
    finally:
        hook.remove()
    assert calls == [] and again["heads"] == result["heads"] and again["rounds"] == result["rounds"]
    with pytest.raises(ValueError, match="holds another search"):
        search_perturb_heads(model, tokenizer, "copa", results=log, **{**SEARCH, "u": 0.5})

    monkeypatch.setattr("evals.loading.load_model",
                        lambda *args, **kwargs: LoadedModel(model, tokenizer, "causal_lm", False, "smollm2", "float32"))
    output = tmp_path / "heads.json"
    argv = ["calibrate", "perturb-heads", "--model", "builtin:smollm2", "--task", "copa", "--limit", "2",
            "--layers", "28", "29", "--heads", "0", "1", "2", "--rounds", "2", "--top-k", "1", "--no-progress",
            "--results", str(log), "-o", str(output)]
    calls, hook = _count_forwards(model)
    try:
        assert main(argv) == 0  # resumes the same search from its log
    finally:
        hook.remove()
    assert calls == []
    written = json.loads(output.read_text())
    assert written["heads"] == result["heads"] and written["method"] == "pag"
    with iv.apply(model, "pag", heads=str(output), u=0.5) as handle:
        assert handle.config["stack"][0]["params"]["heads"] == sorted(result["heads"])


def test_bad_arguments(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="u and w must be positive"):
        search_perturb_heads(model, tokenizer, "copa", w=0.0)
    with pytest.raises(ValueError, match="out of range"):
        search_perturb_heads(model, tokenizer, "copa", layers=[30])
    with pytest.raises(ValueError, match="task='squad' is invalid"):
        search_perturb_heads(model, tokenizer, "squad")
