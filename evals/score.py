"""Score saved generations without a model: `score chair` (captions) and `score pope` (answers).

Python API: `score_chair`, `score_pope`. CLI: `add_score_commands` adds both under a `score` command of any
argparse parser; each prints one JSON object. Benchmark modules are imported inside the functions so that
building the CLI parser stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def score_chair(
    captions_path: str | Path, objects: str | Path | None = None, annotations: str | Path | None = None
) -> dict[str, Any]:
    """CHAIR of a captions file against exactly one ground-truth source.

    Args:
        captions_path (`str` or `Path`): JSON Lines (or a JSON array) of ``{"image_id": int, "caption": str}``,
            one per image, as in OPERA's released logs.
        objects (`str` or `Path`, *optional*): per-image object file, e.g. `chair_truth.SHIPPED_OBJECTS`.
        annotations (`str` or `Path`, *optional*): COCO 2014 annotations directory.

    Returns:
        `dict`: `CHAIR_s`, `CHAIR_i`, `recall` (percentages), `len` (mean tokens per caption), counts, the
        ground-truth source, lemmatiser and scorer, `captions_file` (path, md5, ...) and, last, `captions`
        (per-caption mentions and hallucinated words).

    Raises:
        ValueError: both or neither source, a missing or malformed file, a duplicated or unknown image id.

    Example:
        >>> from evals.benchmarks.chair_truth import SHIPPED_OBJECTS
        >>> score_chair("beam5.jsonl", objects=SHIPPED_OBJECTS)["CHAIR_s"]  # doctest: +SKIP
        49.0
    """
    from .benchmarks.chair import chair_metrics, read_captions
    from .benchmarks.chair_truth import check_one_source, load_ground_truth

    check_one_source(objects, annotations)
    captions, info = read_captions(captions_path)
    result = chair_metrics(captions, load_ground_truth(objects, annotations))
    details = result.pop("captions")
    return {**result, "captions_file": info, "captions": details}


def score_pope(questions_path: str | Path, predictions_path: str | Path, parser: str = "official",
               partial: bool = False) -> dict[str, Any]:
    """POPE metrics of saved answers, matched to questions by id.

    Args:
        questions_path (`str` or `Path`): a POPE question file (JSON Lines, LF or CRLF, or a JSON array), or a
            folder with one ``*_pope_<split>.json`` file per split (as `eval pope --questions` takes).
        predictions_path (`str` or `Path`): JSON Lines of either ``{"question_id": int, "text": str}`` (LLaVA's
            answer files), one per question of one file, or the eval runner's ``{"id": "<split>/<question_id>",
            "text": str}`` (`OUT/predictions/<method>.jsonl`), which are scored per split like the runner does.
        parser (`str`, *optional*, defaults to `"official"`): `official`, `lmms-eval` or `vlmevalkit`.
        partial (`bool`, *optional*, defaults to `False`): score only the answered questions (the predictions of
            a `--limit` run), as the runner does; by default every question needs an answer.

    Returns:
        `dict`: for `question_id` answers: `accuracy`, `precision`, `recall`, `f1`, `yes_ratio` (fractions),
        counts (`n`, `tp`, `fp`, `tn`, `fn`, `unparsed`), `parser`, `questions_file` (md5, lines, format,
        version, ...) and `predictions_file`. For runner predictions: one such metrics dict per split and
        `average` (the runner's `metrics`), plus `parser`, `questions_files` and `predictions_file`.

    Raises:
        ValueError: unknown parser, a missing or malformed file or field, an unknown or duplicated question id,
            a question without an answer, a folder of questions with `question_id` answers.
    """
    from .benchmarks.pope_parsers import PARSERS
    from .benchmarks.records import read_records

    PARSERS.get(parser)
    records, predictions_info = read_records(predictions_path, "predictions file")
    if "id" in records[0][1] and "question_id" not in records[0][1]:
        return _score_runner_pope(Path(questions_path), records, predictions_info, parser, partial)
    if Path(questions_path).is_dir():
        raise ValueError(f"--questions {str(questions_path)!r} is a folder; answers keyed by question_id belong to "
                         "one question file (give the file), or use the runner's predictions (ids '<split>/<id>')")
    return _score_llava_pope(questions_path, records, predictions_info, parser, partial)


def _score_llava_pope(questions_path: str | Path, records: list, predictions_info: dict[str, Any],
                      parser: str, partial: bool) -> dict[str, Any]:
    from .benchmarks.pope import load_questions, score_split
    from .benchmarks.records import require_field

    questions, questions_info = load_questions(questions_path)
    known = {q["question_id"] for q in questions}
    answers: dict[int, str] = {}
    seen: dict[int, str] = {}
    for pos, rec in records:
        where = f"predictions file {predictions_info['path']!r} {pos}"
        qid = require_field(rec, "question_id", int, where)
        text = require_field(rec, "text", str, where)
        if qid not in known:
            raise ValueError(f"{where}: question_id {qid} is not in questions file {questions_info['path']!r}")
        if qid in seen:
            raise ValueError(f"{where}: duplicate question_id {qid} (first at {seen[qid]})")
        seen[qid] = pos
        answers[qid] = text
    metrics = score_split(questions, answers, parser, require_all=not partial)
    return {**metrics, "parser": parser, "questions_file": questions_info, "predictions_file": predictions_info}


def _score_runner_pope(questions: Path, records: list, predictions_info: dict[str, Any],
                       parser: str, partial: bool) -> dict[str, Any]:
    """The runner's predictions (ids `<split>/<question_id>`), scored as `PopeBenchmark.score` scores them; with one
    question file, only the predictions of its split."""
    from .benchmarks.generation import question_files
    from .benchmarks.pope import PopeBenchmark
    from .benchmarks.records import require_field

    files = question_files(questions)
    predictions = []
    for pos, rec in records:
        where = f"predictions file {predictions_info['path']!r} {pos}"
        sid = require_field(rec, "id", str, where)
        text = require_field(rec, "text", str, where)
        if sid.split("/", 1)[0] in files:
            predictions.append({"id": sid, "text": text})
    if not predictions:
        raise ValueError(f"predictions file {predictions_info['path']!r} has no prediction for the "
                         f"{', '.join(files)} split(s) of --questions {str(questions)!r}")
    bench = PopeBenchmark(files, parser=parser)
    metrics = bench.score(predictions, require_all=not partial)
    return {**metrics, "parser": parser, "questions_files": bench.record()["files"],
            "predictions_file": predictions_info}


def add_score_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``score chair`` and ``score pope`` to ``subparsers``; each sets ``args.run(args) -> int``.

    Example:
        >>> sub = argparse.ArgumentParser().add_subparsers(dest="command")
        >>> add_score_commands(sub)
    """
    score = subparsers.add_parser("score", help="score saved generations (CHAIR captions, POPE answers)")
    benchmarks = score.add_subparsers(dest="benchmark", required=True)
    chair = benchmarks.add_parser("chair", help="CHAIR_s, CHAIR_i, recall, len of a captions file")
    chair.add_argument("--captions", required=True, metavar="FILE.jsonl", help='lines {"image_id", "caption"}')
    chair.add_argument("--objects", metavar="FILE", help="per-image object sets (JSON or JSON.gz)")
    chair.add_argument("--annotations", metavar="DIR", help="COCO 2014 instances_* and captions_* files")
    chair.set_defaults(run=_run_chair)
    pope = benchmarks.add_parser("pope", help="POPE accuracy, precision, recall, F1, yes-ratio")
    pope.add_argument("--questions", required=True, metavar="PATH", help="POPE question file, or a folder of "
                                                                         "*_pope_<split>.json files")
    pope.add_argument("--predictions", required=True, metavar="FILE.jsonl",
                      help='lines {"question_id", "text"}, or the runner\'s OUT/predictions/<method>.jsonl')
    pope.add_argument("--parser", default="official", help="official (default), lmms-eval or vlmevalkit")
    pope.add_argument("--partial", action="store_true", help="score only the answered questions (a --limit run)")
    pope.set_defaults(run=_run_pope)


def _run_chair(args: argparse.Namespace) -> int:
    print(json.dumps(score_chair(args.captions, objects=args.objects, annotations=args.annotations), indent=2))
    return 0


def _run_pope(args: argparse.Namespace) -> int:
    print(json.dumps(score_pope(args.questions, args.predictions, parser=args.parser, partial=args.partial),
                     indent=2))
    return 0
