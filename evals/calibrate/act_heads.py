"""ACT's offline head search (shared/specs/act.md §7, conformance 14): calibrate one (layer, head) at a time on a dev
set of a multiple-choice task, keep the heads that beat the unmodified model, and write the head list that
`iv.wrap(model, "act", heads="heads.json")` reads.

Scoring (`calibrate/devset.py`, fast, no lm-eval): lm-eval's stock zero-shot prompt of a shipped multiple-choice
task (`copa`, `boolq`, `arc_easy`); accuracy and mean gold margin of summed continuation log-likelihoods. Rule [derived; the official code logs accuracies only]: a head is
kept when `(Δaccuracy, Δmargin) > (0, 0)` lexicographically: it raises accuracy, or keeps it and raises the margin.
ACT's own protocol (§8: options in the prompt, one generated letter, 900 training examples) is not this one.

Cost: every (context, choice) sequence is one row of a left-padded batch of `batch_size` rows, so one evaluation is
`ceil(examples·choices / batch_size)` forwards; the search runs `heads + 1` evaluations (the baseline once). A
per-head line is appended to a JSONL file as soon as the head finishes; a restart skips the heads already there.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from interventions.api import apply, method_params
from interventions.errors import ConfigError

from .devset import (
    SearchLog,
    add_search_arguments,
    dev_set,
    head_pool,
    load_for_search,
    load_task,
    provenance,
    run_key,
    score,
    tokenize,
    write_calibrated_config,
    write_result,
)

logger = logging.getLogger(__name__)


def search_act_heads(model: torch.nn.Module, tokenizer: Any, task: str, *, limit: int | None = None, seed: int = 0,
                     layers: Sequence[int] | None = None, heads: Sequence[int] | None = None, stride: int = 1,
                     beta: float = 0.4, threshold: float = 0.1, batch_size: int = 16,
                     results: str | Path | None = None, progress: bool = True,
                     on_head: Callable[[dict[str, Any]], None] | None = None,
                     model_id: str | None = None) -> dict[str, Any]:
    """Evaluate ACT on each candidate head alone and keep those that improve the task metric (module docstring).

    Args:
        model (`transformers.PreTrainedModel`): an unwrapped model of a supported family.
        tokenizer: its tokenizer.
        task (`str`): `"copa"`, `"boolq"` or `"arc_easy"`.
        limit (`int`, *optional*): this many examples, drawn with `seed`; default all of them.
        seed (`int`, *optional*, defaults to `0`): picks the examples (the forwards are deterministic).
        layers (`Sequence[int]`, *optional*): candidate layers; default ACT's 2..L-2.
        heads (`Sequence[int]`, *optional*): candidate query heads in each layer; default all.
        stride (`int`, *optional*, defaults to `1`): keep every `stride`-th candidate of the layer-major pool.
        beta, threshold (`float`, *optional*, default `0.4`, `0.1`): ACT's parameters during the search.
        batch_size (`int`, *optional*, defaults to `16`): (context, choice) rows per forward.
        results (`str` or `Path`, *optional*): JSONL file of finished heads; an existing file of the same search
            is resumed, one of another search is an error.
        progress (`bool`, *optional*, defaults to `True`): a tqdm bar on stderr.
        on_head (`Callable`, *optional*): called with each head's record after it is written.
        model_id (`str`, *optional*): recorded as the model; default `model.config._name_or_path`.

    Returns:
        `dict`: `heads` (the kept `[layer, head]` pairs) plus provenance: model, task, data file and md5, limit,
        seed, the example indices, beta, threshold, the pool, the baseline, per-head results with deltas, cost.

    Raises:
        ConfigError: bad arguments, or a results file written by a different search.

    Example:
        >>> result = search_act_heads(model, tokenizer, "copa", limit=100, layers=[2, 3])
        >>> write_heads(result, "heads.json")
        >>> iv.wrap(model, "act", heads="heads.json")
    """
    check_options(stride, beta, threshold)
    dev = dev_set(model, tokenizer, task, limit=limit, seed=seed, batch_size=batch_size, model_id=model_id,
                  tool="act-heads")
    layers, heads, pool = _candidates(model, layers, heads, stride)
    setup = {**dev.setup, "beta": beta, "threshold": threshold}
    key = run_key(setup)
    forwards = math.ceil(len(dev.rows) / batch_size)
    logger.info("act-heads: %d candidate heads × %d forwards (%d examples, %d rows); run %s", len(pool), forwards,
                len(dev.examples), len(dev.rows), key)

    log = SearchLog(Path(results) if results is not None else None, key, setup, "act-heads")
    done = {(r["layer"], r["head"]): r for r in log.records if r["kind"] == "head"}
    baseline = next(({"accuracy": r["accuracy"], "margin": r["margin"]} for r in log.records
                     if r["kind"] == "baseline"), None)
    if baseline is None:
        baseline = dev.score(model)
        log.write({"kind": "baseline", **baseline})
    bar = tqdm(total=len(pool), initial=sum(p in done for p in pool), desc="act-heads", unit="head",
               file=sys.stderr, disable=not progress)
    with bar:
        for layer, head in pool:
            if (layer, head) in done:
                continue
            with apply(model, "act", heads=[[layer, head]], beta=beta, threshold=threshold):
                record = {"kind": "head", "layer": layer, "head": head, **dev.score(model)}
            log.write(record)
            done[(layer, head)] = record
            bar.update()
            if on_head is not None:
                on_head(record)

    per_head = []
    for layer, head in pool:
        record = done[(layer, head)]
        delta = (record["accuracy"] - baseline["accuracy"], record["margin"] - baseline["margin"])
        per_head.append({"layer": layer, "head": head, "accuracy": record["accuracy"], "margin": record["margin"],
                         "delta_accuracy": delta[0], "delta_margin": delta[1], "kept": delta > (0.0, 0.0)})
    kept = [[r["layer"], r["head"]] for r in per_head if r["kept"]]
    if not kept:
        logger.warning("act-heads: no head improved on the baseline; the head list is empty")
    return {
        "heads": kept,
        **setup,
        "rule": "kept when (delta_accuracy, delta_margin) > (0, 0) lexicographically",
        "pool": {"layers": layers, "heads": heads, "stride": stride, "size": len(pool)},
        "baseline": baseline,
        "results": per_head,
        "cost": {"rows": len(dev.rows), "forwards_per_head": forwards, "evaluations": len(pool) + 1,
                 "forwards": forwards * (len(pool) + 1)},
        "run_key": key,
        **provenance(),
    }


def evaluate_task(model: torch.nn.Module, tokenizer: Any, task: str, indices: Sequence[int] | None = None,
                  batch_size: int = 16) -> dict[str, float]:
    """The search's metric on examples `indices` of `task` (default all): `{"accuracy": ..., "margin": ...}`, for
    the model as it is (wrapped or not); e.g. to check a head list on examples the search did not use."""
    examples, _ = load_task(task, "act-heads")
    chosen = range(len(examples)) if indices is None else indices
    rows, groups = tokenize([examples[i] for i in chosen], tokenizer)
    return score(model, rows, groups, batch_size)


def write_heads(result: dict[str, Any], path: str | Path) -> Path:
    """Write a `search_act_heads` result as JSON (sorted keys) that `iv.wrap(model, "act", heads=path)` reads."""
    return write_result(result, path)


def _candidates(model: torch.nn.Module, layers: Sequence[int] | None, heads: Sequence[int] | None,
                stride: int) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Validated layers and heads (defaults: ACT's 2..L-2, all heads) and the layer-major pool, strided."""
    layers, heads, pool = head_pool(model, layers, heads, lambda n: range(2, n - 1), "act-heads")
    pool = pool[::stride]
    if not pool:
        raise ConfigError("act-heads: the candidate pool is empty; give layers and heads")
    return layers, heads, pool


