"""Results files, all built from the results dict: `results.json`, `results.md` (a table) and `results.png`
(a bar chart drawn with Pillow, no plotting dependency)."""

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
    """Grouped bars: one group per headline metric, one bar per method."""
    from PIL import Image, ImageDraw

    columns = headline(results)
    runs = results["runs"]
    values = [[flatten(r["metrics"]).get(c, 0.0) for c in columns] for r in runs]
    top = max([v for row in values for v in row] + [1e-9])
    width, height, margin = max(420, 140 + 110 * len(columns)), 380, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    palette = ["#777777", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
    bar = max(4, 90 // max(1, len(runs)))
    for ci, name in enumerate(columns):
        x0 = margin + 110 * ci
        for ri, row in enumerate(values):
            h = int((height - 2 * margin - 20) * row[ci] / top)
            x = x0 + ri * bar
            draw.rectangle([x, height - margin - h, x + bar - 2, height - margin], fill=palette[ri % len(palette)])
            draw.text((x, height - margin - h - 12), f"{row[ci]:.3g}", fill="black")
        draw.text((x0, height - margin + 4), name[-16:], fill="black")
    for ri, run in enumerate(runs):
        draw.rectangle([width - 110, 30 + 14 * ri, width - 100, 40 + 14 * ri], fill=palette[ri % len(palette)])
        draw.text((width - 95, 28 + 14 * ri), run["method"], fill="black")
    draw.text((margin, 8), f"{results['benchmark']}: {results['model']['id']}"[:60], fill="black")
    image.save(path)


def write_reports(results: dict[str, Any], out_dir: Path) -> None:
    """Write the three result files into `out_dir`."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    bar_chart(results, out_dir / "results.png")
