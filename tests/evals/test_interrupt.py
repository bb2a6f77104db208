"""Ctrl-C and a second writer, with a real run in a subprocess: SIGINT gives one line and exit 130 with the
predictions intact (and resumable, the wall time covering both parts); a second run on the same folder fails at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from eval_setup import ROOT, error_line, lines, pope_args, tiny_pope

from evals.folder_lock import locked
from evals.main import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_pope(tmp_path_factory.mktemp("interrupt"), n_questions=60)


def _args(setup, out, batch_size="1"):
    argv = pope_args(setup, out, "--methods", "none", "--batch-size", batch_size)
    argv[argv.index("--max-new-tokens") + 1] = "6"
    return argv


def test_ctrl_c_and_a_second_writer(setup, tmp_path, capsys):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "evals.main", *_args(setup, out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    predictions = out / "predictions" / "none.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if predictions.exists() and len(predictions.read_bytes().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1][-2000:]

    began = time.time()  # a second writer on the same folder fails at once, before loading anything
    assert main(_args(setup, out)) == 2
    assert time.time() - began < 10
    assert "is in use by another run (pid " in error_line(capsys.readouterr().err)

    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if line.strip()]
    assert said[-1] == (f"interrupted: the predictions written so far are kept in {out}; rerun the same command "
                        "to resume")
    assert sum(line.startswith("interrupted") for line in said) == 1
    written = lines(predictions)  # every line whole, each sample once
    assert 3 <= len(written) < 60 and len({r["id"] for r in written}) == len(written)

    assert main(_args(setup, out, batch_size="10")) == 0  # resume (greedy: the batch size is not in the run key)
    done = lines(predictions)
    assert sorted(r["id"] for r in done) == sorted(f"random/{i}" for i in range(1, 61))
    results = json.loads((out / "results.json").read_text())
    assert results["wall_time_s"] >= sum(r["seconds"] for r in done)  # both invocations' generation time


def test_lock_is_exclusive_and_released(tmp_path):
    with locked(tmp_path), pytest.raises(ValueError, match=f"in use by another run \\(pid {os.getpid()}\\)"), \
            locked(tmp_path):
        pass
    with locked(tmp_path):  # released on exit
        pass
