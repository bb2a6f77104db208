"""Generate shapes-POPE and shapes-CHAIR on held-out scenes, in the file formats of the real benchmarks.

    python -m evals.organism.build_benchmarks --out evals/data/shapes

Writes (`--seed` 1000 by default; training draws its scenes from the streams ``[seed, 1]`` / ``[seed, 2, i]`` of
`--seed` 0 / 1, a different seed sequence, so the scenes here are held out):

- ``images/shapes_<id 6 digits>.png``: the `--chair-scenes` scenes (ids from 1);
- ``pope/shapes_pope_{random,popular,adversarial}.json``: POPE JSON Lines (``question_id``, ``image``, ``text``,
  ``label``) over the first `--pope-scenes` scenes with 3 objects (POPE keeps images with ≥ 3 objects): per scene
  its 3 objects as "yes" and 3 absent objects as "no", alternating; negatives uniform among the absent ones
  (random), the most frequent absent ones (popular) or the absent ones that co-occur most with the scene's
  objects (adversarial; counts over 20,000 generated scenes, summed over the scene's objects; ties by object id);
- ``pope_quick/``: the same three files cut to the first `--quick-pope-scenes` scenes (the default of
  ``interventions eval pope --model builtin:shapes-vlm``);
- ``chair/objects.json`` (``{"<id>": [object words]}``, what `chair_truth` reads), ``chair/synonyms.txt`` (one
  object word per line, the CHAIR vocabulary format), ``chair/image_ids.txt`` (all scenes) and
  ``chair/image_ids_quick.txt`` (the first `--quick-chair-scenes`);
- the dev split, for `interventions tune` (disjoint from the test scenes: its own stream ``[seed, 3]``, ids from
  100001, no image equal to a test image): ``images/shapes_1000<id>.png`` (`--dev-scenes`),
  ``pope_dev/shapes_pope_*.json`` over its first `--dev-pope-scenes` scenes with 3 objects (negatives drawn with
  ``seed + 1``), ``chair/objects_dev.json`` and ``chair/image_ids_dev.txt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .model import PRESENCE_PROMPT
from .world import OBJECTS, WORDS, cooccurrence, render, sample_scene, Scene

SPLITS = ("random", "popular", "adversarial")
IMAGE_NAME = "shapes_{image_id:06d}.png"
DEV_ID_OFFSET = 100_000  # dev scene i has id DEV_ID_OFFSET + i
DEV_STREAM = 3


def scenes(n: int, seed: int, stream: tuple[int, ...] = ()) -> list[Scene]:
    """The held-out scenes 1..n (scene i is `scenes(n, seed)[i - 1]`), one generator stream in order; the dev
    scenes are `scenes(n, seed, (DEV_STREAM,))`."""
    rng = np.random.default_rng([seed, *stream])
    return [sample_scene(rng) for _ in range(n)]


def negatives(scene: Scene, split: str, counts: np.ndarray, rng: np.random.Generator, k: int = 3) -> list[int]:
    """`k` absent objects for one scene, as POPE picks them for `split`."""
    absent = [o for o in range(len(OBJECTS)) if o not in scene.objects]
    if split == "random":
        return sorted(int(o) for o in rng.choice(absent, size=k, replace=False))
    if split == "popular":
        score = {o: counts[o, o] for o in absent}
    else:
        score = {o: sum(counts[g, o] for g in scene.objects) for o in absent}
    return sorted(absent, key=lambda o: (-score[o], o))[:k]


def pope_questions(items: list[tuple[int, Scene]], split: str, counts: np.ndarray, seed: int) -> list[dict]:
    """POPE records for one split: per scene yes / no alternating, `question_id` from 1."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    records = []
    for image_id, scene in items:
        for pos, neg in zip(scene.objects, negatives(scene, split, counts, rng), strict=True):
            for obj, label in ((pos, "yes"), (neg, "no")):
                records.append({"question_id": len(records) + 1, "image": IMAGE_NAME.format(image_id=image_id),
                                "text": PRESENCE_PROMPT.format(WORDS[obj]), "label": label})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def build(out: Path, seed: int = 1000, chair_scenes: int = 1000, pope_scenes: int = 500,
          quick_pope_scenes: int = 20, quick_chair_scenes: int = 100, dev_scenes: int = 100,
          dev_pope_scenes: int = 20) -> dict:
    """Write every file under `out`; return counts for the provenance note."""
    all_scenes = scenes(chair_scenes, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for image_id, scene in enumerate(all_scenes, start=1):
        render(scene).save(out / "images" / IMAGE_NAME.format(image_id=image_id), optimize=True)
    counts = cooccurrence()
    dev = build_dev(out, all_scenes, counts, seed, dev_scenes, dev_pope_scenes)
    full = [(i, s) for i, s in enumerate(all_scenes, start=1) if len(s.objects) == 3][:pope_scenes]
    if len(full) < pope_scenes:
        raise ValueError(f"only {len(full)} scenes with 3 objects among {chair_scenes}; raise --chair-scenes")
    for split in SPLITS:
        records = pope_questions(full, split, counts, seed)
        write_jsonl(out / "pope" / f"shapes_pope_{split}.json", records)
        write_jsonl(out / "pope_quick" / f"shapes_pope_{split}.json", records[: 6 * quick_pope_scenes])
    chair = out / "chair"
    chair.mkdir(parents=True, exist_ok=True)
    objects = {str(i): [WORDS[o] for o in s.objects] for i, s in enumerate(all_scenes, start=1)}
    (chair / "objects.json").write_text(json.dumps(objects, separators=(",", ":")) + "\n")
    (chair / "synonyms.txt").write_text("".join(w + "\n" for w in WORDS))
    (chair / "image_ids.txt").write_text("".join(f"{i}\n" for i in range(1, chair_scenes + 1)))
    (chair / "image_ids_quick.txt").write_text("".join(f"{i}\n" for i in range(1, quick_chair_scenes + 1)))
    return {"seed": seed, "scenes": chair_scenes, "pope_scenes": len(full), "pope_last_image_id": full[-1][0],
            "quick_pope_scenes": quick_pope_scenes, "quick_chair_scenes": quick_chair_scenes, **dev}


def build_dev(out: Path, test_scenes: list[Scene], counts: np.ndarray, seed: int, n_scenes: int,
              pope_scenes: int) -> dict:
    """The dev split: its own scene stream, ids from `DEV_ID_OFFSET` + 1, POPE over its first `pope_scenes`
    scenes with 3 objects, CHAIR over all of them.

    Raises:
        ValueError: too few 3-object scenes, or a dev image equal to a test image (not disjoint).
    """
    items = [(DEV_ID_OFFSET + i, s) for i, s in enumerate(scenes(n_scenes, seed, (DEV_STREAM,)), start=1)]
    test_pixels = {render(s).tobytes() for s in test_scenes}
    for image_id, scene in items:
        image = render(scene)
        if image.tobytes() in test_pixels:
            raise ValueError(f"dev scene {image_id} renders exactly like a test scene; the splits must be disjoint")
        image.save(out / "images" / IMAGE_NAME.format(image_id=image_id), optimize=True)
    full = [(i, s) for i, s in items if len(s.objects) == 3][:pope_scenes]
    if len(full) < pope_scenes:
        raise ValueError(f"only {len(full)} dev scenes with 3 objects among {n_scenes}; raise --dev-scenes")
    for split in SPLITS:
        write_jsonl(out / "pope_dev" / f"shapes_pope_{split}.json", pope_questions(full, split, counts, seed + 1))
    objects = {str(i): [WORDS[o] for o in s.objects] for i, s in items}
    (out / "chair").mkdir(parents=True, exist_ok=True)
    (out / "chair" / "objects_dev.json").write_text(json.dumps(objects, separators=(",", ":")) + "\n")
    (out / "chair" / "image_ids_dev.txt").write_text("".join(f"{i}\n" for i, _ in items))
    return {"dev_scenes": n_scenes, "dev_pope_scenes": len(full), "dev_first_id": items[0][0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--chair-scenes", type=int, default=1000)
    parser.add_argument("--pope-scenes", type=int, default=500)
    parser.add_argument("--quick-pope-scenes", type=int, default=20)
    parser.add_argument("--quick-chair-scenes", type=int, default=100)
    parser.add_argument("--dev-scenes", type=int, default=100)
    parser.add_argument("--dev-pope-scenes", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out, args.seed, args.chair_scenes, args.pope_scenes, args.quick_pope_scenes,
                           args.quick_chair_scenes, args.dev_scenes, args.dev_pope_scenes)))


if __name__ == "__main__":
    main()
