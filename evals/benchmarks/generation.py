"""POPE and CHAIR as the runner sees them: samples with an image path and the final user text, and a scorer
over raw generated texts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Sample
from .chair import CHAIR_PROMPT, ChairBenchmark, read_image_ids
from .pope import SPLITS, PopeBenchmark


@dataclass
class ImageBenchmark:
    """Adapts a POPE/CHAIR definition (`inner`) to the runner, resolving image files under `images`."""

    inner: Any
    images: Path

    def __post_init__(self) -> None:
        if not self.images.is_dir():
            raise ValueError(f"--images {str(self.images)!r} is not a folder")
        self.name, self.version, self.max_new_tokens = self.inner.name, self.inner.version, self.inner.max_new_tokens
        # POPE formats each question with its template (a method); CHAIR's `prompt` is the text itself
        template = self.inner.prompt if callable(self.inner.prompt) else None
        self._samples = [
            Sample(s["id"], template(s["question"]) if template else s["question"], self.images / s["image"],
                   s.get("split", ""), s["image"])
            for s in self.inner.samples()
        ]

    def samples(self) -> list[Sample]:
        return self._samples

    def score(self, samples: list[Sample], texts: dict[str, str]) -> dict[str, Any]:
        every = len(samples) == len(self._samples)
        return self.inner.score([{"id": s.id, "text": texts[s.id]} for s in samples], require_all=every)

    def record(self) -> dict[str, Any]:
        return {**self.inner.record(), "images": str(self.images)}


def pope_benchmark(questions: Path, images: Path, parser: str = "official",
                   prompt: str | None = None) -> ImageBenchmark:
    """One POPE question file (its split named after the file: `coco_pope_random.json` → `random`), or a folder
    holding one ``*_pope_<split>.json`` file per split; `prompt` defaults to LLaVA-1.5's template."""
    kwargs = {"parser": parser} if prompt is None else {"parser": parser, "prompt_template": prompt}
    return ImageBenchmark(PopeBenchmark(question_files(questions), **kwargs), images)


def question_files(questions: Path) -> dict[str, Path]:
    """Split name → POPE question file: one file named ``*_pope_<split>.json``, or a folder with at most one such
    file per split.

    Raises:
        ValueError: no such file, a split name that is not one of POPE's, two files for one split, no files.
    """
    if questions.is_dir():
        found = {split: sorted(questions.glob(f"*_pope_{split}.json")) for split in SPLITS}
        twice = {split: paths for split, paths in found.items() if len(paths) > 1}
        if twice:
            split, paths = next(iter(twice.items()))
            raise ValueError(f"--questions {str(questions)!r} has {len(paths)} files for the {split} split "
                             f"({', '.join(p.name for p in paths)}); keep one per split")
        files = {split: paths[0] for split, paths in found.items() if paths}
        if not files:
            raise ValueError(f"--questions {str(questions)!r}: a folder without *_pope_{{{','.join(SPLITS)}}}.json "
                             "files (exactly one per split)")
        return files
    if not questions.is_file():
        raise ValueError(f"--questions {str(questions)!r}: no such file")
    split = questions.stem.rsplit("_", 1)[-1]
    if split not in SPLITS:
        raise ValueError(f"--questions {str(questions)!r}: the split is read from the file name "
                         f"(*_pope_<{'|'.join(SPLITS)}>.json), and {split!r} is not a POPE split; rename the file")
    return {split: questions}


def chair_benchmark(images: Path, image_ids: Path, prompt: str | None = None, objects: str | None = None,
                    annotations: str | None = None) -> ImageBenchmark:
    """CHAIR over the ids in `image_ids` (e.g. the shipped OPERA 500) with ground truth from one source."""
    return ImageBenchmark(ChairBenchmark(tuple(read_image_ids(image_ids)), prompt=prompt or CHAIR_PROMPT,
                                         objects=objects, annotations=annotations), images)
