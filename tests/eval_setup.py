"""Shared inputs of the eval-runner tests: a tiny LLaVA checkpoint folder, a folder of random images and a POPE
question file over them, plus helpers to call the CLI and read its output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tiny_checkpoint import save_tiny_llava

ROOT = Path(__file__).resolve().parent.parent


def tiny_pope(base: Path, n_questions: int = 12, n_images: int = 4) -> dict[str, str]:
    """Write the checkpoint, `n_images` random JPEGs and `coco_pope_random.json`; return their paths."""
    checkpoint = save_tiny_llava(base / "tiny-llava")
    images = base / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / f"img{i}.jpg")
    questions = base / "pope" / "coco_pope_random.json"
    questions.parent.mkdir()
    write_questions(questions, [f"img{i % n_images}.jpg" for i in range(n_questions)])
    return {"model": str(checkpoint), "images": str(images), "questions": str(questions), "base": str(base)}


def write_questions(path: Path, images: list[str]) -> Path:
    """A POPE question file with one question per image name (ids from 1, labels alternating)."""
    lines = [json.dumps({"question_id": i + 1, "image": name, "text": f"Is there a {['dog', 'cat', 'car'][i % 3]} "
                         "in the image?", "label": "yes" if i % 2 else "no"}) for i, name in enumerate(images)]
    path.write_text("\n".join(lines) + "\n")
    return path


def pope_args(setup: dict[str, str], out: Path, *extra: str, questions: str | None = None) -> list[str]:
    """`eval pope` on the tiny checkpoint, short answers, no progress bar."""
    return ["eval", "pope", "--model", setup["model"], "--questions", questions or setup["questions"], "--images",
            setup["images"], "--out", str(out), "--no-progress", "--max-new-tokens", "2", *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_line(err: str) -> str:
    """The one `error: ...` line of a failed command (asserting there is exactly one and no traceback)."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]
