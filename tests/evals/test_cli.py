"""The `interventions` console script: listing commands and the error contract (one line, exit code 2)."""

from __future__ import annotations

import interventions as iv
from evals.main import main


def test_listing_commands(capsys):
    assert main(["methods"]) == 0
    assert capsys.readouterr().out.split() == iv.methods()
    assert main(["describe", "act"]) == 0
    out = capsys.readouterr().out
    assert "act (strength beta, neutral 1.0)" in out and "threshold = 0.1" in out


def test_usage_error_is_one_line_and_exit_2(capsys):
    assert main(["describe", "paii"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: unknown method 'paii'; did you mean 'pai'? available: {', '.join(iv.methods())}\n"
