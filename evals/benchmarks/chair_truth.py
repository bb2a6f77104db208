"""CHAIR ground truth: per-image sets of COCO node words, from a shipped object file or COCO 2014 annotations.

Spec: specs/evals.md §2.2 (ground truth = instance categories plus node words found in the human captions) and
§2.3 (the shipped sets, converted from Maxlinn's `chair.pkl`). COCO annotation files are plain JSON, so they are
read with `json`; pycocotools would add only an index over the same dicts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chair_words import DATA_DIR, Vocabulary, default_vocabulary, lemmatizer_name, parse_caption

SHIPPED_OBJECTS = DATA_DIR / "coco2014_objects.json.gz"
_ANNOTATION_FILES = {
    "instances": ("instances_train2014.json", "instances_val2014.json"),
    "captions": ("captions_train2014.json", "captions_val2014.json"),
}


@dataclass(frozen=True)
class GroundTruth:
    """Per-image sets of COCO node words.

    Args:
        objects (`Mapping[int, frozenset[str]]`): image id -> node words present.
        source (`str`): where the sets come from, for results files.
    """

    objects: Mapping[int, frozenset[str]]
    source: str


def check_one_source(objects: str | Path | None, annotations: str | Path | None) -> None:
    """Raise `ValueError` unless exactly one ground-truth source is given."""
    if (objects is None) == (annotations is None):
        got = "both" if objects is not None else "neither"
        raise ValueError(
            "CHAIR ground truth: give exactly one of objects (a per-image object file, e.g. the shipped "
            f"{SHIPPED_OBJECTS}) or annotations (a COCO 2014 annotations directory); got {got}"
        )


def load_ground_truth(
    objects: str | Path | None = None, annotations: str | Path | None = None, vocab: Vocabulary | None = None
) -> GroundTruth:
    """Load ground truth from exactly one of a per-image object file or a COCO 2014 annotations directory.

    Args:
        objects (`str` or `Path`, *optional*): JSON (optionally gzip) ``{"<image_id>": [node words]}``, such as
            the shipped `SHIPPED_OBJECTS` (Maxlinn's `chair.pkl` sets, built with `pattern.singularize`).
        annotations (`str` or `Path`, *optional*): directory with ``instances_{train,val}2014.json`` and
            ``captions_{train,val}2014.json`` (every one present is read; at least one of each kind). All four
            files mean about 616k human captions to tokenise: a few minutes on one core.
        vocab (`Vocabulary`, *optional*): defaults to the shipped one.

    Raises:
        ValueError: both or neither given, a missing or malformed file, a word or category outside the vocabulary.
    """
    vocab = vocab or default_vocabulary()
    check_one_source(objects, annotations)
    if objects is not None:
        return _load_objects(Path(objects), vocab)
    return _load_annotations(Path(annotations), vocab)


def _load_objects(path: Path, vocab: Vocabulary) -> GroundTruth:
    what = f"objects file {str(path)!r}"
    try:
        raw = path.read_bytes()
        data = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except FileNotFoundError:
        raise ValueError(f"{what} not found") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} is not (gzipped) JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a JSON object {{image_id: [node words]}}, got {type(data).__name__}")
    nodes = vocab.nodes
    sets: dict[int, frozenset[str]] = {}
    for key, words in data.items():
        if not key.isdigit() or not isinstance(words, list):
            raise ValueError(f"{what}: entry {key!r} must map a numeric image id to a list of node words")
        unknown = [w for w in words if w not in nodes]
        if unknown:
            raise ValueError(f"{what}: image {key} has {unknown[0]!r}, which is not a CHAIR node word")
        sets[int(key)] = frozenset(words)
    return GroundTruth(sets, f"objects file {path.name} (md5 {hashlib.md5(raw).hexdigest()})")


def _load_annotations(directory: Path, vocab: Vocabulary) -> GroundTruth:
    if not directory.is_dir():
        raise ValueError(f"annotations directory {str(directory)!r} not found")
    found = {}
    for kind, names in _ANNOTATION_FILES.items():
        found[kind] = [directory / n for n in names if (directory / n).is_file()]
        if not found[kind]:
            raise ValueError(f"annotations directory {str(directory)!r} has no {' or '.join(names)}")
    sets: dict[int, set[str]] = {}
    for path in found["instances"]:
        data = _read_coco(path, ("images", "annotations", "categories"))
        try:
            names = {c["id"]: c["name"] for c in data["categories"]}
            for image in data["images"]:
                sets.setdefault(image["id"], set())
            for ann in data["annotations"]:
                name = names.get(ann["category_id"])
                if name not in vocab.to_node:
                    raise ValueError(f"annotations file {str(path)!r}: category {name!r} is not a CHAIR word")
                sets.setdefault(ann["image_id"], set()).add(vocab.to_node[name])
        except (KeyError, TypeError) as e:
            raise ValueError(f"annotations file {str(path)!r}: malformed entry ({e!r})") from None
    for path in found["captions"]:
        try:
            for ann in _read_coco(path, ("annotations",))["annotations"]:
                nodes = {node for _, node, _ in parse_caption(ann["caption"], vocab).mentions}
                sets.setdefault(ann["image_id"], set()).update(nodes)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"annotations file {str(path)!r}: malformed entry ({e!r})") from None
    files = ", ".join(p.name for paths in found.values() for p in paths)
    return GroundTruth({k: frozenset(v) for k, v in sets.items()}, f"COCO annotations ({files}); {lemmatizer_name()}")


def _read_coco(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"annotations file {str(path)!r} is not readable JSON: {e}") from None
    for key in keys:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"annotations file {str(path)!r}: missing the {key!r} list of a COCO annotation file")
    return data
