"""`interventions lm-eval ARGS` (or `python -m evals.lm_eval_cli ARGS`): lm-eval's own command line (its
`cli_evaluate`, every flag) with the `interventions` model type registered, for lm-eval releases such as 0.4.13 that
do not discover the `lm_eval.models` entry point declared in `pyproject.toml`. Without `--include_path`, the
shipped offline tasks (`copa_local`, `boolq_local`, `arc_easy_local`) are made available.

    interventions lm-eval --model interventions --model_args pretrained=builtin:smollm2,methods=act \\
        --tasks copa_local --batch_size 8 --log_samples --output_path runs/lm-eval
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run lm-eval's CLI on `argv`; return its exit status."""
    from lm_eval.__main__ import cli_evaluate

    from . import lm_model  # noqa: F401 - registers the model type
    from .benchmarks.lm import render_local_tasks

    saved = sys.argv
    with tempfile.TemporaryDirectory(prefix="interventions-lm-tasks-") as tasks:
        extra = [] if any(a.split("=")[0] == "--include_path" for a in argv) else [
            "--include_path", str(render_local_tasks(Path(tasks)))]
        sys.argv = ["lm_eval", *argv, *extra]
        try:
            cli_evaluate()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
