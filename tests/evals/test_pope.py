"""POPE: parsers (spec test vectors), hand-computed metrics, file formats and versions, scoring and its errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from evals.benchmarks.pope import PopeBenchmark, describe_version, load_questions, mean_metrics, pope_metrics
from evals.benchmarks.pope_parsers import PARSERS, parse_contains, parse_exact, parse_official
from evals.score import add_score_commands, score_pope

SHARED_POPE = Path(__file__).resolve().parents[3] / "shared" / "data" / "pope"
needs_shared = pytest.mark.skipif(not SHARED_POPE.is_dir(), reason=f"shared POPE data not found at {SHARED_POPE}")

RECORDS = [
    {
        "question_id": 1,
        "image": "COCO_val2014_000000000001.jpg",
        "text": "Is there a dog in the image?",
        "label": "yes",
    },
    {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?", "label": "no"},
    {
        "question_id": 3,
        "image": "COCO_val2014_000000000002.jpg",
        "text": "Is there a car in the image?",
        "label": "yes",
    },
    {"question_id": 4, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a bus in the image?", "label": "no"},
]


def _write(path: Path, text: str, newline: str = "\n") -> Path:
    path.write_bytes(text.replace("\n", newline).encode())
    return path


def _jsonl(path: Path, records: list, newline: str = "\n") -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in records), newline)


def _answers(path: Path, texts: list[str], ids: list[int] | None = None) -> Path:
    ids = ids or list(range(1, len(texts) + 1))
    return _jsonl(path, [{"question_id": i, "text": t} for i, t in zip(ids, texts)])


# --- parsers ----------------------------------------------------------------------------------------------------


OFFICIAL_VECTORS = {  # specs/evals.md §1.3, exactly
    "No.": "no",
    "No": "no",
    "NO": "yes",
    "Nope": "yes",
    "I don't see one": "yes",
    "": "yes",
    "Yes.": "yes",
    "not sure": "no",
    "Yes, there is no dog.": "no",
    "There is not a dog.": "no",
}


@pytest.mark.parametrize(("text", "expected"), OFFICIAL_VECTORS.items())
def test_official_parser_spec_vectors(text, expected):
    assert parse_official(text) == expected


def test_official_parser_first_sentence_and_commas():
    assert parse_official("Yes. There is no cat.") == "yes"  # only the first sentence counts
    assert parse_official("No, it is a cat.") == "no"  # "No," loses its comma
    assert parse_official("Yes, no doubt") == "no"


def test_exact_and_contains_parsers():
    assert [parse_exact(t) for t in ["yes", " Yes\n", "NO", "Yes.", "no way", ""]] == [
        "yes",
        "yes",
        "no",
        None,
        None,
        None,
    ]
    texts = ["Yes.", "No, there is not.", "YES!", "yes and no", "I don't know", "not sure", "no."]
    assert [parse_contains(t) for t in texts] == ["yes", "no", "yes", None, None, None, "no"]


def test_parser_registry_names_and_error():
    assert PARSERS.names() == ["lmms-eval", "official", "vlmevalkit"]
    with pytest.raises(ValueError) as e:
        PARSERS.get("oficial")
    assert (
        str(e.value)
        == "unknown POPE parser 'oficial'; did you mean 'official'? available: lmms-eval, official, vlmevalkit"
    )


# --- metrics ----------------------------------------------------------------------------------------------------


def test_metrics_hand_computed():
    labels = ["yes"] * 4 + ["no"] * 6
    preds = ["yes", "yes", "yes", "no", "yes", "yes", "yes", "no", "no", "no"]
    m = pope_metrics(labels, preds, PARSERS.get("official"))
    # TP=3 FN=1 FP=3 TN=3: acc 6/10, P 3/6, R 3/4, F1 2PR/(P+R) = 0.75/1.25, yes-ratio 6/10 (labels give 4/10)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"], m["unparsed"]) == (3, 1, 3, 3, 10, 0)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.6)
    assert m["yes_ratio"] == pytest.approx(0.6)


def test_unparseable_answers_per_parser():
    labels = ["yes", "yes", "no", "no"]
    texts = ["yes", "not sure", "no", "Yes"]
    got = {}
    for name in PARSERS.names():
        p = PARSERS.get(name)
        m = pope_metrics(labels, [p.parse(t) for t in texts], p)
        got[name] = (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"], m["unparsed"])
    # official: yes no no yes -> TP1 FN1 FP1 TN1
    assert got["official"] == pytest.approx((0.5, 0.5, 0.5, 0.5, 0.5, 0))
    # lmms-eval: "not sure" is unparseable, wrong in accuracy, left out of recall -> TP1 FN0 FP1 TN1
    assert got["lmms-eval"] == pytest.approx((0.5, 0.5, 1.0, 2 / 3, 0.5, 1))
    # vlmevalkit: the same answer counts as a no in recall -> TP1 FN1 FP1 TN1
    assert got["vlmevalkit"] == pytest.approx((0.5, 0.5, 0.5, 0.5, 0.5, 1))


def test_zero_denominators_give_zero():
    m = pope_metrics(["no", "no"], ["no", "no"], PARSERS.get("official"))
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_mean_over_splits_llava_13b():
    # LLaVA issue #626: F1 random 0.8718, popular 0.8629, adversarial 0.8450 -> "POPE 86.0" (mean 0.8599)
    f1 = {"random": 0.8718, "popular": 0.8629, "adversarial": 0.8450}
    per_split = {
        s: {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": v, "yes_ratio": 0.0} for s, v in f1.items()
    }
    assert mean_metrics(per_split)["f1"] == pytest.approx(0.8599, abs=5e-5)


# --- files and versions -----------------------------------------------------------------------------------------


def test_lf_crlf_and_json_array_read_the_same(tmp_path):
    lf = _jsonl(tmp_path / "lf.json", RECORDS)
    crlf = _jsonl(tmp_path / "crlf.json", RECORDS, "\r\n")
    array = _write(tmp_path / "array.json", json.dumps(RECORDS, indent=4))
    (q_lf, i_lf), (q_crlf, i_crlf), (q_arr, i_arr) = map(load_questions, (lf, crlf, array))
    assert q_lf == q_crlf == q_arr == RECORDS
    assert (i_lf["format"], i_lf["line_endings"], i_lf["lines"]) == ("jsonl", "lf", 4)
    assert (i_crlf["format"], i_crlf["line_endings"], i_crlf["lines"]) == ("jsonl", "crlf", 4)
    assert (i_arr["format"], i_arr["line_endings"], i_arr["lines"]) == ("json-array", "lf", 26)
    assert (i_lf["questions"], i_lf["yes"], i_lf["no"], i_lf["images"]) == (4, 2, 2, 2)
    assert i_lf["md5"] != i_crlf["md5"]


def test_version_from_md5_and_question_count(tmp_path):
    assert describe_version("b635b20061b1262cba65ed5bef7660a2", 2910) == (
        "POPE e3e3926 coco random, 2910 questions (LLaVA-1.5 pinned)"
    )
    assert describe_version("dc9b6c41ad832c48da758cfa85b37d2c", 3000) == "POPE 109985c coco random, 3000 questions"
    records = [dict(RECORDS[0], question_id=i) for i in range(1, 2911)]
    _, info = load_questions(_jsonl(tmp_path / "r.json", records))
    assert info["questions"] == 2910
    assert info["version"] == (
        "unrecognised file with 2910 questions, the size of LLaVA-1.5's pinned random split (e3e3926)"
    )
    _, info = load_questions(_jsonl(tmp_path / "r3000.json", [dict(RECORDS[0], question_id=i) for i in range(3000)]))
    assert info["version"] == "unrecognised file with 3000 questions"


@needs_shared
def test_official_files_are_recognised():
    expected = {
        "coco/coco_pope_random.json": ("lf", "POPE 109985c coco random, 3000 questions"),
        "coco/coco_pope_popular.json": ("crlf", "POPE 109985c coco popular, 3000 questions"),
        "coco/coco_pope_adversarial.json": ("crlf", "POPE 109985c coco adversarial, 3000 questions"),
    }
    for name, (endings, version) in expected.items():
        _, info = load_questions(SHARED_POPE / name)
        assert (info["line_endings"], info["version"], info["lines"]) == (endings, version, 3000)
        assert (info["questions"], info["yes"], info["no"], info["images"]) == (3000, 1500, 1500, 500)
    _, info = load_questions(SHARED_POPE / "aokvqa/aokvqa_pope_seem_adversarial.json")
    assert (info["format"], info["questions"], info["yes"], info["images"]) == ("json-array", 3000, 1500, 500)


@needs_shared
def test_llava_pinned_random_is_detected_by_size(tmp_path):
    # e3e3926's random file is the current one without 90 "no" questions; rebuild that size from the current file
    lines = (SHARED_POPE / "coco/coco_pope_random.json").read_text().splitlines()
    no_ids = [i for i, line in enumerate(lines) if json.loads(line)["label"] == "no"][:90]
    kept = [line for i, line in enumerate(lines) if i not in set(no_ids)]
    _, info = load_questions(_write(tmp_path / "coco_pope_random.json", "\n".join(kept) + "\n"))
    assert (info["questions"], info["yes"], info["no"]) == (2910, 1500, 1410)
    assert "LLaVA-1.5's pinned random split" in info["version"]


# --- scoring ----------------------------------------------------------------------------------------------------


def test_score_pope_matches_by_question_id(tmp_path):
    questions = _jsonl(tmp_path / "q.json", RECORDS, "\r\n")
    # answers in another order than the questions: yes-label 1 -> no, no-label 2 -> yes, 3 -> yes, 4 -> no
    answers = _answers(tmp_path / "a.jsonl", ["No, it is not.", "No", "Yes", "Yes."], ids=[4, 1, 3, 2])
    r = score_pope(questions, answers)
    assert (r["tp"], r["fn"], r["fp"], r["tn"]) == (1, 1, 1, 1)
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert r["parser"] == "official" and r["questions_file"]["line_endings"] == "crlf"
    assert r["predictions_file"]["lines"] == 4


def test_score_pope_parser_choice(tmp_path):
    questions = _jsonl(tmp_path / "q.json", RECORDS)
    answers = _answers(tmp_path / "a.jsonl", ["Yes.", "no", "Yes.", "No."])
    assert score_pope(questions, answers)["accuracy"] == 1.0
    exact = score_pope(questions, answers, parser="lmms-eval")
    assert (exact["accuracy"], exact["unparsed"], exact["recall"]) == (0.25, 3, 0.0)
    assert score_pope(questions, answers, parser="vlmevalkit")["accuracy"] == 1.0


@needs_shared
def test_score_pope_on_official_file_all_yes(tmp_path):
    answers = _answers(tmp_path / "a.jsonl", ["Yes"] * 3000)
    r = score_pope(SHARED_POPE / "coco/coco_pope_adversarial.json", answers)
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert r["f1"] == pytest.approx(2 / 3)


def test_benchmark_samples_prompt_and_score(tmp_path):
    _jsonl(tmp_path / "coco_pope_random.json", RECORDS)
    _write(tmp_path / "coco_pope_seem_popular.json", json.dumps(RECORDS, indent=2))
    bench = PopeBenchmark.from_dir(tmp_path)
    assert list(bench.files) == ["random", "popular"]
    samples = list(bench.samples())
    assert samples[0] == {
        "id": "random/1",
        "split": "random",
        "question_id": 1,
        "image": "COCO_val2014_000000000001.jpg",
        "question": "Is there a dog in the image?",
        "label": "yes",
    }
    assert bench.prompt(samples[0]["question"]) == (
        "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    # random: all right; popular: everything answered "Yes"
    preds = [{"id": s["id"], "text": s["label"] if s["split"] == "random" else "Yes"} for s in samples]
    r = bench.score(preds)
    assert r["random"]["f1"] == 1.0 and r["popular"]["f1"] == pytest.approx(2 / 3)
    assert r["average"]["f1"] == pytest.approx(5 / 6)
    assert r["average"]["yes_ratio"] == pytest.approx(0.75)
    record = bench.record()
    assert (record["benchmark"], record["version"], record["parser"], bench.max_new_tokens) == (
        "pope",
        "1",
        "official",
        128,
    )
    assert record["prompt"] == "{question}\nAnswer the question using a single word or phrase."
    assert record["files"]["popular"]["format"] == "json-array"


def test_benchmark_partial_scoring_for_limited_runs(tmp_path):
    _jsonl(tmp_path / "coco_pope_random.json", RECORDS)
    _jsonl(tmp_path / "coco_pope_popular.json", RECORDS)
    bench = PopeBenchmark.from_dir(tmp_path)
    # first 3 samples: random/1 (yes) right, random/2 (no) wrong, random/3 (yes) right; popular has none
    preds = [{"id": "random/1", "text": "Yes"}, {"id": "random/2", "text": "Yes"}, {"id": "random/3", "text": "Yes"}]
    r = bench.score(preds, require_all=False)
    assert list(r) == ["random", "average"]
    assert (r["random"]["n"], r["average"]["accuracy"], r["average"]["precision"]) == (3, 2 / 3, 2 / 3)
    with pytest.raises(ValueError, match="^predictions cover 3 of 4 questions; missing question_id 4$"):
        bench.score(preds)
    with pytest.raises(ValueError, match="^pope: no predictions to score$"):
        bench.score([], require_all=False)


def test_benchmark_rejects_bad_config_and_predictions(tmp_path):
    q = _jsonl(tmp_path / "q.json", RECORDS)
    with pytest.raises(ValueError, match="^pope: prompt_template 'Q' has no '{question}' placeholder$"):
        PopeBenchmark({"random": q}, prompt_template="Q")
    with pytest.raises(ValueError, match="^unknown POPE parser 'exact'"):
        PopeBenchmark({"random": q}, parser="exact")
    bench = PopeBenchmark({"random": q})
    with pytest.raises(ValueError) as e:
        bench.score([{"id": "random/9", "text": "yes"}])
    assert str(e.value) == "prediction 1: unknown id 'random/9'; expected '<split>/<question_id>' from samples()"
    with pytest.raises(ValueError) as e:
        bench.score([{"id": "random/1", "text": "yes"}, {"id": "random/1", "text": "no"}])
    assert str(e.value) == "prediction 2: duplicate id 'random/1'"
    with pytest.raises(ValueError) as e:
        bench.score([{"id": "random/1", "text": "yes"}])
    assert str(e.value) == "predictions cover 1 of 4 questions; missing question_id 2, 3, 4"


# --- bad inputs: one ValueError with one clear message ----------------------------------------------------------


def _bad_input_cases(tmp_path: Path) -> list[tuple[dict, str]]:
    good_q = _jsonl(tmp_path / "q.json", RECORDS)
    good_a = _answers(tmp_path / "a.jsonl", ["yes", "no", "yes", "no"])
    dup_q = _jsonl(tmp_path / "dup_q.json", RECORDS + [RECORDS[0]])
    bad_label = _jsonl(tmp_path / "label.json", [dict(RECORDS[0], label="Yes")])
    str_id = _jsonl(tmp_path / "str_id.json", [dict(RECORDS[0], question_id="1")])
    corrupt = _write(tmp_path / "corrupt.json", '{"question_id": 1, "image": "x.jpg",\n')
    bad_array = _write(tmp_path / "array.json", '[{"question_id": 1},\n')
    empty = _write(tmp_path / "empty.jsonl", "\n")
    no_text = _jsonl(tmp_path / "no_text.jsonl", [{"question_id": 1, "answer": "yes"}])
    unknown = _answers(tmp_path / "unknown.jsonl", ["yes", "no", "yes", "no", "yes"])
    dup_a = _answers(tmp_path / "dup_a.jsonl", ["yes", "no", "yes"], ids=[1, 2, 1])
    partial = _answers(tmp_path / "partial.jsonl", ["yes", "no"])
    missing = tmp_path / "missing.json"
    q, a = str(good_q), str(good_a)
    return [
        ({"questions_path": missing, "predictions_path": a}, f"questions file {str(missing)!r} not found"),
        ({"questions_path": corrupt, "predictions_path": a},
         f"questions file {str(corrupt)!r} line 1: invalid JSON (Expecting property name enclosed in double quotes)"),
        ({"questions_path": bad_array, "predictions_path": a},
         f"questions file {str(bad_array)!r}: invalid JSON array (Expecting value at line 2)"),
        ({"questions_path": bad_label, "predictions_path": a},
         f"questions file {str(bad_label)!r} line 1: label must be 'yes' or 'no', got 'Yes'"),
        ({"questions_path": str_id, "predictions_path": a},
         f"questions file {str(str_id)!r} line 1: field 'question_id' must be int, got '1'"),
        ({"questions_path": dup_q, "predictions_path": a},
         f"questions file {str(dup_q)!r} line 5: duplicate question_id 1 (first at line 1)"),
        ({"questions_path": q, "predictions_path": empty}, f"predictions file {str(empty)!r} has no records"),
        ({"questions_path": q, "predictions_path": no_text},
         f"predictions file {str(no_text)!r} line 1: missing field 'text'"),
        ({"questions_path": q, "predictions_path": unknown},
         f"predictions file {str(unknown)!r} line 5: question_id 5 is not in questions file {q!r}"),
        ({"questions_path": q, "predictions_path": dup_a},
         f"predictions file {str(dup_a)!r} line 3: duplicate question_id 1 (first at line 1)"),
        ({"questions_path": q, "predictions_path": partial},
         "predictions cover 2 of 4 questions; missing question_id 3, 4"),
        ({"questions_path": q, "predictions_path": a, "parser": "vlmeval"},
         "unknown POPE parser 'vlmeval'; did you mean 'vlmevalkit'? available: lmms-eval, official, vlmevalkit"),
    ]  # fmt: skip


def test_bad_inputs_raise_one_clear_value_error(tmp_path):
    cases = _bad_input_cases(tmp_path)
    assert len(cases) >= 10
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            score_pope(**kwargs)
        assert str(e.value) == message


# --- CLI --------------------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="interventions")
    add_score_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_score_pope_prints_one_json_object(tmp_path, capsys):
    q = _jsonl(tmp_path / "q.json", RECORDS)
    a = _answers(tmp_path / "a.jsonl", ["Yes", "No", "No", "No"])
    assert _cli(["score", "pope", "--questions", str(q), "--predictions", str(a), "--parser", "lmms-eval"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["accuracy"], out["precision"], out["recall"], out["f1"], out["yes_ratio"]) == (
        0.75,
        1.0,
        0.5,
        2 / 3,
        0.25,
    )
    assert out["parser"] == "lmms-eval"
    with pytest.raises(ValueError, match="^unknown POPE parser 'x'"):
        _cli(["score", "pope", "--questions", str(q), "--predictions", str(a), "--parser", "x"])
