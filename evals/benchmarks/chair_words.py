"""CHAIR text side: the COCO synonym vocabulary and caption -> object mentions (specs/evals.md §2.2, §2.3).

Pipeline (lineage 3, OPERA, in its offline form): lowercase; split sentences on ``(?<=[.!?])\\s+`` (stands in for
NLTK punkt, whose data cannot be installed offline); NLTK's Treebank word tokenizer (what ``word_tokenize`` runs
after punkt; needs no data); singularise every token as a noun; merge two-word phrases left to right; if both
"toilet" and "seat" occur drop every "seat"; keep vocabulary words, mapped to their node word (duplicates kept).

Singulariser: `lemminflect` ``getLemma(token, upos="NOUN")``, whose lexicon ships in the wheel. OPERA uses
NLTK's WordNet lemmatiser, whose data has no PyPI wheel. On OPERA's 500 LLaVA-1.5 beam-5 captions the two agree
on every vocabulary word except "men" (-> "man", as `pattern.singularize` of lineages 1 and 2 does) and "vases"
(WordNet's artefact "vas"). `inflect.singular_noun` was rejected: it turns "bus" into "bu" and "tennis" into
"tenni"; `simplemma` turns "skiing" into "ski" and "tv" into "TV".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nltk.tokenize import NLTKWordTokenizer

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "chair"

# Two-word phrases kept as one token (identity entries of the CHAIR double-word map).
_PHRASES = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "laptop computer", "stove top oven", "home plate", "train track",
)  # fmt: skip
# "baby X" / "adult X" mean the animal X, so "baby" must not fire person.
_YOUNG = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
DOUBLE_WORDS: dict[str, str] = {
    **{p: p for p in _PHRASES},
    **{f"{age} {x}": x for x in _YOUNG for age in ("baby", "adult")},
    "passenger jet": "jet",
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",
    "wine glas": "wine glass",  # what a singulariser may leave of "wine glass"
}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Vocabulary:
    """The CHAIR vocabulary: every synonym mapped to its COCO node word, plus the two-word phrase map.

    Args:
        to_node (`Mapping[str, str]`): word -> node word (node words map to themselves).
        double_words (`Mapping[str, str]`): "w1 w2" -> the token that replaces the pair.
    """

    to_node: Mapping[str, str]
    double_words: Mapping[str, str]

    @classmethod
    def from_synonyms(cls, path: str | Path = DATA_DIR / "synonyms.txt") -> Vocabulary:
        """Parse a CHAIR `synonyms.txt`: one line per COCO class, node word first, items separated by ", ".

        Splitting on ", " without stripping items is the reference behaviour: ``"scooter,  motor bike"`` yields
        the entry ``" motor bike"``, which can never match a token.
        """
        to_node: dict[str, str] = {}
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            words = line.strip().split(", ")
            if words != [""]:
                to_node.update((w, words[0]) for w in words)
        return cls(to_node, DOUBLE_WORDS)

    @property
    def nodes(self) -> frozenset[str]:
        """The 80 COCO class names."""
        return frozenset(self.to_node.values())


@cache
def default_vocabulary() -> Vocabulary:
    """The shipped vocabulary (`evals/data/chair/synonyms.txt` and `DOUBLE_WORDS`)."""
    return Vocabulary.from_synonyms()


@lru_cache(maxsize=65536)
def singularize(token: str) -> str:
    """The noun lemma of ``token`` from `lemminflect` (the token itself when it has none)."""
    from lemminflect import getLemma

    lemmas = getLemma(token, upos="NOUN")
    return lemmas[0] if lemmas else token


def lemmatizer_name() -> str:
    """What `singularize` is, for results files."""
    return f"lemminflect {version('lemminflect')} getLemma(upos=NOUN)"


def tokenize(caption: str) -> list[str]:
    """Lowercase, split sentences, Treebank-tokenise and singularise ``caption``."""
    tokenizer = _word_tokenizer()
    sentences = _SENTENCE_END.split(caption.lower())
    return [singularize(t) for s in sentences for t in tokenizer.tokenize(s)]


@cache
def _word_tokenizer() -> NLTKWordTokenizer:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


@dataclass(frozen=True)
class ParsedCaption:
    """A caption after tokenisation.

    Args:
        words (`list[str]`): tokens after two-word merging, punctuation included (what "Len" counts).
        mentions (`list[tuple[str, str, int]]`): ``(word, node word, index into words)`` per object mention.
    """

    words: list[str]
    mentions: list[tuple[str, str, int]]


def parse_caption(caption: str, vocab: Vocabulary) -> ParsedCaption:
    """Find the COCO object mentions of ``caption`` (duplicates kept, in order)."""
    tokens = tokenize(caption)
    words: list[str] = []
    i = 0
    while i < len(tokens):
        pair = " ".join(tokens[i : i + 2])
        if pair in vocab.double_words:
            words.append(vocab.double_words[pair])
            i += 2
        else:
            words.append(tokens[i])
            i += 1
    # "the seat of the toilet" must not count as a chair
    drop_seat = "toilet" in words and "seat" in words
    mentions = [
        (w, vocab.to_node[w], idx)
        for idx, w in enumerate(words)
        if w in vocab.to_node and not (drop_seat and w == "seat")
    ]
    return ParsedCaption(words, mentions)
