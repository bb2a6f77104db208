"""Regenerate the README's main-job tables of both builtins in one command.

    python benchmarks/main_jobs.py            # runs both main jobs, rewrites their README blocks and figures
    python benchmarks/main_jobs.py --only shapes-smollm2

Each main job runs as a user runs it (`interventions eval pope --model builtin:<name> --methods ...` in a fresh
process, model load included) into `runs/main-<name>`; its wall time, date and `results.md` tables replace the
block between ``<!-- main-job:<name> -->`` and ``<!-- /main-job:<name> -->`` in README.md, and its `results.png`
becomes `docs/main_job_<name>.png`.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: builtin → the methods of its main job (every method that applies to it; see the README for the ones left out)
JOBS = {"shapes-vlm": "none,pai,act,locore,paint,cca,gift,vhr,sgrs,carve",
        "shapes-smollm2": "none,pai,act,locore,paint,cca,gift,vhr,sgrs,carve,var"}


def command(name: str) -> list[str]:
    return ["interventions", "eval", "pope", "--model", f"builtin:{name}", "--methods", JOBS[name], "--out",
            str(ROOT / "runs" / f"main-{name}"), "--no-progress"]


def run(name: str) -> str:
    """Run one main job afresh; return its README block."""
    out = ROOT / "runs" / f"main-{name}"
    if out.exists():
        shutil.rmtree(out)
    started = time.time()
    subprocess.run(command(name), check=True, cwd=ROOT)
    wall = time.time() - started
    shutil.copyfile(out / "results.png", ROOT / "docs" / f"main_job_{name}.png")
    tables = (out / "results.md").read_text().split("\n", 2)[2].strip()  # drop the title line
    shown = " ".join(command(name)[:-3])
    return (f"`{shown}`: {wall:.0f} s wall, model load included, on this machine "
            f"({datetime.date.today().isoformat()}, `python benchmarks/main_jobs.py --only {name}`).\n\n"
            f"{tables}\n\n![results.png of the {name} main job](docs/main_job_{name}.png)")


def replace_block(readme: str, name: str, block: str) -> str:
    start, end = f"<!-- main-job:{name} -->", f"<!-- /main-job:{name} -->"
    if start not in readme or end not in readme:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(JOBS), action="append", help="one builtin (repeatable)")
    args = parser.parse_args(argv)
    readme = (ROOT / "README.md").read_text()
    for name in args.only or list(JOBS):
        readme = replace_block(readme, name, run(name))
        (ROOT / "README.md").write_text(readme)  # after each job: nothing lost if the next one fails
        print(f"{name}: README block and docs/main_job_{name}.png rewritten", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
