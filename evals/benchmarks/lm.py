"""Reasoning benchmarks through lm-evaluation-harness, on the live (possibly wrapped) model object.

The shipped offline datasets run as `<task>_local` tasks: YAML files that `include:` lm-eval's stock task (its
prompt and metrics unchanged) and point `data_files` at `evals/data/lm/`. lm-eval resolves data paths against the
working directory, so the YAMLs are rendered with absolute paths into the run's output folder.
"""

from __future__ import annotations

import contextlib
import os
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


def evaluate_lm(model: Any, tokenizer: Any, tasks: list[str], work_dir: Path, limit: int | None = None,
                include_path: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run lm-eval `tasks` on the in-memory `model`; return `{"metrics": {task: {metric: value}}, ...}`.

    Batch size is 1: lm-eval's HF wrapper pads batches without passing an attention mask, so a padded row would
    look like real tokens to methods that read roles (ACT's column means, PAI's last row).

    Raises:
        ValueError: a task that neither lm-eval, the shipped local tasks nor `include_path` defines.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
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
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    with _quiet_git():
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, log_samples=False)
    metrics = {task: {k.split(",")[0]: v for k, v in res.items()
                      if isinstance(v, float) and "stderr" not in k}
               for task, res in out["results"].items()}
    return {"metrics": metrics, "versions": out.get("versions", {}), "n-samples": out.get("n-samples", {})}


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
