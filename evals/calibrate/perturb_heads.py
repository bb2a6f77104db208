"""Greedy head search for head-level perturbation guidance (HeadHunter, shared/specs/head_perturbation.md §2.3 and
§3.3): rounds of top-k head selection by a task objective on a dev set; writes the head list that
`iv.wrap(model, "pag", heads="heads.json")` reads.

Each round scores every remaining candidate head c by guiding the model with the perturbed set S ∪ {c}
(`pag` with `u`, `w`, `target`, `cutoff`), ranks the candidates by (accuracy, margin) on the dev set,
lexicographically, best first (the pool's layer-major order breaks ties), and adds the best `top_k` to S; then S
itself is scored once (logged as the round's set score). The dev set and its scoring are act-heads'
(calibrate/devset.py): lm-eval's stock zero-shot prompt of a shipped multiple-choice task, accuracy and mean gold
margin of summed continuation log-likelihoods, here under the guided scores. The plausibility cutoff defaults to
0 (off) during the search: with a cutoff, a gold token outside the plausible set scores −inf.

Cost: one evaluation is `ceil(examples·choices / batch_size)` guided forwards, each running the model twice (the
original and the perturbed stream; the original stream is recomputed for every candidate, not cached). Round r
scores `|pool| − (r−1)·top_k` candidates plus its set: about `rounds·|pool|` evaluations in all (SmolLM2-135M, all
270 heads, 5 rounds: ≈ 1,340 evaluations). Every evaluation is appended to a JSONL file as soon as it finishes; a
restart of the same search reads it back and only computes what is missing.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from interventions.errors import ConfigError
from interventions.methods.pag import PagConfig

from .devset import (
    SearchLog,
    add_search_arguments,
    dev_set,
    head_pool,
    load_for_search,
    provenance,
    run_key,
    write_calibrated_config,
    write_result,
)

logger = logging.getLogger(__name__)
Head = tuple[int, int]


def search_perturb_heads(model: torch.nn.Module, tokenizer: Any, task: str, *, limit: int | None = None,
                         seed: int = 0, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                         rounds: int = 5, top_k: int = 3, u: float = 1.0, w: float = 1.0, target: str = "identity",
                         cutoff: float = 0.0, batch_size: int = 16, results: str | Path | None = None,
                         progress: bool = True, model_id: str | None = None) -> dict[str, Any]:
    """Greedy top-k head search for `pag` (module docstring).

    Args:
        model (`transformers.PreTrainedModel`): an unwrapped model of a supported family.
        tokenizer: its tokenizer.
        task (`str`): a shipped multiple-choice task, `"copa"`, `"boolq"` or `"arc_easy"`.
        limit (`int`, *optional*): this many examples, drawn with `seed`; default all of them.
        seed (`int`, *optional*, defaults to `0`): picks the examples (the forwards are deterministic).
        layers (`Sequence[int]`, *optional*): candidate layers; default all.
        heads (`Sequence[int]`, *optional*): candidate query heads in each layer; default all.
        rounds (`int`, *optional*, defaults to `5`): search rounds R.
        top_k (`int`, *optional*, defaults to `3`): heads added per round k.
        u, w (`float`, *optional*, defaults to `1.0`, `1.0`): perturbation and guidance weight during the search
            (the paper searches with u = 1, then tunes u and w).
        target (`str`, *optional*, defaults to `"identity"`): `pag`'s attention target.
        cutoff (`float`, *optional*, defaults to `0.0`): `pag`'s plausibility cutoff during the search.
        batch_size (`int`, *optional*, defaults to `16`): (context, choice) rows per forward.
        results (`str` or `Path`, *optional*): JSONL log of the evaluated head sets; an existing file of the same
            search is resumed, one of another search is an error.
        progress (`bool`, *optional*, defaults to `True`): a tqdm bar on stderr.
        model_id (`str`, *optional*): recorded as the model; default `model.config._name_or_path`.

    Returns:
        `dict`: `heads` (the selected `[layer, head]` pairs, in selection order) plus provenance: model, task, data
        file and md5, examples, search settings, the baseline, every round's ranked candidates, chosen heads and set
        score, cost, run key, date, versions.

    Raises:
        ConfigError: bad arguments, or a results file written by a different search.

    Example:
        >>> result = search_perturb_heads(model, tokenizer, "copa", limit=50, rounds=2, top_k=3)
        >>> write_heads(result, "pag_heads.json")
        >>> iv.wrap(model, "pag", heads="pag_heads.json", u=0.5)
    """
    check_options(rounds, top_k, u, w, target, cutoff)
    dev = dev_set(model, tokenizer, task, limit=limit, seed=seed, batch_size=batch_size, model_id=model_id,
                  tool="perturb-heads")
    layers, heads, pool = head_pool(model, layers, heads, range, "perturb-heads")
    setup = {**dev.setup, "search": {"u": u, "w": w, "target": target, "cutoff": cutoff, "rounds": rounds,
                                     "top_k": top_k, "layers": layers, "heads": heads}}
    key = run_key(setup)
    forwards = math.ceil(len(dev.rows) / batch_size)
    total = sum(max(0, len(pool) - r * top_k) + 1 for r in range(rounds)) + 1
    logger.info("perturb-heads: %d candidates, %d rounds of top %d: up to %d evaluations × %d guided forwards; "
                "run %s", len(pool), rounds, top_k, total, forwards, key)

    from tqdm import tqdm

    import interventions as iv

    log = SearchLog(Path(results) if results is not None else None, key, setup, "perturb-heads")
    scores = {tuple(tuple(p) for p in r["heads"]): {"accuracy": r["accuracy"], "margin": r["margin"]}
              for r in log.records}
    bar = tqdm(total=total, desc="perturb-heads", unit="set", file=sys.stderr, disable=not progress)

    def evaluate(subset: Sequence[Head]) -> dict[str, float]:
        heads_key = tuple(sorted(subset))
        if heads_key not in scores:
            if heads_key:
                with iv.apply(model, "pag", heads=[list(p) for p in heads_key], u=u, w=w, target=target,
                              cutoff=cutoff):
                    scores[heads_key] = dev.score(model)
            else:
                scores[heads_key] = dev.score(model)
            log.write({"kind": "set", "heads": [list(p) for p in heads_key], **scores[heads_key]})
        bar.update()
        return scores[heads_key]

    selected: list[Head] = []
    history = []
    with bar:
        baseline = evaluate(())
        for round_index in range(1, rounds + 1):
            remaining = [p for p in pool if p not in selected]
            if not remaining:
                break
            scored = [(p, evaluate([*selected, p])) for p in remaining]
            ranked = sorted(scored, key=lambda item: _rank(item[1]), reverse=True)  # stable: pool order on ties
            picked = [p for p, _ in ranked[:top_k]]
            selected.extend(picked)
            history.append({"round": round_index, "chosen": [list(p) for p in picked],
                            "set": evaluate(selected),
                            "candidates": [{"layer": p[0], "head": p[1], **s} for p, s in ranked]})
    return {
        "method": "pag",
        "heads": [list(p) for p in selected],
        **setup,
        "objective": "(accuracy, margin) of summed continuation log-likelihoods under the guided scores, "
                     "lexicographic, higher is better",
        "baseline": baseline,
        "rounds": history,
        "cost": {"rows": len(dev.rows), "forwards_per_evaluation": forwards, "streams_per_forward": 2,
                 "evaluations": len(scores)},
        "run_key": key,
        **provenance(),
    }


def write_heads(result: dict[str, Any], path: str | Path) -> Path:
    """Write a `search_perturb_heads` result as JSON (sorted keys) that `iv.wrap(model, "pag", heads=path)` reads."""
    return write_result(result, path)


def _rank(score: dict[str, float]) -> tuple[float, float]:
    margin = score["margin"]
    return score["accuracy"], -math.inf if math.isnan(margin) else margin  # −inf − −inf margins sort last


# ---- command line: `interventions calibrate perturb-heads` -----------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `interventions calibrate perturb-heads`."""
    add_search_arguments(parser, "pag", "JSONL of evaluated head sets", "all")
    parser.add_argument("--rounds", type=int, default=5, help="search rounds (spec: 5)")
    parser.add_argument("--top-k", type=int, default=3, help="heads added per round (spec: 3)")
    parser.add_argument("--u", type=float, default=1.0, help="perturbation strength during the search (spec: 1)")
    parser.add_argument("--w", type=float, default=1.0, help="guidance weight during the search")
    parser.add_argument("--target", default="identity", help="attention target: identity or uniform")
    parser.add_argument("--cutoff", type=float, default=0.0, help="plausibility cutoff during the search (0 = off)")


