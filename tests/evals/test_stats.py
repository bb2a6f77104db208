"""Paired statistics: the bootstrap CI equals scipy's (a mean) and a literal loop (POPE F1), McNemar equals
scipy's binomial test and the exact binomial sum, and the per-sample tables reproduce the benchmarks' scorers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from evals.benchmarks.pope import pope_metrics
from evals.benchmarks.pope_parsers import PARSERS
from evals.benchmarks.shapes import shapes_chair, shapes_pope
from evals.paired import chair_table, lm_table, paired_vs_none, pope_table
from evals.report import flatten
from evals.stats import mcnemar_exact, paired_bootstrap


def _pair(n=120, seed=3):
    """Labels and two prediction sets that agree on most questions."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["yes", "no"], n)
    base = np.where(rng.random(n) < 0.8, labels, np.where(labels == "yes", "no", "yes"))
    other = np.where(rng.random(n) < 0.15, np.where(base == "yes", "no", "yes"), base)
    return labels, base, other


def test_bootstrap_ci_of_accuracy_delta_equals_scipy():
    labels, base, other = _pair()
    a, b = (base == labels).astype(float), (other == labels).astype(float)
    ours = paired_bootstrap(a[:, None], b[:, None], lambda s: s[..., 0] / len(a), n_resamples=2000, seed=7)
    ref = sps.bootstrap((a, b), lambda x, y, axis: y.mean(axis) - x.mean(axis), paired=True, vectorized=True,
                        method="percentile", n_resamples=2000, rng=np.random.default_rng(7))
    assert ours["delta"] == pytest.approx(b.mean() - a.mean(), abs=1e-15)
    np.testing.assert_allclose(ours["ci95"], [ref.confidence_interval.low, ref.confidence_interval.high],
                               rtol=0, atol=1e-12)
    assert ours["ci95"][0] < ours["delta"] < ours["ci95"][1]


def test_bootstrap_ci_of_f1_delta_equals_a_literal_loop():
    labels, base, other = _pair(n=60)
    parser = PARSERS.get("official")
    counts = lambda preds: np.array([[l == "yes" and p == "yes", l == "no" and p == "yes", l == "no" and p == "no",
                                      l == "yes" and p == "no", p == "yes", 1] for l, p in zip(labels, preds)], float)

    def f1(s):
        tp, fp, fn = s[..., 0], s[..., 1], s[..., 3]
        prec, rec = np.divide(tp, tp + fp), np.divide(tp, tp + fn)
        return 2 * prec * rec / (prec + rec)

    ours = paired_bootstrap(counts(base), counts(other), f1, n_resamples=1000, seed=11)
    rng = np.random.default_rng(11)
    index = rng.integers(0, len(labels), (1000, len(labels)))
    deltas = []
    for row in index:  # literally: resample the questions, score both prediction sets with POPE's scorer
        lab = [labels[i] for i in row]
        deltas.append(pope_metrics(lab, [other[i] for i in row], parser)["f1"]
                      - pope_metrics(lab, [base[i] for i in row], parser)["f1"])
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    assert ours["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    full = pope_metrics(labels, other, parser)["f1"] - pope_metrics(labels, base, parser)["f1"]
    assert ours["delta"] == pytest.approx(full, abs=1e-12)


def test_mcnemar_equals_binomtest_and_the_exact_sum():
    labels, base, other = _pair(n=200, seed=5)
    a, b = base == labels, other == labels
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    assert only_a + only_b > 5 and only_a != only_b
    n, k = only_a + only_b, min(only_a, only_b)
    literal = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    assert mcnemar_exact(a, b) == pytest.approx(sps.binomtest(only_b, n, 0.5).pvalue, rel=1e-12)
    assert mcnemar_exact(a, b) == pytest.approx(literal, rel=1e-12)
    assert mcnemar_exact(a, a) == 1.0


def test_pope_table_reproduces_the_scorer_and_pairs_runs():
    bench = shapes_pope().inner
    samples = list(bench.samples())
    rng = np.random.default_rng(0)
    runs = {}
    for label in ("none", "x"):
        runs[label] = {s["id"]: str(rng.choice(["yes", "no", "maybe", "Yes, there is."])) for s in samples}
    for texts in runs.values():
        expected = flatten(bench.score([{"id": i, "text": t} for i, t in texts.items()]))
        table = pope_table(bench, texts)
        sums = table.counts.sum(axis=0)
        for metric in table.metrics:
            assert float(metric.value(sums)) == pytest.approx(expected[metric.name], abs=1e-12), metric.name
    paired = paired_vs_none({k: pope_table(bench, v) for k, v in runs.items()}, n_resamples=1000)["x"]
    correct = {k: np.array([PARSERS.get("official").parse(v[s["id"]]) == s["label"] for s in samples])
               for k, v in runs.items()}
    assert paired["average.accuracy"]["test"] == "mcnemar-exact"
    assert paired["average.accuracy"]["p"] == pytest.approx(mcnemar_exact(correct["none"], correct["x"]))
    assert paired["average.f1"]["test"] == "bootstrap"
    assert paired["average.f1"]["significant"] == (not paired["average.f1"]["ci95"][0] <= 0
                                                   <= paired["average.f1"]["ci95"][1])


def test_chair_table_reproduces_the_scorer():
    bench = shapes_chair().inner
    words = ["sun", "moon", "cake", "tree", "ball", "and", "a"]
    rng = np.random.default_rng(1)
    preds = [{"id": s["id"], "text": " ".join(rng.choice(words, rng.integers(0, 6)))} for s in bench.samples()]
    metrics = bench.score(preds)
    table = chair_table(metrics)
    assert table.counts.shape[0] == len(preds)
    for metric in table.metrics:
        assert float(metric.value(table.counts.sum(axis=0))) == pytest.approx(metrics[metric.name], abs=1e-9)


def test_lm_table_means_and_accuracy_type():
    per = {"copa": {"acc": {"0": 1.0, "1": 0.0, "2": 1.0}, "logprob": {"0": -1.0, "1": -2.5, "2": -0.5}}}
    table = lm_table(per)
    by_name = {m.name: m for m in table.metrics}
    sums = table.counts.sum(axis=0)
    assert float(by_name["copa.acc"].value(sums)) == pytest.approx(2 / 3)
    assert float(by_name["copa.logprob"].value(sums)) == pytest.approx(-4 / 3)
    assert by_name["copa.acc"].correct is not None and by_name["copa.logprob"].correct is None


def test_pairing_needs_none_and_the_same_samples():
    per = {"t": {"acc": {"0": 1.0, "1": 0.0}}}
    with pytest.raises(ValueError, match="none"):
        paired_vs_none({"x": lm_table(per)})
    with pytest.raises(ValueError, match="different samples"):
        paired_vs_none({"none": lm_table(per), "x": lm_table({"t": {"acc": {"0": 1.0}}})})
