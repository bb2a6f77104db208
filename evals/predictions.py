"""Append-only JSONL predictions that survive a crash: one line per sample, flushed and fsynced per batch; on
restart, a torn last line is dropped and the ids already written are skipped."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def load_predictions(path: Path, run_key: str) -> dict[str, dict[str, Any]]:
    """Predictions already in `path`, by sample id; a torn last line is cut off the file.

    Raises:
        ValueError: a line that is not a JSON object with a string `id`, an id twice (two writers), or a line of
            another configuration (another run key).
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # bytes after the last newline are a write a crash interrupted
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    done: dict[str, dict[str, Any]] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {number} is not JSON; the predictions file is corrupt") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise ValueError(f"{path}: line {number} has no string 'id'; not a predictions file of this runner")
        if record.get("run_key") != run_key:
            raise ValueError(f"{path} line {number} holds a prediction of another configuration (run key "
                             f"{record.get('run_key')} != {run_key}); use another --out folder")
        sid = record["id"]
        if sid in done:
            raise ValueError(f"{path}: sample {sid} appears twice (lines {lines[sid]} and {number}); two runs wrote "
                             "into this folder at once; delete the file to recompute")
        done[sid], lines[sid] = record, number
    return done


def append_predictions(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records as JSON lines (one write, so an interrupt leaves at most a torn last line) and force them to
    disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
