"""Reasoning benchmarks through lm-evaluation-harness, on the live (possibly wrapped) model object.

The shipped offline datasets run as `<task>_local` tasks: YAML files that `include:` lm-eval's stock task (its
prompt and metrics unchanged) and point `data_files` at `evals/data/lm/`. lm-eval resolves data paths against the
working directory, so the YAMLs are rendered with absolute paths into the run's output folder.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "lm"
LOCAL_TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))


def render_local_tasks(dest: Path) -> Path:
    """Write the shipped task YAMLs with absolute paths into `dest`; return it."""
    import lm_eval

    stock = Path(lm_eval.__file__).resolve().parent / "tasks"
    dest.mkdir(parents=True, exist_ok=True)
    for template in TASKS_DIR.glob("*.yaml"):
        text = template.read_text().replace("{LM_EVAL_TASKS}", str(stock)).replace("{DATA}", str(DATA_DIR))
        (dest / template.name).write_text(text)
    return dest


def task_manager(tasks: list[str], work_dir: Path, include_path: str | None = None) -> Any:
    """lm-eval's `TaskManager` for `tasks`: the shipped local tasks (rendered into `work_dir/lm_tasks`), plus
    lm-eval's own and `include_path`'s unless every task is a shipped one (indexing lm-eval's thousands of task
    files takes 5-25 s).

    Raises:
        ValueError: a task that neither lm-eval, the shipped local tasks nor `include_path` defines.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(render_local_tasks(work_dir / "lm_tasks"))]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ValueError(f"--include-path {include_path!r} is not a directory")
        paths.append(include_path)
    only_local = include_path is None and set(tasks) <= set(LOCAL_TASKS)
    manager = TaskManager(include_path=paths, include_defaults=not only_local)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; shipped offline tasks: {', '.join(LOCAL_TASKS)}")
    return manager


def evaluate_lm(lm: Any, tasks: list[str], manager: Any, options: Any) -> dict[str, Any]:
    """Run lm-eval `tasks` on the lm-eval model `lm`; return metrics, their stderr, versions, counts and samples.

    Hub settings (`HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE`) are the user's: the shipped `_local` tasks read local
    files and need no network either way, stock tasks download where a network exists.

    Args:
        lm (`lm_eval.api.model.LM`): e.g. an `evals.lm_model.InterventionsLM`.
        manager (`lm_eval.tasks.TaskManager`): from `task_manager`.
        options (`evals.runner.LmOptions`): limit or docs (task → document indices: a dev or test part of each
            task, for `tune`), seed, num_fewshot, bootstrap_iters.

    Returns:
        `dict`: `metrics` and `stderr` (`{task: {metric: value}}`; stderr is lm-eval's: closed form for means,
        bootstrap for other aggregations; absent with `bootstrap_iters=0`), `versions`, `n-samples`, `samples`
        (lm-eval's per-sample logs) and `per_sample` (`per_sample_values`, for the paired statistics).
    """
    from lm_eval import simple_evaluate

    seed = options.seed
    if options.docs is not None and options.limit is not None:
        raise ValueError("give either a limit or document indices, not both")
    with _quiet_git():
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=options.limit, samples=options.docs,
                              num_fewshot=options.num_fewshot, bootstrap_iters=options.bootstrap_iters,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, log_samples=True)
    metrics, stderr = {}, {}
    for task, res in out["results"].items():
        numbers = {k: v for k, v in res.items() if isinstance(v, float) and "," in k}
        metrics[task] = {k.split(",")[0]: v for k, v in numbers.items() if "_stderr" not in k}
        stderr[task] = {k.split(",")[0].removesuffix("_stderr"): v for k, v in numbers.items() if "_stderr" in k}
    return {"metrics": metrics, "stderr": stderr, "versions": out.get("versions", {}),
            "n-samples": out.get("n-samples", {}), "samples": out.get("samples", {}),
            "per_sample": per_sample_values(out.get("samples", {}), metrics)}


def count_docs(tasks: list[str], work_dir: Path, include_path: str | None = None) -> dict[str, int]:
    """How many evaluation documents each task has (lm-eval's `eval_docs`)."""
    from lm_eval.tasks import get_task_dict

    found = get_task_dict(tasks, task_manager(tasks, work_dir, include_path))
    return {name: len(task.eval_docs) for name, task in found.items()}


def per_sample_values(samples: dict[str, list[dict[str, Any]]],
                      metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """`{task: {metric: {doc_id: value}}}` from lm-eval's logged samples, for the task metrics that lm-eval
    reports as a mean of per-document values (acc, acc_norm, exact_match, ...); one filter per task (the
    first logged)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task, logged in samples.items():
        if not logged:
            continue
        first = logged[0].get("filter")
        rows = [s for s in logged if s.get("filter") == first]
        names = [m for m in metrics.get(task, {}) if all(isinstance(s.get(m), (int, float, bool)) for s in rows)]
        out[task] = {m: {str(s["doc_id"]): float(s[m]) for s in rows} for m in names}
    return out


@contextlib.contextmanager
def _quiet_git() -> Iterator[None]:
    """For one lm-eval run, its `git describe` of the working directory runs with git's stderr discarded: outside a
    checkout, git would print "fatal: not a git repository" to the user's terminal (the hash is still recorded
    where there is one)."""
    from lm_eval import evaluator

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def _git_hash() -> str | None:
    """`git describe --always` of the working directory, or None outside a checkout (or without git)."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
