"""ACT head search (`evals.calibrate.act_heads`, shared/specs/act.md §7, conformance 14) on the real
SmolLM2-135M with tiny limits (2 layers × 2 heads, 4 COPA examples): each single-head evaluation changes exactly
that head; a second run with the same seed, interrupted and resumed, gives the same head list; the JSON round-trips into
`iv.wrap`; the command line; the scorer against a direct per-sequence log-likelihood."""

from __future__ import annotations

import json

import pytest
import torch

import interventions as iv
from evals.calibrate.act_heads import evaluate_task, load_task, search_act_heads, write_heads
from evals.main import main
from interventions.errors import ConfigError
from evals.loading import LoadedModel

SEARCH = dict(limit=4, seed=0, layers=[2, 3], heads=[1, 2], batch_size=8, progress=False)
POOL = [(2, 1), (2, 2), (3, 1), (3, 2)]


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def first_run(smollm2, tmp_path_factory):
    """A full search, with the per-head inputs of `o_proj` (the heads' outputs) at layers 2 and 3 recorded for every
    forward: the baseline first, then one forward per head in pool order (8 rows fit one batch)."""
    model, tokenizer = smollm2
    layers = model.get_decoder().layers
    seen: dict[int, list[torch.Tensor]] = {2: [], 3: []}
    hooks = [layers[i].self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].clone()))
             for i in seen]
    path = tmp_path_factory.mktemp("act_heads") / "a.jsonl"
    try:
        result = search_act_heads(model, tokenizer, "copa", results=path, **SEARCH)
    finally:
        for hook in hooks:
            hook.remove()
    return result, path, seen


def test_single_head_runs_change_exactly_that_head(smollm2, first_run):
    result, _, seen = first_run
    assert all(len(outputs) == 5 for outputs in seen.values())
    head_dim = smollm2[0].config.hidden_size // smollm2[0].config.num_attention_heads
    for run, (layer, head) in enumerate(POOL, start=1):
        for at, outputs in seen.items():
            base, edited = (o.unflatten(-1, (-1, head_dim)) for o in (outputs[0], outputs[run]))
            if at < layer:
                assert torch.equal(base, edited)
            elif at == layer:
                others = [h for h in range(base.shape[2]) if h != head]
                assert torch.equal(base[:, :, others], edited[:, :, others])  # other heads bit-identical
                assert not torch.allclose(base[:, :, head], edited[:, :, head], atol=1e-4)
    assert [(r["layer"], r["head"]) for r in result["results"]] == POOL


def test_provenance_and_rule(first_run):
    result, _, _ = first_run
    assert 0 < len(result["heads"]) < 4  # some heads kept, some not: the rule is not vacuous here
    for r in result["results"]:
        assert r["kept"] == ((r["delta_accuracy"], r["delta_margin"]) > (0, 0))
        assert r["delta_margin"] == r["margin"] - result["baseline"]["margin"]
    assert result["heads"] == [[r["layer"], r["head"]] for r in result["results"] if r["kept"]]
    assert result["task"] == "copa" and result["model"] and len(result["data"]["md5"]) == 32
    assert (result["beta"], result["threshold"], result["limit"], result["seed"]) == (0.4, 0.1, 4, 0)
    assert len(result["examples"]) == 4 and result["pool"] == {"layers": [2, 3], "heads": [1, 2], "stride": 1,
                                                                "size": 4}
    assert result["cost"] == {"rows": 8, "forwards_per_head": 1, "evaluations": 5, "forwards": 5}


def test_interrupted_rerun_with_the_same_seed_resumes_and_gives_the_same_heads(smollm2, first_run, tmp_path):
    """A second search with the same seed, killed after two heads and restarted: it recomputes nothing already
    written and ends with the first run's head list and per-head numbers (every forward is redone independently)."""
    result, full_log, _ = first_run
    path = tmp_path / "b.jsonl"
    done = []

    def stop_after_two(record):
        done.append((record["layer"], record["head"]))
        if len(done) == 2:
            raise Stop

    with pytest.raises(Stop):
        search_act_heads(*smollm2, "copa", results=path, on_head=stop_after_two, **SEARCH)
    assert len(path.read_text().splitlines()) == 4  # header, baseline, two heads
    resumed = []
    again = search_act_heads(*smollm2, "copa", results=path, on_head=lambda r: resumed.append(r), **SEARCH)
    assert [(r["layer"], r["head"]) for r in resumed] == POOL[2:]
    assert again["heads"] == result["heads"] and again["results"] == result["results"]
    assert again["examples"] == result["examples"] and again["baseline"] == result["baseline"]
    assert path.read_text().splitlines()[1:] == full_log.read_text().splitlines()[1:]
    with pytest.raises(ConfigError, match="holds another search"):
        search_act_heads(*smollm2, "copa", results=path, **{**SEARCH, "seed": 1})


def test_head_file_round_trips_into_wrap(smollm2, first_run, tmp_path):
    model, tokenizer = smollm2
    result, _, _ = first_run
    path = write_heads(result, tmp_path / "heads.json")
    saved = json.loads(path.read_text())
    assert saved["heads"] == result["heads"] and saved["baseline"] == result["baseline"]
    inputs = tokenizer("The man turned on the faucet therefore", return_tensors="pt")
    with torch.no_grad():
        plain = model(**inputs).logits
        with iv.apply(model, "act", heads=str(path)) as handle:
            assert handle.config["stack"][0]["params"]["heads"] == result["heads"]
            changed = model(**inputs).logits
    assert not torch.equal(plain, changed)


def test_scorer_equals_direct_log_likelihood(smollm2):
    model, tokenizer = smollm2
    example = load_task("arc_easy")[0][0]
    scored = evaluate_task(model, tokenizer, "arc_easy", [0], batch_size=4)  # 4 choices of different lengths
    direct = []
    context = tokenizer(example.context, add_special_tokens=False)["input_ids"]
    for choice in example.choices:
        ids = tokenizer(example.context + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        direct.append(sum(float(logprobs[p - 1, ids[p]]) for p in range(len(context), len(ids))))
    gold, others = direct[example.gold], max(d for i, d in enumerate(direct) if i != example.gold)
    assert scored["accuracy"] == float(gold > others)
    assert scored["margin"] == pytest.approx(gold - others, abs=1e-4)


def test_command_line(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("evals.loading.load_model",
                        lambda *args, **kwargs: LoadedModel(*smollm2, "causal_lm", False, "smollm2-test", "float32"))
    output = tmp_path / "heads.json"
    assert main(["calibrate", "act-heads", "--model", "builtin:smollm2", "--task", "boolq", "--limit", "1",
                 "--layers", "4", "--heads", "5", "--output", str(output), "--no-progress"]) == 0
    saved = json.loads(output.read_text())
    assert saved["model"] == "smollm2-test" and saved["task"] == "boolq" and saved["pool"]["size"] == 1
    assert len(output.with_suffix(".jsonl").read_text().splitlines()) == 3
    assert "baseline accuracy" in capsys.readouterr().out
    assert main(["calibrate", "act-heads", "--model", "builtin:smollm2", "--task", "copa", "--stride", "0",
                 "-o", str(output)]) == 2  # a usage error
