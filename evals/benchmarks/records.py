"""Read record files (JSON Lines or a JSON array) with their fingerprint: md5, size, lines, format, line endings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def read_records(path: str | Path, what: str) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """Read a file of JSON objects, either one per line or as one JSON array.

    POPE ships both layouts under a `.json` suffix (COCO splits are JSON Lines, some with CRLF; the SEEM-built
    splits are pretty-printed arrays), so the layout is sniffed from the first non-blank byte.

    Args:
        path (`str` or `Path`): the file.
        what (`str`): what the file is ("questions file"), used in error messages.

    Returns:
        `(records, info)`: `records` is a list of `(where, record)`, where `where` is ``"line 3"`` (JSON Lines)
        or ``"record 3"`` (JSON array), 1-based, for error messages; `info` has `path`, `md5`, `bytes`, `lines`,
        `format` (`"jsonl"` or `"json-array"`) and `line_endings` (`"lf"`, `"crlf"`, `"mixed"` or `"none"`).

    Raises:
        ValueError: missing or unreadable file, invalid JSON, a record that is not an object, or no records.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} not found") from None
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text") from None
    if text.lstrip().startswith("["):
        fmt, records = "json-array", _parse_array(text, path, what)
    else:
        fmt, records = "jsonl", _parse_lines(text, path, what)
    if not records:
        raise ValueError(f"{what} {str(path)!r} has no records")
    for where, rec in records:
        if not isinstance(rec, Mapping):
            raise ValueError(f"{what} {str(path)!r} {where}: expected a JSON object, got {type(rec).__name__}")
    crlf = raw.count(b"\r\n")
    lf = raw.count(b"\n") - crlf
    endings = "none" if crlf + lf == 0 else "crlf" if lf == 0 else "lf" if crlf == 0 else "mixed"
    info = {
        "path": str(path),
        "md5": hashlib.md5(raw).hexdigest(),
        "bytes": len(raw),
        # text lines; `wc -l` shows one fewer when the last line has no newline
        "lines": raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1),
        "format": fmt,
        "line_endings": endings,
    }
    return records, info


def _parse_lines(text: str, path: Path, what: str) -> list[tuple[str, Any]]:
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {str(path)!r} line {i}: invalid JSON ({e.msg})") from None
    return records


def _parse_array(text: str, path: Path, what: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {str(path)!r}: invalid JSON array ({e.msg} at line {e.lineno})") from None
    return [(f"record {i}", rec) for i, rec in enumerate(data, start=1)]


def require_field(rec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Return ``rec[key]`` after checking it exists and has type ``kind`` (`bool` never passes as `int`).

    Raises:
        ValueError: ``"<where>: missing field 'key'"`` or ``"<where>: field 'key' must be <type>, got <value>"``.
    """
    if key not in rec:
        raise ValueError(f"{where}: missing field {key!r}")
    value = rec[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: field {key!r} must be {names}, got {value!r}")
    return value
