"""CHAIR (Rohrbach, Hendricks et al., EMNLP 2018): captions, metrics and the benchmark object.

Spec: specs/evals.md §2 (lineage 3, OPERA: CHAIR_s, CHAIR_i, Recall, Len). Caption -> object mentions lives in
`chair_words`, ground truth in `chair_truth`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from .chair_truth import SHIPPED_OBJECTS, GroundTruth, check_one_source, load_ground_truth
from .chair_words import DATA_DIR, Vocabulary, default_vocabulary, lemmatizer_name, parse_caption
from .records import read_records, require_field

OPERA_IMAGE_IDS = DATA_DIR / "opera_500_image_ids.txt"
CHAIR_PROMPT = "Please describe this image in detail."
COCO_IMAGE_NAME = "COCO_val2014_{image_id:012d}.jpg"


def read_captions(path: str | Path) -> tuple[list[tuple[int, str]], dict[str, Any]]:
    """Read ``{"image_id", "caption"}`` records (JSON Lines or a JSON array), one per image.

    Raises:
        ValueError: unreadable file, a missing or mistyped field, a duplicated image id.
    """
    records, info = read_records(path, "captions file")
    captions, seen = [], {}
    for pos, rec in records:
        where = f"captions file {info['path']!r} {pos}"
        image_id = require_field(rec, "image_id", int, where)
        caption = require_field(rec, "caption", str, where)
        if image_id in seen:
            raise ValueError(f"{where}: duplicate image_id {image_id} (first at {seen[image_id]})")
        seen[image_id] = pos
        captions.append((image_id, caption))
    return captions, info


def chair_metrics(captions: Sequence[tuple[int, str]], gt: GroundTruth, vocab: Vocabulary | None = None) -> dict:
    """CHAIR_s, CHAIR_i and recall (percentages), Len (mean tokens per caption), counts and per-caption details.

    - CHAIR_i = hallucinated mentions / mentions (duplicates count);
    - CHAIR_s = captions with at least one hallucinated mention / captions;
    - recall = sum over captions of |distinct mentioned nodes in ground truth| / sum of |ground truth|;
    - len = mean number of tokens after two-word merging, punctuation included.

    A zero denominator gives 0.0. Each ``captions`` item of the result has OPERA's per-caption keys.

    Raises:
        ValueError: an image id without ground truth, or no captions.
    """
    vocab = vocab or default_vocabulary()
    if not captions:
        raise ValueError("CHAIR: no captions to score")
    missing = [i for i, _ in captions if i not in gt.objects]
    if missing:
        more = f" (nor have {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"image_id {missing[0]} has no ground truth in {gt.source}{more}")
    details = []
    n_mentions = n_hallucinated = n_bad_captions = n_words = found = total = 0
    for image_id, caption in captions:
        parsed = parse_caption(caption, vocab)
        truth = gt.objects[image_id]
        bad = [(w, node, idx) for w, node, idx in parsed.mentions if node not in truth]
        n_mentions += len(parsed.mentions)
        n_hallucinated += len(bad)
        n_bad_captions += bool(bad)
        n_words += len(parsed.words)
        found += len({node for _, node, _ in parsed.mentions} & truth)
        total += len(truth)
        details.append(
            {
                "image_id": image_id,
                "caption": caption,
                "mscoco_generated_words": [[w, node] for w, node, _ in parsed.mentions],
                "mscoco_hallucinated_words": [[w, node] for w, node, _ in bad],
                "hallucination_idxs": [idx for _, _, idx in bad],
                "mscoco_gt_words": sorted(truth),
                "words": parsed.words,
            }
        )
    return {
        "CHAIR_s": 100 * n_bad_captions / len(captions),
        "CHAIR_i": 100 * n_hallucinated / n_mentions if n_mentions else 0.0,
        "recall": 100 * found / total if total else 0.0,
        "len": n_words / len(captions),
        "n_captions": len(captions),
        "n_mentions": n_mentions,
        "n_hallucinated_mentions": n_hallucinated,
        "n_hallucinated_captions": n_bad_captions,
        "ground_truth": gt.source,
        "lemmatizer": lemmatizer_name(),
        "scorer": "CHAIR lineage 3 (OPERA), offline: regex sentence split + NLTK Treebank tokenizer, no POS tagger",
        "captions": details,
    }


def read_image_ids(path: str | Path = OPERA_IMAGE_IDS) -> tuple[int, ...]:
    """Read one COCO image id per line; the default is OPERA's 500 val2014 ids in their order (specs §2.4).

    Raises:
        ValueError: missing file, a line that is not an integer, a duplicated id, no ids.
    """
    what = f"image-id file {str(path)!r}"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} cannot be read: {e}") from None
    ids: dict[int, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not line.strip().isdigit():
            raise ValueError(f"{what} line {number}: expected an integer image id, got {line.strip()!r}")
        if int(line) in ids:
            raise ValueError(f"{what} line {number}: duplicate image id {int(line)} (first on line {ids[int(line)]})")
        ids[int(line)] = number
    if not ids:
        raise ValueError(f"{what} has no image ids")
    return tuple(ids)


@dataclass(frozen=True)
class ChairBenchmark:
    """CHAIR as data: image ids, a prompt and a ground-truth source (give exactly one of objects / annotations).

    Args:
        image_ids (`tuple[int, ...]`, *optional*): defaults to OPERA's 500 ids (`read_image_ids()`).
        prompt (`str`, *optional*, defaults to `CHAIR_PROMPT`).
        max_new_tokens (`int`, *optional*, defaults to 512): OPERA's setting; published numbers depend on it.
        objects (`str` or `Path`, *optional*, defaults to `SHIPPED_OBJECTS`).
        annotations (`str` or `Path`, *optional*): a COCO 2014 annotations directory (set ``objects=None``).
        synonyms (`str` or `Path`, *optional*): a CHAIR `synonyms.txt` for another object vocabulary (e.g. the
            shapes world's); `None` = the COCO one.
        image_name (`str`, *optional*, defaults to `COCO_IMAGE_NAME`): image file name, formatted with
            ``image_id``.

    Example:
        >>> bench = ChairBenchmark()
        >>> next(bench.samples())["image"]
        'COCO_val2014_000000226988.jpg'
    """

    image_ids: tuple[int, ...] = field(default_factory=read_image_ids)
    prompt: str = CHAIR_PROMPT
    max_new_tokens: int = 512
    objects: str | Path | None = SHIPPED_OBJECTS
    annotations: str | Path | None = None
    synonyms: str | Path | None = None
    image_name: str = COCO_IMAGE_NAME
    name: ClassVar[str] = "chair"
    # bump when the prompt, tokenisation, singulariser or metrics change
    version: ClassVar[str] = "1"
    metrics: ClassVar[tuple[str, ...]] = ("CHAIR_s", "CHAIR_i", "recall", "len")

    def __post_init__(self) -> None:
        check_one_source(self.objects, self.annotations)
        if len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError("chair: image_ids has duplicates")

    @cached_property
    def vocabulary(self) -> Vocabulary:
        """The object vocabulary: `synonyms` when given, else the COCO one."""
        return default_vocabulary() if self.synonyms is None else Vocabulary.from_synonyms(self.synonyms)

    @cached_property
    def ground_truth(self) -> GroundTruth:
        """Loaded on first use (the annotation files are large)."""
        return load_ground_truth(self.objects, self.annotations, self.vocabulary)

    def samples(self) -> Iterator[dict[str, Any]]:
        """Yield ``{"id": "<image_id>", "image_id", "image": "COCO_val2014_<12 digits>.jpg", "question"}``."""
        for image_id in self.image_ids:
            yield {
                "id": str(image_id),
                "image_id": image_id,
                "image": self.image_name.format(image_id=image_id),
                "question": self.prompt,
            }

    def record(self) -> dict[str, Any]:
        """Provenance for results files (the ground truth is named, not loaded)."""
        return {
            "benchmark": self.name,
            "version": self.version,
            "prompt": self.prompt,
            "image_ids": list(self.image_ids),
            "objects": None if self.objects is None else str(self.objects),
            "annotations": None if self.annotations is None else str(self.annotations),
            "synonyms": None if self.synonyms is None else str(self.synonyms),
            "lemmatizer": lemmatizer_name(),
        }

    def score(self, predictions: Iterable[Mapping[str, Any]], require_all: bool = True) -> dict[str, Any]:
        """Score ``[{"id", "text"}, ...]`` (ids as yielded by `samples`) with `chair_metrics`.

        Args:
            predictions (`Iterable[Mapping]`): one per image.
            require_all (`bool`, *optional*, defaults to `True`): every image needs a caption; with `False`
                (a `--limit` run) only captioned images are scored.

        Raises:
            ValueError: a prediction without `id`/`text`, an unknown or duplicated id, a missing image.
        """
        texts: dict[int, str] = {}
        known = set(self.image_ids)
        for i, pred in enumerate(predictions, start=1):
            where = f"prediction {i}"
            sid = require_field(pred, "id", str, where)
            text = require_field(pred, "text", str, where)
            if not sid.isdigit() or int(sid) not in known:
                raise ValueError(f"{where}: unknown id {sid!r}; expected an image id from samples()")
            if int(sid) in texts:
                raise ValueError(f"{where}: duplicate id {sid!r}")
            texts[int(sid)] = text
        missing = [i for i in self.image_ids if i not in texts]
        if missing and require_all:
            raise ValueError(f"predictions cover {len(texts)} of {len(self.image_ids)} images; missing {missing[0]}")
        return chair_metrics([(i, texts[i]) for i in self.image_ids if i in texts], self.ground_truth, self.vocabulary)
