"""Reasoning benchmarks through lm-evaluation-harness, on the live (possibly wrapped) model object.

The shipped offline datasets run as `<task>_local` tasks: YAML files that `include:` lm-eval's stock task (its
prompt and metrics unchanged) and point `data_files` at `evals/data/lm/`. lm-eval resolves data paths against the
working directory, so the YAMLs are rendered with absolute paths into the run's output folder.
"""

from __future__ import annotations

import os
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


def evaluate_lm(model: Any, tokenizer: Any, tasks: list[str], work_dir: Path, limit: int | None = None,
                include_path: str | None = None, seed: int = 0,
                docs: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Run lm-eval `tasks` on the in-memory `model`; return `{"metrics": {task: {metric: value}}, ...}`.

    `docs` (task → document indices, instead of `limit`) selects a dev or test part of each task (`tune`).

    Batch size is 1: lm-eval's HF wrapper pads batches without passing an attention mask, so a padded row would
    look like real tokens to methods that read roles (ACT's column means, PAI's last row).

    Raises:
        ValueError: a task that neither lm-eval, the shipped local tasks nor `include_path` defines.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, work_dir, include_path)
    if docs is not None and limit is not None:
        raise ValueError("give either a limit or document indices, not both")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, samples=docs, bootstrap_iters=0,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          log_samples=True)
    metrics = {task: {k.split(",")[0]: v for k, v in res.items()
                      if isinstance(v, float) and "stderr" not in k}
               for task, res in out["results"].items()}
    return {"metrics": metrics, "versions": out.get("versions", {}), "n-samples": out.get("n-samples", {}),
            "per_sample": per_sample_values(out.get("samples", {}), metrics)}


def task_manager(tasks: list[str], work_dir: Path, include_path: str | None = None) -> Any:
    """lm-eval's task manager over the shipped tasks (and `include_path`), after checking that it knows `tasks`.

    Raises:
        ValueError: a task that neither lm-eval, the shipped local tasks nor `include_path` defines.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    paths = [str(render_local_tasks(work_dir / "lm_tasks"))]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ValueError(f"--include-path {include_path!r} is not a directory")
        paths.append(include_path)
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; shipped offline tasks: {', '.join(LOCAL_TASKS)}")
    return manager


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
