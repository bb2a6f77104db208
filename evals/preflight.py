"""Checks done before the model loads: which samples run (`--limit` per split) and every image they name, resolved
inside `--images` and opened once, so a bad file fails the run at once, by name, and costs no model time."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from .benchmarks.base import Sample


@dataclass(frozen=True)
class ImageFact:
    """One image file as the pre-flight read it: path as the data names it, size and md5 of its bytes."""

    ref: str
    bytes: int
    md5: str


def select_samples(samples: list[Sample], limit: int | None) -> list[Sample]:
    """The first `limit` samples of each split (POPE: random, popular, adversarial), in their order; all when
    `limit` is None."""
    if limit is None:
        return list(samples)
    taken: dict[str, int] = {}
    chosen = []
    for s in samples:
        if taken.get(s.split, 0) < limit:
            taken[s.split] = taken.get(s.split, 0) + 1
            chosen.append(s)
    return chosen


def check_image_ref(ref: str, images: Path) -> Path:
    """The file `ref` names inside the `images` folder.

    Raises:
        ValueError: `ref` is absolute or climbs out of the folder with `..`.
    """
    if PurePosixPath(ref).is_absolute() or PureWindowsPath(ref).is_absolute() or PureWindowsPath(ref).drive:
        raise ValueError(f"image path {ref!r} is absolute; image paths must be relative to --images {str(images)!r}")
    if ".." in PurePosixPath(ref.replace("\\", "/")).parts:
        raise ValueError(f"image path {ref!r} leaves --images {str(images)!r} ('..'); image paths must stay inside it")
    return images / ref


def check_images(samples: list[Sample], images: Path) -> dict[str, ImageFact]:
    """Open every image the samples name once (decoding all of it, so a truncated file is caught here).

    Returns:
        `dict`: image path as the data names it → `ImageFact`.

    Raises:
        ValueError: a path outside `images`, missing files, or files that are not readable images (each named,
            with the sample that uses it).
    """
    from PIL import Image, UnidentifiedImageError

    facts: dict[str, ImageFact] = {}
    missing: list[tuple[str, str]] = []
    broken: list[tuple[str, str, str]] = []
    for s in samples:
        if s.image_ref is None or s.image_ref in facts:
            continue
        path = check_image_ref(s.image_ref, images)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            missing.append((s.image_ref, s.id))
            continue
        except OSError as e:
            broken.append((s.image_ref, s.id, e.strerror or str(e)))
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            reason = "an empty file" if not data else str(e).split("\n")[0] or type(e).__name__
            broken.append((s.image_ref, s.id, reason))
            continue
        facts[s.image_ref] = ImageFact(s.image_ref, len(data), hashlib.md5(data).hexdigest())
    if missing:
        ref, sid = missing[0]
        raise ValueError(f"{len(missing)} image file(s) not found under {str(images)!r}, e.g. {ref} (sample {sid})")
    if broken:
        ref, sid, reason = broken[0]
        more = f" ({len(broken) - 1} more unreadable)" if len(broken) > 1 else ""
        raise ValueError(f"image {str(images / ref)!r} (sample {sid}) is not a readable image: {reason}{more}")
    return facts


def prompt_md5(sample: Sample) -> str:
    """md5 of a sample's user text, recorded with its prediction."""
    return hashlib.md5(sample.question.encode()).hexdigest()
