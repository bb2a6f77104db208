"""Results files, all built from the results dict: `results.json`, `results.md` (the metrics and, with a `none`
run, each method's Δ with its paired CI) and `results.png` (matplotlib bars with the CIs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_COLUMNS = 8


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{"average": {"f1": 0.8}}` → `{"average.f1": 0.8}` (numbers only)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def headline(results: dict[str, Any]) -> list[str]:
    """The metric columns of the table: averages first when present, at most `MAX_COLUMNS`. POPE with several
    splits shows the average accuracy and F1, then each split's accuracy and false-positive rate."""
    metrics = results["runs"][0]["metrics"]
    names = list(flatten(metrics))
    averaged = [n for n in names if n.startswith("average.")]
    splits = [k for k, v in metrics.items() if isinstance(v, dict) and k != "average"]
    if averaged and len(splits) > 1 and all(f"{s}.fp_rate" in names for s in splits):
        per_split = [f"{s}.accuracy" for s in splits] + [f"{s}.fp_rate" for s in splits]
        return (["average.accuracy", "average.f1"] + per_split)[:MAX_COLUMNS]
    return (averaged or names)[:MAX_COLUMNS]


def markdown(results: dict[str, Any]) -> str:
    columns = headline(results)
    lines = [f"# {results['benchmark']} on {results['model']['id']}", "",
             f"{results['samples']['evaluated']} samples, decoding {json.dumps(results.get('decoding', {}))}", "",
             "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for run in results["runs"]:
        flat = flatten(run["metrics"])
        lines.append(f"| {run['method']} | " + " | ".join(f"{flat.get(c, float('nan')):.4g}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, Any], path: Path) -> None:
    """One panel per headline metric, one bar per method (distinct colours); a method's error bar is the 95 %
    paired-bootstrap CI of its Δ vs `none`, drawn around its value, and `none`'s value is a dashed line."""
    from .plots import grouped_bars

    columns = plotted(results)
    runs = results["runs"]
    values = [[flatten(r["metrics"]).get(c, float("nan")) for c in columns] for r in runs]
    errors = [[_error(r, c, v) for c, v in zip(columns, row)] for r, row in zip(runs, values)]
    reference = next((row for r, row in zip(runs, values) if r["method"] == "none"), None)
    grouped_bars(columns, [r["method"] for r in runs], values, errors, reference, path,
                 title=f"{results['benchmark']} on {results['model']['id']}, {results['samples']['evaluated']} samples",
                 note="error bars: 95% paired bootstrap CI of Δ vs none" if any(
                     "paired_vs_none" in r for r in runs) else None)


def plotted(results: dict[str, Any]) -> list[str]:
    """The headline metrics, restricted to those with paired statistics when there are any (CHAIR's counts are
    headline columns of the table but not worth a panel)."""
    columns = headline(results)
    paired = next((r["paired_vs_none"] for r in results["runs"] if "paired_vs_none" in r), None)
    return ([c for c in columns if c in paired] or columns) if paired else columns


def _error(run: dict[str, Any], column: str, value: float) -> tuple[float, float] | None:
    stat = run.get("paired_vs_none", {}).get(column)
    if stat is None:
        return None
    lo, hi = stat["ci95"]
    return max(0.0, stat["delta"] - lo), max(0.0, hi - stat["delta"])


def paired_markdown(results: dict[str, Any]) -> str:
    """The Δ-vs-`none` table: Δ [95 % CI] and p per headline metric; "n.s." where the CI spans 0."""
    columns = plotted(results)
    rows = [r for r in results["runs"] if "paired_vs_none" in r]
    if not rows:
        return ""
    first = rows[0]["paired_vs_none"][columns[0]]
    tests = sorted({s["test"] for r in rows for s in r["paired_vs_none"].values()})
    p_from = "exact McNemar for accuracy-type metrics, else bootstrap" if "mcnemar-exact" in tests else "bootstrap"
    lines = ["", f"Δ vs none on the same {first['n']} samples: paired bootstrap 95 % CI ({first['resamples']} "
             f"resamples), p: {p_from}; n.s. = CI spans 0", "",
             "| method | " + " | ".join(f"Δ {c}" for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for run in rows:
        cells = []
        for c in columns:
            s = run["paired_vs_none"].get(c)
            cells.append("" if s is None else f"{s['delta']:+.3g} [{s['ci95'][0]:+.3g}, {s['ci95'][1]:+.3g}] "
                         f"p={s['p']:.2g}" + ("" if s["significant"] else " n.s."))
        lines.append(f"| {run['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(results: dict[str, Any], out_dir: Path) -> None:
    """Write the three result files into `out_dir`."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out_dir / "results.md").write_text(markdown(results) + paired_markdown(results))
    bar_chart(results, out_dir / "results.png")
