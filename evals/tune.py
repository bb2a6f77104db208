"""`interventions tune pope|chair|lm`: pick a method's parameters on a dev split, report them on the test split.

Every grid point (the product of the grid's value lists, or a `--budget` random subset) is evaluated on the dev
split with the eval runner (each point in its own folder, so a killed tune resumes where it stopped); the best
point by `--metric` is then run with `none` on the test split, and `OUT/tuned.json` holds the method, the chosen
parameters, every dev value and the test results with their paired statistics. `--params OUT/tuned.json` gives
the chosen parameters to `eval`.

Dev splits: the shipped shapes data has its own dev scenes (disjoint from the test scenes); for other data a dev
file (`--dev-questions`, `--dev-image-ids`) or a slice of the data (`--dev-offset`, `--dev-limit`, the test split
being the rest); for lm-eval a slice of each task's documents.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import flatten

#: the metric a tune maximises (or minimises) by default
DEFAULT_METRICS = {"pope": "average.f1", "chair": "CHAIR_i"}
LOWER_IS_BETTER = ("CHAIR_s", "CHAIR_i", "fp_rate")


def higher_is_better(metric: str) -> bool:
    """False for hallucination rates (CHAIR_s, CHAIR_i, `*.fp_rate`), True otherwise."""
    return metric.rsplit(".", 1)[-1] not in LOWER_IS_BETTER


def parse_grid(grid: str, method: str, budget: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """`'{"alpha": [0, 0.5], "layers": [[1], [2]]}'` (or a JSON file of it) → validated points, the product of
    the lists in order; with `budget`, that many points drawn without replacement (seeded), in grid order.

    Raises:
        ValueError: malformed JSON, a value that is not a non-empty list, a bad budget, an invalid point.
    """
    import interventions as iv

    if not grid.lstrip().startswith("{") and Path(grid).is_file():
        grid = Path(grid).read_text()
    try:
        spec = json.loads(grid)
    except json.JSONDecodeError as e:
        raise ValueError(f"--grid is not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(spec, dict) or not spec:
        raise ValueError('--grid must be a JSON object {"parameter": [value, ...]}')
    for name, values in spec.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"--grid: {name!r} must be a non-empty list of values, got {values!r}")
    points = [dict(zip(spec, combo)) for combo in itertools.product(*spec.values())]
    for point in points:
        iv.method_params(method, point)  # every point is valid before any model work
    if budget is not None:
        if budget < 1:
            raise ValueError(f"--budget must be >= 1, got {budget}")
        if budget < len(points):
            import numpy as np

            chosen = np.random.default_rng(seed).choice(len(points), size=budget, replace=False)
            points = [points[i] for i in sorted(chosen)]
    return points


def point_key(point: dict[str, Any]) -> str:
    """A grid point as the key of `tuned.json`'s `dev` map: its JSON with sorted keys."""
    return json.dumps(point, sort_keys=True)


Evaluate = Callable[[list[Any], Path], dict[str, Any]]


def tune(method: str, points: list[dict[str, Any]], metric: str, out: Path, dev: Evaluate, test: Evaluate,
         progress: bool = True, title: str = "") -> dict[str, Any]:
    """Evaluate each point with `dev(runs, folder)`, pick the best by `metric`, run `none` and it with
    `test(runs, folder)`; write and return `tuned.json`, and write `dev_curve.png`.

    Ties go to the earlier point of the grid.

    Raises:
        ValueError: `metric` is not a metric of the benchmark.
    """
    from tqdm import tqdm

    from .plots import dev_curve
    from .runner import MethodRun

    higher = higher_is_better(metric)
    values: list[float] = []
    bar = tqdm(points, desc=f"tune {method}", unit="point", disable=not progress)
    for i, point in enumerate(bar):
        results = dev([MethodRun(method, [(method, point)])], out / "dev" / f"point_{i:03d}")
        values.append(_metric(results["runs"][0]["metrics"], metric))
        bar.set_postfix({metric: f"{values[-1]:.4g}"})
    bar.close()
    reference = _metric(dev([MethodRun("none")], out / "dev" / "none")["runs"][0]["metrics"], metric)
    best = max(range(len(points)), key=lambda i: (values[i] if higher else -values[i], -i))
    test_results = test([MethodRun("none"), MethodRun(method, [(method, points[best])])], out / "test")
    tuned = {"method": method, "params": points[best], "metric": metric, "higher_is_better": higher,
             "dev": {point_key(p): v for p, v in zip(points, values)}, "dev_none": reference,
             "test": test_results}
    (out / "tuned.json").write_text(json.dumps(tuned, indent=2, sort_keys=True) + "\n")
    dev_curve([{"params": p, "value": v, "higher_is_better": higher} for p, v in zip(points, values)], metric,
              out / "dev_curve.png", title=title or f"tune {method}", reference=reference,
              chosen=points[best])
    return tuned