# ---- command line: `interventions calibrate act-heads` ---------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `interventions calibrate act-heads`."""
    add_search_arguments(parser, "act", "per-head JSONL", "ACT's 2..L-2")
    parser.add_argument("--stride", type=int, default=1, help="every stride-th candidate of the layer-major pool")
    parser.add_argument("--beta", type=float, default=0.4)
    parser.add_argument("--threshold", type=float, default=0.1)


def check_options(stride: int, beta: float, threshold: float) -> None:
    """The search options that need no model: a positive stride and ACT's own checks of beta and threshold."""
    if stride < 1:
        raise ConfigError("act-heads: stride must be a positive integer")
    method_params("act", {"beta": beta, "threshold": threshold})


def main(args: argparse.Namespace) -> int:
    """Run `search_act_heads` from parsed `add_arguments` options, write the file and print a summary."""
    check_options(args.stride, args.beta, args.threshold)
    model, tokenizer, model_id = load_for_search(args, "act-heads")
    output = Path(args.output)
    result = search_act_heads(model, tokenizer, args.task, limit=args.limit, seed=args.seed, layers=args.layers,
                              heads=args.heads, stride=args.stride, beta=args.beta, threshold=args.threshold,
                              batch_size=args.batch_size, results=args.results or output.with_suffix(".jsonl"),
                              progress=not args.no_progress, model_id=model_id)
    write_heads(result, output)
    base = result["baseline"]
    print(f"baseline accuracy {base['accuracy']:.4f}, margin {base['margin']:.4f} on {len(result['examples'])} "
          f"{args.task} examples; {len(result['heads'])} of {result['pool']['size']} heads kept -> {output}")
    print(write_calibrated_config(model, "act", {"heads": result["heads"], "beta": args.beta,
                                                 "threshold": args.threshold}, output, model_id))
    best = sorted(result["results"], key=lambda r: (r["delta_accuracy"], r["delta_margin"]), reverse=True)[:5]
    print("best:", ", ".join(f"L{r['layer']}H{r['head']} Δacc {r['delta_accuracy']:+.4f} Δmargin "
                             f"{r['delta_margin']:+.4f}" for r in best))
    return 0
