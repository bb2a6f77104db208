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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import model, smollm2_vlm
from .world import COCO_ICONS, SHAPES, Scene, World

SPLITS = ("random", "popular", "adversarial")
IMAGE_NAME = "shapes_{image_id:06d}.png"
DEV_ID_OFFSET = 100_000  # dev scene i has id DEV_ID_OFFSET + i
DEV_STREAM = 3


@dataclass(frozen=True)
class Organism:
    """What differs between the organisms' benchmarks: the world, the presence question's wording and the scenes
    CHAIR keeps (those with at least `chair_min_objects` objects)."""

    world: World
    presence_prompt: str
    chair_min_objects: int = 1


ORGANISMS = {"shapes-vlm": Organism(SHAPES, model.PRESENCE_PROMPT),
             "shapes-smollm2": Organism(COCO_ICONS, smollm2_vlm.PRESENCE_PROMPT, chair_min_objects=3)}


def scenes(n: int, seed: int, stream: tuple[int, ...] = (), world: World = SHAPES) -> list[Scene]:
    """The held-out scenes 1..n (scene i is `scenes(n, seed)[i - 1]`), one generator stream in order; the dev
    scenes are `scenes(n, seed, (DEV_STREAM,))`."""
    rng = np.random.default_rng([seed, *stream])
    return [world.sample_scene(rng) for _ in range(n)]


def negatives(scene: Scene, split: str, counts: np.ndarray, rng: np.random.Generator, k: int = 3) -> list[int]:
    """`k` absent objects for one scene, as POPE picks them for `split`."""
    absent = [o for o in range(len(counts)) if o not in scene.objects]
    if split == "random":
        return sorted(int(o) for o in rng.choice(absent, size=k, replace=False))
    if split == "popular":
        score = {o: counts[o, o] for o in absent}
    else:
        score = {o: sum(counts[g, o] for g in scene.objects) for o in absent}
    return sorted(absent, key=lambda o: (-score[o], o))[:k]