def _metric(metrics: dict[str, Any], name: str) -> float:
    flat = flatten(metrics)
    if name not in flat:
        raise ValueError(f"--metric {name!r} is not a metric of this benchmark; choose one of "
                         f"{', '.join(sorted(flat))}")
    return flat[name]


@dataclass
class Subset:
    """A part of a runner benchmark (the dev or test slice of one data set), by sample id."""

    inner: Any
    ids: tuple[str, ...]
    part: str

    def __post_init__(self) -> None:
        self.name, self.version, self.max_new_tokens = self.inner.name, self.inner.version, self.inner.max_new_tokens
        self.images = self.inner.images
        wanted = set(self.ids)
        self._samples = [s for s in self.inner.samples() if s.id in wanted]
        if not self._samples:
            raise ValueError(f"the {self.part} split is empty; check --dev-offset / --dev-limit")

    def samples(self) -> list[Any]:
        return self._samples

    def score(self, samples: list[Any], texts: dict[str, str]) -> dict[str, Any]:
        return self.inner.score(samples, texts)

    def record(self) -> dict[str, Any]:
        return {**self.inner.record(), "part": self.part, "part_samples": len(self._samples)}


def add_tune_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `tune pope`, `tune chair` and `tune lm` (sets `args.run`)."""
    from .cli import add_data_arguments

    tune_parser = subparsers.add_parser("tune", help="choose a method's parameters on a dev split, report them "
                                                     "on the test split")
    benchmarks = tune_parser.add_subparsers(dest="benchmark", required=True)
    pope = benchmarks.add_parser("pope", help="tune on POPE (default metric average.f1)")
    chair = benchmarks.add_parser("chair", help="tune on CHAIR (default metric CHAIR_i, lower is better)")
    lm = benchmarks.add_parser("lm", help="tune on lm-eval tasks (default metric <first task>.acc)")
    add_data_arguments(pope, chair, lm)
    pope.add_argument("--dev-questions", help="POPE question file or folder of the dev split (default for the "
                                              "shapes data: its dev scenes)")
    chair.add_argument("--dev-image-ids", help="image-id file of the dev split (same images folder and ground "
                                               "truth; default for the shapes data: its dev scenes)")
    for parser in (pope, chair, lm):
        parser.add_argument("--method", required=True, help="the method to tune (one name)")
        parser.add_argument("--grid", required=True, help='JSON {"parameter": [values]} or a JSON file; several '
                                                          "parameters: their product")
        parser.add_argument("--budget", type=int, help="evaluate N random points of the grid (seeded by --seed)")
        parser.add_argument("--metric", help="metric to optimise (lower is better for CHAIR_s, CHAIR_i, *.fp_rate)")
        parser.add_argument("--dev-limit", type=int, help="dev samples: the first N of the dev split, or, for data "
                                                          "without one, N samples taken from the data (the test "
                                                          "split is the rest)")
        parser.add_argument("--dev-offset", type=int, default=0, help="where the dev slice starts (default 0)")
        parser.add_argument("--out", required=True, help="output folder: dev/, test/, tuned.json, dev_curve.png")
        parser.set_defaults(run=run_tune)
    lm.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_tune(args: argparse.Namespace) -> int:
    """Validate, load, tune, print the chosen parameters and the test table."""
    import os

    from .cli import _writable_dir

    points = parse_grid(args.grid, args.method, args.budget, args.seed)
    for name in ("limit", "dev_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.dev_offset < 0:
        raise ValueError(f"--dev-offset must be >= 0, got {args.dev_offset}")
    out = _writable_dir(args.out)
    progress = not (args.no_progress or os.environ.get("INTERVENTIONS_NO_PROGRESS") == "1")
    if args.benchmark == "lm":
        metric, dev, test = _lm_splits(args, out)
    else:
        metric, dev, test = _generation_splits(args)
    tuned = tune(args.method, points, metric, out, dev, test, progress,
                 title=f"tune {args.method} on {args.benchmark} dev, {args.model}")
    chosen = point_key(tuned["params"])
    print(f"{args.method}: best {chosen} (dev {metric} {tuned['dev'][chosen]:.4g}, none {tuned['dev_none']:.4g}); "
          "test:")
    print((out / "test" / "results.md").read_text(), end="")
    return 0


def _generation_splits(args: argparse.Namespace) -> tuple[str, Evaluate, Evaluate]:
    from .benchmarks import generation, shapes
    from .cli import _DATA_ARGS, SHAPES_BATCH_SIZE, _benchmark, _load, shapes_organism
    from .runner import run_generation

    test_bench = _benchmark(args)
    builtin = not any(getattr(args, a) is not None for a in _DATA_ARGS[args.benchmark])
    dev_file = getattr(args, "dev_questions", None) or getattr(args, "dev_image_ids", None)
    if builtin and dev_file is None:
        organism = shapes_organism(args)
        dev_bench = shapes.shapes_pope(parser=args.parser, dev=True, organism=organism) \
            if args.benchmark == "pope" else shapes.shapes_chair(dev=True, organism=organism)
    elif dev_file is not None:
        dev_bench = generation.pope_benchmark(Path(dev_file), test_bench.images, args.parser, args.prompt) \
            if args.benchmark == "pope" else generation.chair_benchmark(
                test_bench.images, Path(dev_file), args.prompt, objects=args.objects, annotations=args.annotations)
    else:
        if args.dev_limit is None:
            raise ValueError("this data has no dev split: give --dev-questions / --dev-image-ids, or --dev-limit N "
                             "(and --dev-offset) to take the dev samples from it")
        ids = [s.id for s in test_bench.samples()]
        dev_ids = ids[args.dev_offset:args.dev_offset + args.dev_limit]
        dev_bench = Subset(test_bench, tuple(dev_ids), "dev")
        test_bench = Subset(test_bench, tuple(i for i in ids if i not in set(dev_ids)), "test")
    if not isinstance(dev_bench, Subset) and (args.dev_offset or args.dev_limit is not None):
        ids = [s.id for s in dev_bench.samples()]
        dev_bench = Subset(dev_bench, tuple(ids[args.dev_offset:args.dev_offset + (args.dev_limit or len(ids))]),
                           "dev")
    batch = args.batch_size or (SHAPES_BATCH_SIZE if shapes.is_shipped(test_bench.images) else 1)
    from .preflight import check_images, select_samples

    for bench, limit in ((dev_bench, None), (test_bench, args.limit)):  # every image opened once, before loading
        check_images(select_samples(bench.samples(), limit), bench.images)
    loaded = _load(args)
    if not loaded.has_images:
        raise ValueError(f"tune {args.benchmark} needs a vision-language model; {args.model} is text-only")

    def dev(runs, folder):
        return run_generation(loaded, dev_bench, runs, folder, batch, None, args.max_new_tokens, args.seed, False)

    def test(runs, folder):
        return run_generation(loaded, test_bench, runs, folder, batch, args.limit, args.max_new_tokens, args.seed,
                              False)

    return args.metric or DEFAULT_METRICS[args.benchmark], dev, test


def _lm_splits(args: argparse.Namespace, out: Path) -> tuple[str, Evaluate, Evaluate]:
    from .benchmarks.lm import count_docs
    from .cli import DEFAULT_LM_TASKS, _load
    from .runner import LmOptions, run_lm

    if args.tasks is None and args.model != "builtin:smollm2":
        raise ValueError("tune lm needs --tasks (only builtin:smollm2 has default tasks)")
    tasks = [t.strip() for t in (args.tasks or ",".join(DEFAULT_LM_TASKS)).split(",") if t.strip()]
    if args.dev_limit is None:
        raise ValueError("tune lm takes its dev split from each task's documents: give --dev-limit N")
    sizes = count_docs(tasks, out, args.include_path)
    dev_docs, test_docs = {}, {}
    for task, n in sizes.items():
        dev_docs[task] = list(range(args.dev_offset, min(n, args.dev_offset + args.dev_limit)))
        rest = [d for d in range(n) if d not in set(dev_docs[task])]
        test_docs[task] = rest[:args.limit] if args.limit is not None else rest
        if not dev_docs[task] or not test_docs[task]:
            raise ValueError(f"{task} has {n} documents: the dev slice or the test rest is empty")
    loaded = _load(args)

    def dev(runs, folder):
        return run_lm(loaded, tasks, runs, folder, LmOptions(include_path=args.include_path, seed=args.seed,
                                                            docs=dev_docs))

    def test(runs, folder):
        return run_lm(loaded, tasks, runs, folder, LmOptions(include_path=args.include_path, seed=args.seed,
                                                            docs=test_docs))

    return args.metric or f"{tasks[0]}.acc", dev, test
