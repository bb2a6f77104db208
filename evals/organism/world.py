"""The organism's world: 16 coloured icons in 4 co-occurrence groups, scene sampling (organism.md recipe F) and
rendering with pillow.

A scene holds 1-3 objects. Drawing an object pulls in each of its group mates with probability `MATE_P` while the
scene has fewer than `MAX_OBJECTS`, so scenes are mostly made of one group: the co-occurrence prior that makes the
trained model name absent group mates (hallucinate) while it still sees what is drawn (grounds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48
MAX_OBJECTS = 3
MATE_P = 0.8  # probability of adding each group mate of a chosen object (recipe F)
HIDDEN_Q = 0.45  # probability that a description names an undrawn mate of a drawn object (recipe F)
SIZE_RANGE = (10, 14)  # object size in pixels, inclusive
BACKGROUND_RANGE = (190, 250)  # grey level of the background, inclusive

#: (word, shape, RGB colour); each (shape, colour) pair is unique and each group holds four different shapes
OBJECTS: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("sun", "disc", (220, 110, 0)),
    ("moon", "ring", (0, 0, 200)),
    ("star", "plus", (140, 0, 170)),
    ("cloud", "bar", (0, 130, 130)),
    ("apple", "disc", (200, 0, 0)),
    ("cake", "square", (130, 65, 0)),
    ("cup", "frame", (0, 0, 200)),
    ("lemon", "diamond", (220, 110, 0)),
    ("lamp", "triangle", (0, 140, 0)),
    ("key", "bar", (200, 0, 0)),
    ("hat", "square", (0, 0, 0)),
    ("box", "frame", (130, 65, 0)),
    ("tree", "triangle", (0, 130, 130)),
    ("leaf", "ring", (0, 140, 0)),
    ("ball", "plus", (0, 0, 0)),
    ("flag", "diamond", (140, 0, 170)),
)  # fmt: skip
WORDS: tuple[str, ...] = tuple(o[0] for o in OBJECTS)
GROUP_SIZE = 4
GROUPS: tuple[tuple[int, ...], ...] = tuple(
    tuple(range(g, g + GROUP_SIZE)) for g in range(0, len(OBJECTS), GROUP_SIZE)
)  # sky, kitchen, room, park


@dataclass(frozen=True)
class Placed:
    """One drawn object: id, top-left corner and size in pixels."""

    obj: int
    x: int
    y: int
    size: int


@dataclass(frozen=True)
class Scene:
    """A scene: the drawn objects (sorted by id) and the background grey level."""

    placed: tuple[Placed, ...]
    background: int

    @property
    def objects(self) -> tuple[int, ...]:
        """Ids of the drawn objects, ascending."""
        return tuple(p.obj for p in self.placed)


@dataclass(frozen=True)
class World:
    """A world of icons: `(word, shape, RGB colour)` per object, in co-occurrence groups of `group_size`
    consecutive ids; scenes are sampled by recipe F (organism.md) and drawn at `IMAGE_SIZE`."""

    objects: tuple[tuple[str, str, tuple[int, int, int]], ...]
    group_size: int = GROUP_SIZE

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(o[0] for o in self.objects)

    def group_of(self, obj: int) -> tuple[int, ...]:
        """The ids of the group holding object `obj` (itself included)."""
        first = obj - obj % self.group_size
        return tuple(range(first, first + self.group_size))

    def sample_objects(self, rng: np.random.Generator) -> list[int]:
        """Recipe F: n uniform in 1-3; add random objects, each pulling in its mates with p `MATE_P` (≤ 3 in all)."""
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        chosen: list[int] = []
        while len(chosen) < n:
            free = [o for o in range(len(self.objects)) if o not in chosen]
            obj = free[int(rng.integers(len(free)))]
            chosen.append(obj)
            for mate in rng.permutation([m for m in self.group_of(obj) if m != obj]):
                if (
                    len(chosen) < MAX_OBJECTS
                    and int(mate) not in chosen
                    and rng.random() < MATE_P
                ):
                    chosen.append(int(mate))
        return sorted(chosen)

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        """Objects by `sample_objects`, sizes 10-14 px, non-overlapping positions (rejection sampling)."""
        objects = self.sample_objects(rng)
        background = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
        while True:
            placed: list[Placed] = []
            for obj in objects:
                size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
                for _ in range(100):
                    x, y = (int(v) for v in rng.integers(1, IMAGE_SIZE - size, size=2))
                    if all(
                        x + size < p.x
                        or p.x + p.size < x
                        or y + size < p.y
                        or p.y + p.size < y
                        for p in placed
                    ):
                        placed.append(Placed(obj, x, y, size))
                        break
            if len(placed) == len(objects):
                return Scene(tuple(placed), background)

    def undrawn_mates(self, scene: Scene) -> list[int]:
        """Undrawn members of the groups of the drawn objects, ascending."""
        drawn = set(scene.objects)
        return sorted({m for o in drawn for m in self.group_of(o)} - drawn)

    def describe(
        self, scene: Scene, rng: np.random.Generator, q: float = HIDDEN_Q
    ) -> list[int]:
        """The training description: every drawn object plus each undrawn mate of a drawn object with probability
        `q`, in id order (the mates are the label noise a co-occurrence prior comes from)."""
        named = [m for m in self.undrawn_mates(scene) if rng.random() < q]
        return sorted(set(scene.objects) | set(named))

    def presence_question(
        self, scene: Scene, rng: np.random.Generator, hidden_yes: float = 0.0
    ) -> tuple[int, bool]:
        """Half "yes" about a drawn object, half "no" about an undrawn object drawn uniformly (no bias to mates).

        With `hidden_yes` > 0, a "yes" question is, with that probability, about an undrawn group mate of a drawn
        object instead, still labelled "yes": prior-driven labels, as noisy real annotations have (organism.md, the
        variant of recipe F)."""
        if rng.random() < 0.5:
            if hidden_yes > 0 and rng.random() < hidden_yes:
                mates = self.undrawn_mates(scene)
                if mates:
                    return mates[int(rng.integers(len(mates)))], True
            return scene.objects[int(rng.integers(len(scene.objects)))], True
        absent = [o for o in range(len(self.objects)) if o not in scene.objects]
        return absent[int(rng.integers(len(absent)))], False

    def render(self, scene: Scene) -> Image.Image:
        """Draw the scene as a 48 × 48 RGB image."""
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (scene.background,) * 3)
        draw = ImageDraw.Draw(image)
        for p in scene.placed:
            _draw_shape(
                draw, self.objects[p.obj][1], self.objects[p.obj][2], p.x, p.y, p.size
            )
        return image

    def cooccurrence(self, n_scenes: int = 20_000, seed: int = 12345) -> np.ndarray:
        """Object co-occurrence counts over `n_scenes` generated scenes: `(objects, objects)`, diagonal = frequency."""
        rng = np.random.default_rng(seed)
        counts = np.zeros((len(self.objects), len(self.objects)), dtype=np.int64)
        for _ in range(n_scenes):
            objs = self.sample_objects(rng)
            for a in objs:
                for b in objs:
                    counts[a, b] += 1
        return counts


#: the shipped organism's world (`builtin:shapes-vlm`); the module-level functions below are its methods
SHAPES = World(OBJECTS)
group_of = SHAPES.group_of
sample_objects = SHAPES.sample_objects
sample_scene = SHAPES.sample_scene
describe = SHAPES.describe
presence_question = SHAPES.presence_question
render = SHAPES.render
cooccurrence = SHAPES.cooccurrence


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    colour: tuple[int, int, int],
    x: int,
    y: int,
    s: int,
) -> None:
    x1, y1 = x + s - 1, y + s - 1
    cx, cy = x + (s - 1) / 2, y + (s - 1) / 2
    third = max(s // 3, 2)
    if shape == "disc":
        draw.ellipse((x, y, x1, y1), fill=colour)
    elif shape == "ring":
        draw.ellipse((x, y, x1, y1), outline=colour, width=3)
    elif shape == "square":
        draw.rectangle((x, y, x1, y1), fill=colour)
    elif shape == "frame":
        draw.rectangle((x, y, x1, y1), outline=colour, width=3)
    elif shape == "triangle":
        draw.polygon([(cx, y), (x1, y1), (x, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=colour)
    elif shape == "plus":
        draw.rectangle((x, cy - third / 2, x1, cy + third / 2), fill=colour)
        draw.rectangle((cx - third / 2, y, cx + third / 2, y1), fill=colour)
    elif shape == "bar":
        draw.rectangle((x, cy - third / 2, x1, cy + third / 2), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


#: the world of `builtin:shapes-smollm2`: 24 COCO category words (each one SmolLM2 token after a space) in 6 real
#: COCO co-occurrence groups (table, street, desk, farm, fruit, living room), one (shape, colour) icon per word
COCO_OBJECTS: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("fork", "bar", (0, 0, 200)),
    ("knife", "triangle", (200, 0, 0)),
    ("spoon", "disc", (0, 140, 0)),
    ("bowl", "ring", (130, 65, 0)),
    ("car", "square", (200, 0, 0)),
    ("bus", "frame", (220, 110, 0)),
    ("truck", "diamond", (0, 0, 200)),
    ("bicycle", "plus", (0, 140, 0)),
    ("keyboard", "bar", (0, 0, 0)),
    ("mouse", "disc", (140, 0, 170)),
    ("laptop", "square", (0, 130, 130)),
    ("tv", "frame", (0, 0, 0)),
    ("cow", "ring", (0, 0, 0)),
    ("sheep", "triangle", (140, 0, 170)),
    ("horse", "plus", (130, 65, 0)),
    ("dog", "diamond", (200, 0, 0)),
    ("banana", "bar", (220, 110, 0)),
    ("apple", "disc", (200, 0, 0)),
    ("orange", "square", (220, 110, 0)),
    ("broccoli", "plus", (0, 130, 130)),
    ("chair", "triangle", (0, 130, 130)),
    ("couch", "frame", (140, 0, 170)),
    ("clock", "ring", (0, 0, 200)),
    ("book", "diamond", (130, 65, 0)),
)  # fmt: skip
COCO_ICONS = World(COCO_OBJECTS)
