"""Figures with matplotlib (Agg backend, no display): the eval's bar chart, tune's dev curve and an organism's
training curve."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

PANELS_PER_ROW = 4


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colours(n: int) -> list[Any]:
    """`n` distinct colours (tab10, then tab20 beyond ten)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def grouped_bars(metrics: list[str], methods: list[str], values: list[list[float]],
                 errors: list[list[tuple[float, float] | None]], reference: list[float] | None, path: Path,
                 title: str, note: str | None = None) -> None:
    """One panel per metric (own y scale), one bar per method in a fixed colour, asymmetric error bars where
    `errors[method][metric]` is given, and `reference` (the `none` values) as a dashed line."""
    plt = _pyplot()
    cols = min(PANELS_PER_ROW, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    width = max(3.2, 0.42 * len(methods) + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.4 * rows + 0.8), squeeze=False)
    palette = colours(len(methods))
    for k, metric in enumerate(metrics):
        ax = axes[k // cols][k % cols]
        heights = [row[k] for row in values]
        lower = [e[k][0] if e[k] else 0.0 for e in errors]
        upper = [e[k][1] if e[k] else 0.0 for e in errors]
        ax.bar(range(len(methods)), heights, color=palette, yerr=[lower, upper], capsize=3,
               error_kw={"elinewidth": 1, "ecolor": "black"})
        if reference is not None:
            ax.axhline(reference[k], color="grey", linestyle="--", linewidth=1)
        ax.set_title(metric, fontsize=10)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for k in range(len(metrics), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def dev_curve(points: list[dict[str, Any]], metric: str, path: Path, title: str, reference: float | None = None,
              chosen: dict[str, Any] | None = None) -> None:
    """Tune's dev curve: the metric against each swept parameter (one panel per parameter; several points at
    one value, from the other parameters, are all drawn, the best of them joined by a line); `reference` (the
    unmodified model on dev) as a dashed line and the `chosen` point ringed in red."""
    plt = _pyplot()
    swept = [name for name in points[0]["params"] if len({_key(p["params"][name]) for p in points}) > 1] or \
        list(points[0]["params"])[:1]
    fig, axes = plt.subplots(1, max(1, len(swept)), figsize=(4.2 * max(1, len(swept)), 3.4), squeeze=False)
    for ax, name in zip(axes[0], swept):
        xs = [p["params"][name] for p in points]
        ys = [p["value"] for p in points]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        ticks = sorted({_key(x) for x in xs}) if numeric else list(dict.fromkeys(_key(x) for x in xs))
        pos = [(_key(x) if numeric else ticks.index(_key(x))) for x in xs]
        ax.scatter(pos, ys, color="tab:blue", zorder=3)
        best = {}
        for x, y in zip(pos, ys):
            best[x] = y if x not in best else max(best[x], y) if points[0]["higher_is_better"] else min(best[x], y)
        ax.plot(sorted(best), [best[x] for x in sorted(best)], color="tab:blue", linewidth=1)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="none")
            ax.legend(fontsize=8, loc="best")
        if chosen is not None:
            at = [(x, y) for x, y, p in zip(pos, ys, points) if p["params"] == chosen]
            ax.scatter([a[0] for a in at], [a[1] for a in at], s=120, facecolors="none", edgecolors="tab:red",
                       linewidths=1.5, zorder=4)
        if not numeric:
            ax.set_xticks(range(len(ticks)))
            ax.set_xticklabels([str(t) for t in ticks], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel(f"dev {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _key(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def training_curve(log: list[dict[str, Any]], path: Path, title: str) -> None:
    """The loss of each training stage against its step (log scale) and, where logged, the held-out accuracy on a
    second axis: one row of panels, one per stage, from a `training_log.jsonl`'s entries."""
    plt = _pyplot()
    stages = list(dict.fromkeys(e.get("stage", "train") for e in log))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [e for e in log if e.get("stage", "train") == stage]
        steps = [e["step"] for e in rows]
        ax.plot(steps, [e["loss"] for e in rows], "o-", color="tab:blue", label="loss (mean since last entry)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss", color="tab:blue")
        ax.set_title(stage)
        accuracy = [(e["step"], v) for e in rows for k, v in e.items() if k.startswith("heldout_")]
        if accuracy:
            key = next(k for k in rows[0] if k.startswith("heldout_"))
            twin = ax.twinx()
            twin.plot(*zip(*accuracy), "s--", color="tab:orange", label=key)
            twin.set_ylim(0, 1)
            twin.set_ylabel(key.replace("_", " "), color="tab:orange")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
