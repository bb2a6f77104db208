"""POPE (Li et al., EMNLP 2023): question files, file-version detection, metrics and the benchmark object.

Spec: specs/evals.md §1. Questions are matched to answers by id, never by position.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from .pope_parsers import PARSERS, PopeParser
from .records import read_records, require_field

SPLITS = ("random", "popular", "adversarial")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
# LLaVA-1.5's evaluation prompt (question + this suffix); specs/evals.md §1.4.
LLAVA_PROMPT = "{question}\nAnswer the question using a single word or phrase."

# md5 of the raw bytes of the official COCO files -> (POPE commit, split, questions); specs/evals.md §1.2.
KNOWN_FILES: dict[str, tuple[str, str, int]] = {
    "dc9b6c41ad832c48da758cfa85b37d2c": ("109985c", "random", 3000),
    "64902313fb995e09fa478de9741910d7": ("109985c", "popular", 3000),
    "3b1a278f8d61acd21b27020d0af817cb": ("109985c", "adversarial", 3000),
    "b635b20061b1262cba65ed5bef7660a2": ("e3e3926", "random", 2910),
    "8233e15e9bb7587b03a624b38a1cee74": ("e3e3926", "popular", 3000),
    "b3f9df71709d436462611d7e88ce1447": ("e3e3926", "adversarial", 3000),
}
# LLaVA-1.5 pinned POPE e3e3926, whose random split has 2910 questions; later files have 3000.
LLAVA_PINNED_RANDOM = 2910


def describe_version(md5: str, n_questions: int) -> str:
    """Name the POPE file version from its md5, or say what the question count suggests."""
    if md5 in KNOWN_FILES:
        commit, split, n = KNOWN_FILES[md5]
        pinned = " (LLaVA-1.5 pinned)" if commit == "e3e3926" else ""
        return f"POPE {commit} coco {split}, {n} questions{pinned}"
    if n_questions == LLAVA_PINNED_RANDOM:
        return f"unrecognised file with {n_questions} questions, the size of LLaVA-1.5's pinned random split (e3e3926)"
    return f"unrecognised file with {n_questions} questions"


def load_questions(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read one POPE split (JSON Lines with LF or CRLF, or a JSON array).

    Returns:
        `(questions, info)`: each question is ``{"question_id", "image", "text", "label"}``; `info` is the file
        fingerprint of `read_records` plus `questions`, `yes`, `no`, `images` and `version`.

    Raises:
        ValueError: unreadable file, a missing or mistyped field, a label other than yes/no, a duplicated id.

    Example:
        >>> qs, info = load_questions("coco_pope_random.json")  # doctest: +SKIP
        >>> info["questions"], info["version"]  # doctest: +SKIP
        (3000, 'POPE 109985c coco random, 3000 questions')
    """
    records, info = read_records(path, "questions file")
    questions, seen = [], {}
    for pos, rec in records:
        where = f"questions file {info['path']!r} {pos}"
        qid = require_field(rec, "question_id", int, where)
        label = require_field(rec, "label", str, where)
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: label must be 'yes' or 'no', got {label!r}")
        if qid in seen:
            raise ValueError(f"{where}: duplicate question_id {qid} (first at {seen[qid]})")
        seen[qid] = pos
        questions.append(
            {
                "question_id": qid,
                "image": require_field(rec, "image", str, where),
                "text": require_field(rec, "text", str, where),
                "label": label,
            }
        )
    n_yes = sum(q["label"] == "yes" for q in questions)
    info.update(
        questions=len(questions),
        yes=n_yes,
        no=len(questions) - n_yes,
        images=len({q["image"] for q in questions}),
        version=describe_version(info["md5"], len(questions)),
    )
    return questions, info


