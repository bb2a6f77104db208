"""The dev sets and scoring that the head searches share (`act-heads`, `perturb-heads`), and their resumable log.

Scoring (fast; no lm-eval): lm-eval's stock zero-shot prompt of a shipped multiple-choice task (`copa`, `boolq`,
`arc_easy`, data in `evals/data/lm/`); each choice's continuation log-likelihood given the context, summed over its
tokens (lm-eval's `acc`). Accuracy: the gold choice has the largest log-likelihood. Margin: the mean over examples
of the gold choice's log-likelihood minus the best other choice's. Every (context, choice) sequence is one row of a
left-padded batch, so one evaluation is `ceil(examples·choices / batch_size)` forwards.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from interventions.errors import ConfigError
from interventions.families import resolve
from interventions.version import __version__

from ..benchmarks.lm import DATA_DIR


@dataclass(frozen=True)
class Example:
    """One multiple-choice question: the context, the continuations (with their leading space), the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int


def _copa(doc: dict) -> Example:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    lower = [" " + c[0].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]
    return Example(doc["premise"].strip()[:-1] + f" {connector}", tuple(lower), int(doc["label"]))


def _boolq(doc: dict) -> Example:
    return Example(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", (" no", " yes"), int(doc["label"]))


def _arc(doc: dict) -> Example:
    choices = tuple(" " + text for text in doc["choices"]["text"])
    return Example(f"Question: {doc['question']}\nAnswer:", choices, doc["choices"]["label"].index(doc["answerKey"]))


#: task -> (data file under evals/data/lm, document -> Example), prompts as lm-eval's stock tasks
TASKS: dict[str, tuple[str, Callable[[dict], Example]]] = {
    "copa": ("copa/validation.jsonl", _copa),
    "boolq": ("boolq/validation.jsonl", _boolq),
    "arc_easy": ("arc_easy/test.jsonl", _arc),
}

#: one scored row: the token ids of context + choice, and how many of them are the choice
Row = tuple[list[int], int]


def load_task(task: str, tool: str = "calibrate") -> tuple[list[Example], Path]:
    """The examples of a shipped task and its data file; `tool` names the caller in errors."""
    if task not in TASKS:
        raise ConfigError(f"{tool}: task={task!r} is invalid; expected one of {', '.join(TASKS)}")
    name, parse = TASKS[task]
    path = DATA_DIR / name
    with open(path) as f:
        return [parse(json.loads(line)) for line in f if line.strip()], path


@dataclass(frozen=True)
class DevSet:
    """The examples a search scores, tokenized, with the provenance every search records."""

    examples: list[int]  # indices into the task's file
    rows: list[Row]
    groups: list[list[int]]  # per example, its rows' indices, gold first
    setup: dict[str, Any]  # model, task, data file and md5, limit, seed, examples, batch size

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        """`{"accuracy", "margin"}` of `model` as it is (wrapped or not) on this dev set."""
        return score(model, self.rows, self.groups, self.setup["batch_size"])


def dev_set(model: torch.nn.Module, tokenizer: Any, task: str, *, limit: int | None, seed: int, batch_size: int,
            model_id: str | None, tool: str) -> DevSet:
    """Draw `limit` examples of `task` with `seed` (default all of them) and tokenize them.

    Raises:
        ConfigError: an unknown task, or a limit or batch size below 1.
    """
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ConfigError(f"{tool}: batch_size and limit must be positive integers")
    examples, path = load_task(task, tool)
    chosen = list(range(len(examples)))
    if limit is not None and limit < len(examples):
        chosen = sorted(random.Random(seed).sample(chosen, limit))
    rows, groups = tokenize([examples[i] for i in chosen], tokenizer)
    setup = {"model": model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__,
             "task": task, "data": {"file": f"evals/data/lm/{TASKS[task][0]}", "md5": _md5(path)},
             "limit": limit, "seed": seed, "examples": chosen, "batch_size": batch_size}
    return DevSet(chosen, rows, groups, setup)


def head_pool(model: torch.nn.Module, layers: Sequence[int] | None, heads: Sequence[int] | None,
              default_layers: Callable[[int], range], tool: str) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Validated candidate layers and query heads (defaults: `default_layers(num_layers)`, all heads) and their
    layer-major `(layer, head)` pool.

    Raises:
        ConfigError: a layer or head out of range.
    """
    adapter = resolve(model)
    num_layers = len(adapter.attention_modules(model))
    num_heads = adapter.text_config(model).num_attention_heads
    layers = list(default_layers(num_layers)) if layers is None else sorted(set(layers))
    heads = list(range(num_heads)) if heads is None else sorted(set(heads))
    if any(not 0 <= i < num_layers for i in layers) or any(not 0 <= h < num_heads for h in heads):
        raise ConfigError(f"{tool}: layers={layers} or heads={heads} out of range; the model has layers "
                          f"0..{num_layers - 1} of heads 0..{num_heads - 1}")
    return layers, heads, [(layer, head) for layer in layers for head in heads]


def tokenize(examples: list[Example], tokenizer: Any) -> tuple[list[Row], list[list[int]]]:
    """Rows `(ids, continuation length)` in example-major order, and the row indices of each example's choices
    (gold first). The continuation is cut from the tokenized whole, as lm-eval does."""
    rows, groups = [], []
    for ex in examples:
        context = tokenizer(ex.context, add_special_tokens=False)["input_ids"]
        indices = []
        for choice in ex.choices:
            whole = tokenizer(ex.context + choice, add_special_tokens=False)["input_ids"]
            indices.append(len(rows))
            rows.append((whole, len(whole) - len(context)))
        groups.append([indices[ex.gold]] + [i for c, i in enumerate(indices) if c != ex.gold])
    return rows, groups


@torch.no_grad()
def score(model: torch.nn.Module, rows: list[Row], groups: list[list[int]], batch_size: int) -> dict[str, float]:
    """Accuracy and mean gold margin from the summed continuation log-likelihood of every row."""
    device = next(model.parameters()).device
    loglik = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        keep = max(n for _, n in batch) + 1
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (row, _) in enumerate(batch):  # left padding: every row ends at the last position
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep).logits.float()
        logprobs = logits[:, :-1].log_softmax(-1)  # predicts the last keep - 1 tokens
        for i, (row, n) in enumerate(batch):
            targets = torch.tensor(row[len(row) - n:], device=device)
            loglik.append(float(logprobs[i, logprobs.shape[1] - n:].gather(-1, targets[:, None]).sum()))
    gold = torch.tensor([loglik[g[0]] for g in groups], dtype=torch.float64)
    other = torch.tensor([max(loglik[i] for i in g[1:]) for g in groups], dtype=torch.float64)
    return {"accuracy": float((gold > other).double().mean()), "margin": float((gold - other).mean())}


def run_key(setup: dict[str, Any]) -> str:
    """A short hash of everything that determines a search's results."""
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


def provenance() -> dict[str, Any]:
    """Date and library versions, recorded in every search result."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"interventions": __version__, "transformers": transformers.__version__,
                         "torch": torch.__version__}}


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write a search result as JSON (sorted keys), the head-list file a method's `heads=` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


class SearchLog:
    """Append-only JSONL of one search: a header with its run key, then one record per finished evaluation.

    An existing file of the same search is read back (`records`), so a restart only computes what is missing; a
    file of another search is an error. Without a path the log lives in memory only.
    """

    def __init__(self, path: Path | None, key: str, setup: dict[str, Any], tool: str) -> None:
        self.path = path
        lines = []
        if path is not None and path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines and lines[0].get("run_key") != key:
            raise ConfigError(f"{tool}: {path} holds another search (run {lines[0].get('run_key')}, this one is "
                              f"{key}: model, task, examples or search settings differ); give a new results path "
                              "or delete it")
        self.records: list[dict[str, Any]] = lines[1:]
        if path is not None and not lines:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"kind": "header", "run_key": key, **setup})

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` (flushed when the call returns)."""
        self.records.append(record)
        if self.path is not None:
            self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def add_search_arguments(parser: argparse.ArgumentParser, method: str, results_help: str, layers_help: str) -> None:
    """The options every head search shares: model, dev set, output files, candidates, batching, loading."""
    parser.add_argument("--model", required=True, help="hub id, local path, or builtin:smollm2")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="multiple-choice dev set")
    parser.add_argument("--output", "-o", required=True, help=f"head-list JSON to write (pass it as {method}'s heads)")
    parser.add_argument("--results", help=f"{results_help}, resumed on restart (default: the output with .jsonl)")
    parser.add_argument("--limit", type=int, help="number of examples (drawn with --seed); default all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, nargs="+", help=f"candidate layers (default {layers_help})")
    parser.add_argument("--heads", type=int, nargs="+", help="candidate heads per layer (default all)")
    parser.add_argument("--batch-size", type=int, default=16, help="(context, choice) rows per forward")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dtype", default="float32", help="torch dtype to load the model in")
    parser.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. 'auto')")


