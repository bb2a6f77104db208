"""Per-sample count tables of POPE, CHAIR and lm-eval runs, and `paired_vs_none`: each run's Δ against `none`
with a paired bootstrap CI (`evals.stats`) and a p-value (exact McNemar for accuracy-type metrics, else the
bootstrap's).

A table has one row per sample (a POPE question, a CHAIR image, an lm-eval document) and count columns whose sums
give the benchmark's metrics exactly (a test checks them against the scorers), so the bootstrap resamples samples
and recomputes each metric as the benchmark does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stats import N_RESAMPLES, SEED, bootstrap_sums, mcnemar_exact, percentile_interval, ratio

_POPE_COLUMNS = ("tp", "fp", "tn", "fn", "yes", "n")


@dataclass(frozen=True)
class PairedMetric:
    """A metric as a function of summed count columns; `correct` (per-sample rows → 1/0, NaN where the sample
    does not count) marks an accuracy-type metric, tested with McNemar."""

    name: str
    value: Callable[[np.ndarray], np.ndarray]
    correct: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass(frozen=True)
class SampleTable:
    """Count columns `(n, k)` of one run, rows in the order of `ids`, with the metrics they define."""

    ids: tuple[str, ...]
    counts: np.ndarray
    metrics: tuple[PairedMetric, ...]


def pope_table(benchmark: Any, texts: Mapping[str, str]) -> SampleTable:
    """POPE rows (questions answered in `texts`) with per-split columns tp, fp, tn, fn, yes, n; metrics
    `<split>.{accuracy,precision,recall,f1,yes_ratio,fp_rate}` and `average.*` (mean over splits) as
    `pope_metrics` / `mean_metrics` compute them."""
    from .benchmarks.pope import METRICS
    from .benchmarks.pope_parsers import PARSERS

    parser = PARSERS.get(benchmark.parser)
    rows = [s for s in benchmark.samples() if s["id"] in texts]
    splits = tuple(dict.fromkeys(s["split"] for s in rows))
    k = len(_POPE_COLUMNS)
    counts = np.zeros((len(rows), k * len(splits)))
    for i, s in enumerate(rows):
        p, yes = parser.parse(texts[s["id"]]), s["label"] == "yes"
        fn = yes and (p == "no" or (p is None and parser.unknown == "no"))
        values = (yes and p == "yes", not yes and p == "yes", not yes and p == "no", fn, p == "yes", 1)
        counts[i, k * splits.index(s["split"]):k * (splits.index(s["split"]) + 1)] = values
    metrics: list[PairedMetric] = []
    for j, split in enumerate(splits):
        metrics += _pope_split_metrics(split, j * k)
    by_name = {m.name: m for m in metrics}
    for m in METRICS:
        parts = [by_name[f"{s}.{m}"].value for s in splits]
        correct = _pooled_correct(splits) if m == "accuracy" else None
        metrics.append(PairedMetric(f"average.{m}", lambda x, parts=parts: sum(f(x) for f in parts) / len(parts),
                                    correct))
    return SampleTable(tuple(s["id"] for s in rows), counts, tuple(metrics))


def _pope_split_metrics(split: str, o: int) -> list[PairedMetric]:
    tp, fp, tn, fn, yes, n = (lambda x, c=c: x[..., o + c] for c in range(6))

    def precision(x):
        return ratio(tp(x), tp(x) + fp(x))

    def recall(x):
        return ratio(tp(x), tp(x) + fn(x))

    def correct(rows):
        return np.where(n(rows) == 1, tp(rows) + tn(rows), np.nan)

    return [
        PairedMetric(f"{split}.accuracy", lambda x: ratio(tp(x) + tn(x), n(x)), correct),
        PairedMetric(f"{split}.precision", precision),
        PairedMetric(f"{split}.recall", recall),
        PairedMetric(f"{split}.f1", lambda x: ratio(2 * precision(x) * recall(x), precision(x) + recall(x))),
        PairedMetric(f"{split}.yes_ratio", lambda x: ratio(yes(x), n(x))),
        PairedMetric(f"{split}.fp_rate", lambda x: ratio(fp(x), fp(x) + tn(x))),
    ]


def _pooled_correct(splits: tuple[str, ...]) -> Callable[[np.ndarray], np.ndarray]:
    k = len(_POPE_COLUMNS)

    def correct(rows):
        return sum(rows[..., j * k] + rows[..., j * k + 2] for j in range(len(splits)))

    return correct


def chair_table(metrics: Mapping[str, Any]) -> SampleTable:
    """CHAIR rows (images) from the scorer's per-caption details; columns: hallucinated caption, hallucinated
    mentions, mentions, ground-truth objects found, ground-truth objects, words; metrics CHAIR_s, CHAIR_i,
    recall, len as `chair_metrics` computes them."""
    rows = []
    for c in metrics["captions"]:
        nodes = {node for _, node in c["mscoco_generated_words"]}
        rows.append((bool(c["mscoco_hallucinated_words"]), len(c["mscoco_hallucinated_words"]),
                     len(c["mscoco_generated_words"]), len(nodes & set(c["mscoco_gt_words"])),
                     len(c["mscoco_gt_words"]), len(c["words"]), 1))
    counts = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
    col = [lambda x, c=c: x[..., c] for c in range(7)]
    table_metrics = (
        PairedMetric("CHAIR_s", lambda x: ratio(col[0](x), col[6](x), 100)),
        PairedMetric("CHAIR_i", lambda x: ratio(col[1](x), col[2](x), 100)),
        PairedMetric("recall", lambda x: ratio(col[3](x), col[4](x), 100)),
        PairedMetric("len", lambda x: ratio(col[5](x), col[6](x))),
    )
    return SampleTable(tuple(str(c["image_id"]) for c in metrics["captions"]), counts, table_metrics)


def lm_table(per_sample: Mapping[str, Mapping[str, Mapping[str, float]]]) -> SampleTable:
    """lm-eval rows (task, document) from `{task: {metric: {doc_id: value}}}`; each `<task>.<metric>` is the mean
    over the task's documents, accuracy-type (McNemar) when every value is 0 or 1."""
    columns = [(task, metric) for task in sorted(per_sample) for metric in sorted(per_sample[task])]
    docs = [(task, doc) for task in sorted(per_sample)
            for doc in sorted({d for values in per_sample[task].values() for d in values}, key=_doc_order)]
    n_col = {task: len(columns) + i for i, task in enumerate(sorted(per_sample))}
    counts = np.full((len(docs), len(columns) + len(n_col)), 0.0)
    for r, (task, doc) in enumerate(docs):
        counts[r, n_col[task]] = 1
        for c, (t, metric) in enumerate(columns):
            if t == task:
                counts[r, c] = float(per_sample[task][metric][doc])
    metrics = []
    for c, (task, metric) in enumerate(columns):
        n = n_col[task]
        binary = bool(np.all(np.isin(counts[counts[:, n] == 1, c], (0.0, 1.0))))
        correct = (lambda x, c=c, n=n: np.where(x[..., n] == 1, x[..., c], np.nan)) if binary else None
        metrics.append(PairedMetric(f"{task}.{metric}", lambda x, c=c, n=n: ratio(x[..., c], x[..., n]), correct))
    return SampleTable(tuple(f"{t}/{d}" for t, d in docs), counts, tuple(metrics))


