"""Paired statistics of a method against `none` on the same samples: a paired bootstrap of any metric that is a
function of per-sample counts summed over the samples, and an exact McNemar test of per-sample correctness.

A metric is given as `value(sums) -> metric`, where `sums` holds per-sample count columns summed over a set of
samples (last axis), so ratio metrics (F1, CHAIR_i) are resampled as ratios of sums, exactly as the benchmark
computes them, and means (accuracy) as a sum over a count column.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: resamples of the paired bootstrap (the issue asks for at least 1,000)
N_RESAMPLES = 2000
SEED = 0
_CHUNK = 250  # resamples per chunk (bounds memory on 9,000-question POPE); the index stream is the same


def bootstrap_sums(counts: list[np.ndarray], n_resamples: int = N_RESAMPLES, seed: int = SEED) -> list[np.ndarray]:
    """Column sums of every resample, for several count tables over the same `n` samples (paired: resample b
    draws the same sample indices for all of them).

    Resample b draws the indices `rng.integers(0, n, n)`: row b of `rng.integers(0, n, (B, n))` with
    `rng = np.random.default_rng(seed)` (drawn in chunks of the same stream, to bound memory).

    Returns:
        one `(n_resamples, k)` array per table.

    Raises:
        ValueError: tables with different row counts, or no rows.
    """
    tables = [np.asarray(c, dtype=np.float64) for c in counts]
    n = tables[0].shape[0]
    if n == 0 or any(t.ndim != 2 or t.shape[0] != n for t in tables):
        raise ValueError(f"paired samples need (n, k) tables with the same n >= 1, got "
                         f"{[t.shape for t in tables]}")
    rng = np.random.default_rng(seed)
    sums: list[list[np.ndarray]] = [[] for _ in tables]
    for start in range(0, n_resamples, _CHUNK):
        rows = min(_CHUNK, n_resamples - start)
        index = rng.integers(0, n, (rows, n))
        weights = np.bincount((index + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n)
        weights = weights.reshape(rows, n).astype(np.float64)  # how often each sample is drawn in each resample
        for out, table in zip(sums, tables):
            out.append(weights @ table)
    return [np.concatenate(s) for s in sums]


def percentile_interval(delta: float, deltas: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """`delta` with the percentile interval of its bootstrap distribution `deltas` and the two-sided bootstrap
    p-value min(1, 2·(min(#{Δ* ≤ 0}, #{Δ* ≥ 0}) + 1) / (B + 1)) (never 0 from a finite resample)."""
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(deltas, [alpha, 1 - alpha])
    p = min(1.0, 2 * (min(int(np.sum(deltas <= 0)), int(np.sum(deltas >= 0))) + 1) / (len(deltas) + 1))
    return {"delta": float(delta), "ci95": [float(lo), float(hi)], "p_bootstrap": p}


def paired_bootstrap(base: np.ndarray, other: np.ndarray, value: Callable[[np.ndarray], np.ndarray],
                     n_resamples: int = N_RESAMPLES, seed: int = SEED,
                     confidence: float = 0.95) -> dict[str, Any]:
    """Δ = value(other) − value(base) with a percentile CI from resampling the paired samples.

    For a mean this is `scipy.stats.bootstrap(paired=True, method="percentile")` with the same generator.

    Args:
        base, other (`np.ndarray`): per-sample count columns `(n, k)`, row i of both being the same sample.
        value (`Callable`): summed counts `(..., k)` → metric `(...)`.
        n_resamples (`int`): bootstrap resamples.
        seed (`int`): seed of the index generator.
        confidence (`float`): level of the two-sided interval.

    Returns:
        `dict`: `delta`, `ci95` ([lo, hi]) and `p_bootstrap` (`percentile_interval`).

    Raises:
        ValueError: shapes that differ or no samples.
    """
    base, other = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if base.shape != other.shape:
        raise ValueError(f"paired samples need equal (n, k) shapes, got {base.shape} and {other.shape}")
    base_sums, other_sums = bootstrap_sums([base, other], n_resamples, seed)
    delta = float(value(other.sum(axis=0)) - value(base.sum(axis=0)))
    return percentile_interval(delta, value(other_sums) - value(base_sums), confidence)


def mcnemar_exact(base_correct: np.ndarray, other_correct: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: a binomial test (p = 1/2) on the discordant pairs; 1.0 without any.

    Raises:
        ValueError: vectors of different lengths.
    """
    from scipy.stats import binomtest

    a, b = np.asarray(base_correct, dtype=bool), np.asarray(other_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired correctness vectors differ in length: {a.shape} vs {b.shape}")
    only_base, only_other = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_base + only_other == 0:
        return 1.0
    return float(binomtest(only_other, only_base + only_other, 0.5).pvalue)


def ratio(numerator: np.ndarray, denominator: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """`scale · numerator / denominator`, 0.0 where the denominator is 0 (the benchmarks' convention)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(scale * numerator, denominator, out=out, where=denominator != 0)
    return out
