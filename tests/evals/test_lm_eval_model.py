"""The lm-eval model type `interventions`, run through lm-eval's own entry points on a tiny random Llama saved to
a folder: padded batches give the per-sample log-likelihoods of batch size 1, where lm-eval's stock HF wrapper does
not once a method reads token roles."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import transformers
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tiny_text_checkpoint import save_tiny_text_model

import interventions as iv
from evals.benchmarks.lm import render_local_tasks
from evals.lm_model import InterventionsLM

ACT = {"act": {"layers": [0, 1, 2], "threshold": 0.02}}  # a 3-layer model; sinks pass 0.02 on these prompts
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    save_tiny_text_model(root / "model")
    (root / "act.json").write_text(json.dumps(ACT))
    return root


@pytest.fixture(scope="module")
def tasks(folder) -> TaskManager:
    """The shipped local tasks only (indexing all of lm-eval's tasks takes 5-25 s)."""
    return TaskManager(include_path=str(render_local_tasks(folder / "tasks")), include_defaults=False)


def _loglikelihoods(out: dict, task: str) -> np.ndarray:
    """Per-sample, per-choice log-likelihoods from lm-eval's sample log, in document order."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return np.array([resp[0][0] for s in samples for resp in s["resps"]], dtype=np.float64)


def _evaluate(tasks: TaskManager, model, task: str, batch_size: int, limit: int = 3, **model_args) -> np.ndarray:
    out = lm_eval.simple_evaluate(model=model, model_args=model_args or None, tasks=[task], limit=limit,
                                  task_manager=tasks, batch_size=batch_size, log_samples=True, bootstrap_iters=0)
    return _loglikelihoods(out, task)


@pytest.fixture(scope="module")
def boolq(folder, tasks):
    """boolq_local log-likelihoods (short continuations " yes" / " no", so fp32 sums stay near -20) per method and
    batch size, through `simple_evaluate(model="interventions", model_args=...)`."""
    runs = {}
    for methods in ("none", "act"):
        for batch_size in (1, 4):
            runs[methods, batch_size] = _evaluate(tasks, "interventions", "boolq_local", batch_size,
                                                  pretrained=str(folder / "model"), methods=methods,
                                                  params=str(folder / "act.json") if methods == "act" else None,
                                                  dtype="float32", max_length=160)
    return runs


@pytest.mark.parametrize("methods", ["none", "act"])
def test_batch_of_4_gives_the_loglikelihoods_of_batch_size_1(boolq, methods):
    single, batched = boolq[methods, 1], boolq[methods, 4]
    assert single.shape == (6,)  # 3 documents x 2 choices: batches of 4 and 2 rows of different lengths
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)


def test_act_changes_the_loglikelihoods(boolq):
    assert np.abs(boolq["act", 1] - boolq["none", 1]).max() > 0.05


def test_stock_hf_wrapper_pads_without_mask_and_ours_matches_its_batch_size_1(folder, tasks):
    """The reason for the class: lm-eval's HFLM right-pads a batch without an attention mask, so ACT's sink test sees
    padding rows as prompt rows; at batch size 1 both wrappers score the same."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "model", dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "model")
    with iv.apply(model, "act", **ACT["act"]):
        stock = {bs: _evaluate(tasks, HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs), "copa_local", bs)
                 for bs in (1, 4)}
    lm = InterventionsLM(model, methods="act", params=ACT, tokenizer=tokenizer)
    try:
        ours = _evaluate(tasks, lm, "copa_local", 1)
    finally:
        lm.close()
    assert np.abs(stock[4] - stock[1]).max() > 0.1
    np.testing.assert_allclose(ours, stock[1], rtol=0, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # close() unwrapped it


def test_lm_eval_command_line_with_the_model_type(folder, tmp_path, capsys):
    """`interventions lm-eval` is lm-eval's own CLI (cli_evaluate) with the model type registered and the shipped
    offline tasks on its include path."""
    from evals.main import main

    code = main(["lm-eval", "--model", "interventions", "--model_args",
                 f"pretrained={folder / 'model'},methods=act,params={folder / 'act.json'},dtype=float32",
                 "--tasks", "copa_local", "--limit", "2", "--batch_size", "2", "--log_samples",
                 "--output_path", str(tmp_path)])
    assert code == 0
    results = list(tmp_path.rglob("results_*.json"))
    samples = list(tmp_path.rglob("samples_copa_local_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1
    written = json.loads(results[0].read_text())
    assert written["config"]["model"] == "interventions"
    assert "copa_local" in written["results"] and len(samples[0].read_text().splitlines()) == 2
    assert "copa_local" in capsys.readouterr().out


def test_model_type_registered_and_declared_as_entry_point():
    from lm_eval.api.registry import get_model

    assert get_model("interventions") is InterventionsLM
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lm_eval.models"]
    module, _, name = declared["interventions"].partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is InterventionsLM


def test_saved_config_as_params_and_shape_refusal(folder, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "model", dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "model")
    with iv.apply(model, "act", **ACT["act"]) as handle:
        handle.save_pretrained(tmp_path / "act-config")
    lm = InterventionsLM(model, params=str(tmp_path / "act-config"), tokenizer=tokenizer)
    try:
        assert lm.handle.config["stack"][0]["params"]["layers"] == [0, 1, 2]
    finally:
        lm.close()
    config = json.loads((tmp_path / "act-config" / "interventions_config.json").read_text())
    config["model"]["num_layers"] = 32
    (tmp_path / "act-config" / "interventions_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="made for .*num_layers=32.*has num_layers=3"):
        InterventionsLM(model, params=str(tmp_path / "act-config"), tokenizer=tokenizer)
    assert model.config._attn_implementation == "sdpa"


def test_eval_lm_options(folder, tmp_path, monkeypatch, capsys):
    """`eval lm` leaves the hub settings alone (the shipped tasks still run offline), and takes --batch-size,
    --num-fewshot, --bootstrap-iters (stderr) and --log-samples."""
    from evals.main import main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert main(["eval", "lm", "--model", str(folder / "model"), "--tasks", "copa_local", "--methods", "none,act",
                 "--params", str(folder / "act.json"), "--limit", "4", "--batch-size", "4", "--num-fewshot", "1",
                 "--bootstrap-iters", "100", "--log-samples", "--out", str(tmp_path)]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["decoding"]["batch_size"] == 4 and results["decoding"]["num_fewshot"] == 1
    for run in results["runs"]:
        assert 0 < run["stderr"]["copa_local"]["acc"] < 1
        logged = [json.loads(line) for line in (tmp_path / "lm_samples" / run["method"] / "copa_local.jsonl")
                  .read_text().splitlines()]
        assert len(logged) == 4
        assert all(len(s["resps"]) == 2 and "acc" in s for s in logged)
        assert all(s["arguments"][0][0].count("\n\n") == 1 for s in logged), logged[0]["arguments"]  # a shot, then the question
    assert "| act |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known open defect: on SmolLM2, ACT amplifies the base model's own padding "
                   "difference (left-padded pair vs single runs: fp32 logits 2e-4 under ACT vs 4e-5 unwrapped; "
                   "float64 8.9e-6 vs 7.2e-6), 1.8e-2 on a COPA log-likelihood; the tiny models show 0")
def test_smollm2_batch_of_4_with_act_default_layers(smollm2, tasks):
    """The real SmolLM2-135M with ACT on all heads of layers 2..28: batch 4 = batch 1 on copa_local."""
    model, tokenizer = smollm2
    runs = {}
    for batch_size in (1, 4):
        lm = InterventionsLM(model, methods="act", tokenizer=tokenizer, batch_size=batch_size)
        try:
            runs[batch_size] = _evaluate(tasks, lm, "copa_local", batch_size, limit=4)
        finally:
            lm.close()
    np.testing.assert_allclose(runs[4], runs[1], rtol=0, atol=1e-5)