def write_calibrated_config(model: torch.nn.Module, method: str, params: dict[str, Any], output: str | Path,
                            model_id: str | None) -> str:
    """Write the saved config `interventions_config.json` beside `output`: `method` with the calibrated `params`
    (validated by wrapping once), which `iv.wrap(model, folder)` and `--params folder` load. Returns the line the
    command prints: the file, or why none was written (the method does not apply, or the search kept nothing)."""
    from interventions.api import apply

    try:
        with apply(model, method, **params) as handle:
            return f"saved config ({method}) -> {handle.save_pretrained(Path(output).parent, model_id=model_id)}"
    except ValueError as e:
        return f"no saved config written: {e}"


def check_output_file(path: str | Path, what: str = "--output") -> Path:
    """Fail before any model work when `path` cannot be written: a folder, or under a non-folder or a read-only
    folder."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder; give a file name, e.g. {str(path / 'result.json')!r}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{what} {str(path)!r} cannot be written: {str(parent)!r} is not writable")
    return path


def load_for_search(args: argparse.Namespace, tool: str) -> tuple[torch.nn.Module, Any, str]:
    """The model, its tokenizer and its id from parsed `add_search_arguments` options, after checking the options
    that need no model (output files, limit, batch size, loading flags)."""
    from ..loading import check_load_options, load_model

    check_output_file(args.output)
    if args.results is not None:
        check_output_file(args.results, "--results")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError(f"{tool}: --batch-size and --limit must be positive integers")
    check_load_options(args.model, args.dtype, args.device_map)
    loaded = load_model(args.model, args.dtype, args.device_map)
    return loaded.model, getattr(loaded.processor, "tokenizer", loaded.processor), loaded.model_id


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()