def pope_metrics(labels: Sequence[str], predictions: Sequence[str | None], parser: PopeParser) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and yes-ratio (fractions in [0, 1]; positive class = yes), plus counts and
    the false-positive rate `fp_rate` = FP / (FP + TN) (the share of "no" questions answered yes; not averaged).

    An unparseable prediction (``None``) is wrong in accuracy and enters precision / recall as the parser says.
    The yes-ratio is the share of *predictions* that are yes (lmms-eval's counts labels, a bug not copied).
    A zero denominator gives 0.0.
    """
    pairs = list(zip(labels, predictions, strict=True))
    unknown_no = parser.unknown == "no"
    tp = sum(lab == "yes" and p == "yes" for lab, p in pairs)
    fp = sum(lab == "no" and p == "yes" for lab, p in pairs)
    tn = sum(lab == "no" and p == "no" for lab, p in pairs)
    fn = sum(lab == "yes" and (p == "no" or (p is None and unknown_no)) for lab, p in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(p == "yes" for _, p in pairs) / n if n else 0.0,
        "fp_rate": fp / (fp + tn) if fp + tn else 0.0,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "unparsed": sum(p is None for _, p in pairs),
    }


def score_split(
    questions: Sequence[Mapping[str, Any]], answers: Mapping[int, str], parser: str, require_all: bool = True
) -> dict[str, Any]:
    """Parse ``answers`` (question_id -> raw text) and score them against one split's labels.

    Args:
        require_all (`bool`, *optional*, defaults to `True`): every question needs an answer; with `False`
            unanswered questions are left out (a `--limit` run), and `n` says how many were scored.

    Raises:
        ValueError: an unknown parser, or a question without an answer.
    """
    p = PARSERS.get(parser)
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if not require_all:
        questions = [q for q in questions if q["question_id"] in answers]
    elif missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ValueError(
            f"predictions cover {len(questions) - len(missing)} of {len(questions)} questions; "
            f"missing question_id {shown}"
        )
    labels = [q["label"] for q in questions]
    preds = [p.parse(answers[q["question_id"]]) for q in questions]
    return pope_metrics(labels, preds, p)


def mean_metrics(per_split: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Unweighted mean of each metric over splits (LLaVA-1.5's "POPE 85.9" is the mean F1 of the three)."""
    return {m: sum(s[m] for s in per_split.values()) / len(per_split) for m in METRICS}


@dataclass(frozen=True)
class PopeBenchmark:
    """POPE as data: one question file per split, a prompt template, a parser and the metrics.

    Args:
        files (`Mapping[str, str | Path]`): split name -> question file.
        parser (`str`, *optional*, defaults to `"official"`): a name from `PARSERS`.
        prompt_template (`str`, *optional*, defaults to `LLAVA_PROMPT`): must contain ``{question}``.
        max_new_tokens (`int`, *optional*, defaults to 128): LLaVA's default for its POPE answers.

    Example:
        >>> bench = PopeBenchmark.from_dir("pope/coco")  # doctest: +SKIP
        >>> preds = [{"id": s["id"], "text": generate(s)} for s in bench.samples()]  # doctest: +SKIP
        >>> bench.score(preds)["average"]["f1"]  # doctest: +SKIP
    """

    files: Mapping[str, str | Path]
    parser: str = "official"
    prompt_template: str = LLAVA_PROMPT
    max_new_tokens: int = 128
    name: ClassVar[str] = "pope"
    # bump when the prompt, parser rules or metrics change
    version: ClassVar[str] = "1"
    metrics: ClassVar[tuple[str, ...]] = METRICS

    def __post_init__(self) -> None:
        PARSERS.get(self.parser)
        if not self.files:
            raise ValueError("pope: no question files given")
        check_template(self.prompt_template)

    @classmethod
    def from_dir(cls, directory: str | Path, dataset: str = "coco", **kwargs: Any) -> PopeBenchmark:
        """Find ``{dataset}_pope_{split}.json`` (or the SEEM-built ``{dataset}_pope_seem_{split}.json``) per split."""
        directory = Path(directory)
        files = {}
        for split in SPLITS:
            for name in (f"{dataset}_pope_{split}.json", f"{dataset}_pope_seem_{split}.json"):
                if (directory / name).is_file():
                    files[split] = directory / name
                    break
        if not files:
            raise ValueError(f"pope: no {dataset}_pope_{{{','.join(SPLITS)}}}.json files in {str(directory)!r}")
        return cls(files, **kwargs)

    @cached_property
    def _data(self) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
        return {split: load_questions(path) for split, path in self.files.items()}

    def prompt(self, question: str) -> str:
        """The text prompt for one question (the image goes where the model's template puts it)."""
        return self.prompt_template.format(question=question)

    def samples(self) -> Iterator[dict[str, Any]]:
        """Yield ``{"id": "<split>/<question_id>", "split", "question_id", "image", "question", "label"}``."""
        for split, (questions, _) in self._data.items():
            for q in questions:
                yield {
                    "id": f"{split}/{q['question_id']}",
                    "split": split,
                    "question_id": q["question_id"],
                    "image": q["image"],
                    "question": q["text"],
                    "label": q["label"],
                }

    def record(self) -> dict[str, Any]:
        """Provenance for results files: benchmark, version, prompt template, parser and each file's fingerprint."""
        return {
            "benchmark": self.name,
            "version": self.version,
            "prompt": self.prompt_template,
            "parser": self.parser,
            "parser_source": PARSERS.get(self.parser).source,
            "files": {split: info for split, (_, info) in self._data.items()},
        }

    def score(self, predictions: Iterable[Mapping[str, Any]], require_all: bool = True) -> dict[str, Any]:
        """Score ``[{"id", "text"}, ...]`` (ids as yielded by `samples`).

        Args:
            predictions (`Iterable[Mapping]`): one per sample.
            require_all (`bool`, *optional*, defaults to `True`): every sample needs a prediction; with `False`
                (a `--limit` run) only predicted samples are scored and splits without any are left out.

        Returns:
            `dict`: split name -> metrics and counts, plus `average` (metric -> unweighted mean over splits);
            the parser and provenance are in `record()`.

        Raises:
            ValueError: a prediction without `id`/`text`, an unknown or duplicated id, a missing prediction.
        """
        answers: dict[str, dict[int, str]] = {split: {} for split in self._data}
        known = {s["id"] for s in self.samples()}
        for i, pred in enumerate(predictions, start=1):
            where = f"prediction {i}"
            sid = require_field(pred, "id", str, where)
            text = require_field(pred, "text", str, where)
            if sid not in known:
                raise ValueError(f"{where}: unknown id {sid!r}; expected '<split>/<question_id>' from samples()")
            split, qid = sid.split("/", 1)
            if int(qid) in answers[split]:
                raise ValueError(f"{where}: duplicate id {sid!r}")
            answers[split][int(qid)] = text
        per_split = {
            split: score_split(qs, answers[split], self.parser, require_all)
            for split, (qs, _) in self._data.items()
            if require_all or answers[split]
        }
        if not per_split:
            raise ValueError("pope: no predictions to score")
        if "average" in per_split:
            raise ValueError("pope: a split may not be called 'average'")
        return {**per_split, "average": mean_metrics(per_split)}


def check_template(template: str) -> None:
    """A POPE prompt template holds `{question}` and no other placeholder; else a `ValueError` naming the problem.

    Raises:
        ValueError: no `{question}`, an unknown placeholder such as `{foo}`, or a stray brace.
    """
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as e:
        raise ValueError(f"pope: prompt_template {template!r} cannot be formatted: not a valid template ({e}); "
                         "write a literal brace as '{{' or '}}'") from None
    unknown = sorted(fields - {"question"})
    if unknown:
        raise ValueError(f"pope: prompt_template {template!r} cannot be formatted: unknown placeholder(s) "
                         f"{', '.join('{' + f + '}' for f in unknown)}; the only placeholder is {{question}} (write a "
                         "literal brace as '{{' or '}}')")
    if "question" not in fields:
        raise ValueError(f"pope: prompt_template {template!r} has no '{{question}}' placeholder")