def pope_questions(items: list[tuple[int, Scene]], split: str, counts: np.ndarray, seed: int,
                   organism: Organism = ORGANISMS["shapes-vlm"]) -> list[dict]:
    """POPE records for one split: per scene yes / no alternating, `question_id` from 1."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    records = []
    for image_id, scene in items:
        for pos, neg in zip(scene.objects, negatives(scene, split, counts, rng), strict=True):
            for obj, label in ((pos, "yes"), (neg, "no")):
                records.append({"question_id": len(records) + 1, "image": IMAGE_NAME.format(image_id=image_id),
                                "text": organism.presence_prompt.format(organism.world.words[obj]),
                                "label": label})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def build(out: Path, seed: int = 1000, chair_scenes: int = 1000, pope_scenes: int = 500,
          quick_pope_scenes: int = 20, quick_chair_scenes: int = 100, dev_scenes: int = 100,
          dev_pope_scenes: int = 20, organism: str = "shapes-vlm") -> dict:
    """Write every file under `out`; return counts for the provenance note."""
    spec = ORGANISMS[organism]
    world = spec.world
    all_scenes = scenes(chair_scenes, seed, world=world)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for image_id, scene in enumerate(all_scenes, start=1):
        world.render(scene).save(out / "images" / IMAGE_NAME.format(image_id=image_id), optimize=True)
    counts = world.cooccurrence()
    dev = build_dev(out, all_scenes, counts, seed, dev_scenes, dev_pope_scenes, spec)
    full = [(i, s) for i, s in enumerate(all_scenes, start=1) if len(s.objects) == 3][:pope_scenes]
    if len(full) < pope_scenes:
        raise ValueError(f"only {len(full)} scenes with 3 objects among {chair_scenes}; raise --chair-scenes")
    for split in SPLITS:
        records = pope_questions(full, split, counts, seed, spec)
        write_jsonl(out / "pope" / f"shapes_pope_{split}.json", records)
        write_jsonl(out / "pope_quick" / f"shapes_pope_{split}.json", records[: 6 * quick_pope_scenes])
    chair = out / "chair"
    chair.mkdir(parents=True, exist_ok=True)
    objects = {str(i): [world.words[o] for o in s.objects] for i, s in enumerate(all_scenes, start=1)}
    kept = [i for i, s in enumerate(all_scenes, start=1) if len(s.objects) >= spec.chair_min_objects]
    (chair / "objects.json").write_text(json.dumps(objects, separators=(",", ":")) + "\n")
    (chair / "synonyms.txt").write_text("".join(w + "\n" for w in world.words))
    (chair / "image_ids.txt").write_text("".join(f"{i}\n" for i in kept))
    (chair / "image_ids_quick.txt").write_text("".join(f"{i}\n" for i in kept[:quick_chair_scenes]))
    return {"organism": organism, "seed": seed, "scenes": chair_scenes, "chair_scenes": len(kept),
            "pope_scenes": len(full), "pope_last_image_id": full[-1][0], "quick_pope_scenes": quick_pope_scenes,
            "quick_chair_scenes": min(quick_chair_scenes, len(kept)), **dev}


def build_dev(out: Path, test_scenes: list[Scene], counts: np.ndarray, seed: int, n_scenes: int,
              pope_scenes: int, spec: Organism = ORGANISMS["shapes-vlm"]) -> dict:
    """The dev split: its own scene stream, ids from `DEV_ID_OFFSET` + 1, POPE over its first `pope_scenes`
    scenes with 3 objects, CHAIR over those with at least `spec.chair_min_objects`.

    Raises:
        ValueError: too few 3-object scenes, or a dev image equal to a test image (not disjoint).
    """
    world = spec.world
    items = [(DEV_ID_OFFSET + i, s) for i, s in enumerate(scenes(n_scenes, seed, (DEV_STREAM,), world), start=1)]
    test_pixels = {world.render(s).tobytes() for s in test_scenes}
    for image_id, scene in items:
        image = world.render(scene)
        if image.tobytes() in test_pixels:
            raise ValueError(f"dev scene {image_id} renders exactly like a test scene; the splits must be disjoint")
        image.save(out / "images" / IMAGE_NAME.format(image_id=image_id), optimize=True)
    full = [(i, s) for i, s in items if len(s.objects) == 3][:pope_scenes]
    if len(full) < pope_scenes:
        raise ValueError(f"only {len(full)} dev scenes with 3 objects among {n_scenes}; raise --dev-scenes")
    for split in SPLITS:
        write_jsonl(out / "pope_dev" / f"shapes_pope_{split}.json",
                    pope_questions(full, split, counts, seed + 1, spec))
    objects = {str(i): [world.words[o] for o in s.objects] for i, s in items}
    kept = [i for i, s in items if len(s.objects) >= spec.chair_min_objects]
    (out / "chair").mkdir(parents=True, exist_ok=True)
    (out / "chair" / "objects_dev.json").write_text(json.dumps(objects, separators=(",", ":")) + "\n")
    (out / "chair" / "image_ids_dev.txt").write_text("".join(f"{i}\n" for i in kept))
    return {"dev_scenes": n_scenes, "dev_chair_scenes": len(kept), "dev_pope_scenes": len(full),
            "dev_first_id": items[0][0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--organism", choices=sorted(ORGANISMS), default="shapes-vlm")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--chair-scenes", type=int, default=1000)
    parser.add_argument("--pope-scenes", type=int, default=500)
    parser.add_argument("--quick-pope-scenes", type=int, default=20)
    parser.add_argument("--quick-chair-scenes", type=int, default=100)
    parser.add_argument("--dev-scenes", type=int, default=100)
    parser.add_argument("--dev-pope-scenes", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out, args.seed, args.chair_scenes, args.pope_scenes, args.quick_pope_scenes,
                           args.quick_chair_scenes, args.dev_scenes, args.dev_pope_scenes, args.organism)))


if __name__ == "__main__":
    main()
