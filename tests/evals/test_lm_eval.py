"""The lm-eval bridge: a shipped offline task on the real SmolLM2-135M, unmodified and with ACT."""

from __future__ import annotations

import json

from evals.loading import LoadedModel
from evals.runner import parse_methods, run_lm


def test_copa_local_with_and_without_act(smollm2, tmp_path):
    model, tokenizer = smollm2
    loaded = LoadedModel(model, tokenizer, "causal_lm", False, "builtin:smollm2", "float32")
    runs = parse_methods("none,act", '{"act": {"beta": 0.4, "layers": [2, 3, 4, 5]}}')
    results = run_lm(loaded, ["copa_local"], runs, tmp_path, limit=8)
    by_method = {r["method"]: r for r in results["runs"]}
    assert set(by_method) == {"none", "act"}
    for run in by_method.values():
        assert 0.0 <= run["metrics"]["copa_local"]["acc"] <= 1.0
        assert run["n_samples"]["copa_local"]["effective"] == 8
    assert json.loads((tmp_path / "results.json").read_text())["runs"][1]["params"] == {
        "act": {"beta": 0.4, "layers": [2, 3, 4, 5]}}
    # a repeated command reuses the finished runs instead of recomputing them
    assert run_lm(loaded, ["copa_local"], runs, tmp_path, limit=8)["runs"] == results["runs"]


def test_eval_lm_on_builtin_smollm2_defaults_its_tasks(smollm2, tmp_path, monkeypatch, capsys):
    import evals.cli
    from evals.main import main

    model, tokenizer = smollm2
    loaded = LoadedModel(model, tokenizer, "causal_lm", False, "builtin:smollm2", "float32")
    monkeypatch.setattr(evals.cli, "_load", lambda args: loaded)  # the session's model, not a second load
    assert main(["eval", "lm", "--model", "builtin:smollm2", "--methods", "none", "--limit", "2",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tasks"] == list(evals.cli.DEFAULT_LM_TASKS)
    assert results["runs"][0]["n_samples"]["copa_local"]["effective"] == 2
    assert "| none |" in capsys.readouterr().out
