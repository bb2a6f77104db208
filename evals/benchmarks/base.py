"""What the runner needs from a generation benchmark (POPE, CHAIR): samples, a prompt, a scorer, provenance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Sample:
    """One prompt: `question` is the user text; `image` the image file (None for text-only benchmarks), `image_ref`
    its path as the data names it (relative to the images folder), `split` the part of the benchmark it belongs to
    (POPE: random, popular, adversarial; `--limit` counts per split)."""

    id: str
    question: str
    image: Path | None
    split: str = ""
    image_ref: str | None = None


class GenerationBenchmark(Protocol):
    """A declarative generation benchmark."""

    name: str
    version: str
    max_new_tokens: int

    def samples(self) -> list[Sample]:
        """All samples, in a fixed order."""

    def score(self, samples: list[Sample], texts: dict[str, str]) -> dict[str, Any]:
        """Metrics from the raw generated texts, by sample id."""

    def record(self) -> dict[str, Any]:
        """Provenance for the results file: data files with md5, prompt template, parser."""