def check_options(rounds: int, top_k: int, u: float, w: float, target: str, cutoff: float) -> None:
    """The search options that need no model: pag's own checks, positive u, w, rounds and top_k."""
    PagConfig(heads=[(0, 0)], u=u, w=w, target=target, cutoff=cutoff)  # the same checks as the method
    if u == 0 or w == 0:
        raise ConfigError("perturb-heads: u and w must be positive (u = 0 or w = 0 switches guidance off)")
    if rounds < 1 or top_k < 1:
        raise ConfigError("perturb-heads: rounds and top_k must be positive integers")


def main(args: argparse.Namespace) -> int:
    """Run `search_perturb_heads` from parsed `add_arguments` options, write the file and print a summary."""
    check_options(args.rounds, args.top_k, args.u, args.w, args.target, args.cutoff)
    model, tokenizer, _ = load_for_search(args, "perturb-heads")
    output = Path(args.output)
    result = search_perturb_heads(model, tokenizer, args.task, limit=args.limit, seed=args.seed,
                                  layers=args.layers, heads=args.heads, rounds=args.rounds, top_k=args.top_k,
                                  u=args.u, w=args.w, target=args.target, cutoff=args.cutoff,
                                  batch_size=args.batch_size, results=args.results or output.with_suffix(".jsonl"),
                                  progress=not args.no_progress, model_id=args.model)
    write_heads(result, output)
    base = result["baseline"]
    print(f"baseline accuracy {base['accuracy']:.4f}, margin {base['margin']:.4f} on {len(result['examples'])} "
          f"{args.task} examples")
    for entry in result["rounds"]:
        heads = ", ".join(f"L{layer}H{head}" for layer, head in entry["chosen"])
        print(f"round {entry['round']}: + {heads} -> accuracy {entry['set']['accuracy']:.4f}, "
              f"margin {entry['set']['margin']:.4f}")
    print(f"{len(result['heads'])} heads -> {output}")
    print(write_calibrated_config(model, "pag", {"heads": result["heads"], "u": args.u, "w": args.w,
                                                 "target": args.target, "cutoff": args.cutoff}, output, args.model))
    return 0