def _doc_order(doc: str) -> tuple[int, str]:
    return (int(doc), "") if doc.isdigit() else (1 << 62, doc)


def paired_vs_none(tables: Mapping[str, SampleTable], names: list[str] | None = None,
                   n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict[str, dict[str, dict[str, Any]]]:
    """`{label: {metric: {"delta", "ci95", "p", "test"}}}` for every run label other than `none`.

    Args:
        tables: one table per run label; must hold `none`.
        names: the metrics to compare (default: every metric of the tables).

    Raises:
        ValueError: no `none` run, or runs over different samples.
    """
    if "none" not in tables:
        raise ValueError("paired statistics need a `none` run on the same samples")
    base = tables["none"]
    wanted = [m for m in base.metrics if names is None or m.name in names]
    labels = [label for label in tables if label != "none"]
    for label in labels:
        if tables[label].ids != base.ids or tables[label].counts.shape != base.counts.shape:
            raise ValueError(f"{label} and none were evaluated on different samples; cannot pair them")
    boot = dict(zip(["none", *labels], bootstrap_sums([tables[k].counts for k in ["none", *labels]],
                                                     n_resamples, seed)))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label in labels:
        table = tables[label]
        out[label] = {}
        for metric in wanted:
            delta = float(metric.value(table.counts.sum(axis=0)) - metric.value(base.counts.sum(axis=0)))
            interval = percentile_interval(delta, metric.value(boot[label]) - metric.value(boot["none"]))
            entry: dict[str, Any] = {"delta": delta, "ci95": interval["ci95"], "n": len(base.ids),
                                     "resamples": n_resamples}
            if metric.correct is not None:
                a, b = metric.correct(base.counts), metric.correct(table.counts)
                keep = ~np.isnan(a) & ~np.isnan(b)
                entry.update(p=mcnemar_exact(a[keep] == 1, b[keep] == 1), test="mcnemar-exact")
            else:
                entry.update(p=interval["p_bootstrap"], test="bootstrap")
            entry["significant"] = not entry["ci95"][0] <= 0 <= entry["ci95"][1]
            out[label][metric.name] = entry
    return out


def generation_table(benchmark: Any, texts: Mapping[str, str], metrics: Mapping[str, Any]) -> SampleTable | None:
    """The table of a runner benchmark's run (POPE or CHAIR behind an `ImageBenchmark`); None for others."""
    from .benchmarks.chair import ChairBenchmark
    from .benchmarks.pope import PopeBenchmark

    inner = benchmark
    while hasattr(inner, "inner"):  # ImageBenchmark, tune's Subset
        inner = inner.inner
    if isinstance(inner, PopeBenchmark):
        return pope_table(inner, texts)
    if isinstance(inner, ChairBenchmark):
        return chair_table(metrics)
    return None


def attach(result_runs: list[dict[str, Any]], tables: Mapping[str, SampleTable | None],
           names: list[str] | None = None) -> None:
    """Add `paired_vs_none` to every run other than `none` of `result_runs` (nothing without a `none` run and
    another to pair it with)."""
    if "none" not in tables or len(tables) < 2 or any(t is None for t in tables.values()):
        return
    paired = paired_vs_none(tables, names)  # type: ignore[arg-type]
    for run in result_runs:
        if run["method"] in paired:
            run["paired_vs_none"] = paired[run["method"]]
