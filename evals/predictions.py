"""Append-only JSONL predictions that survive a crash: one line per sample, flushed and fsynced per batch; on
restart, a torn last line is dropped and the ids already written are skipped."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def load_predictions(path: Path, run_key: str) -> dict[str, dict[str, Any]]:
    """Predictions already in `path`, by sample id (first line wins); a torn last line is cut off the file.

    Raises:
        ValueError: the file holds predictions of another configuration (another run key).
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]  # bytes after the last newline are a write a crash interrupted
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    done: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {number} is not JSON; the predictions file is corrupt") from None
        if record.get("run_key") != run_key:
            raise ValueError(f"{path} holds predictions of another configuration (run key {record.get('run_key')}"
                             f" != {run_key}); use another --out folder")
        done.setdefault(str(record["id"]), record)
    return done


def append_predictions(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records as JSON lines and force them to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
