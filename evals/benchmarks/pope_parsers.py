"""POPE answer parsers, selectable by name: `official` (default), `lmms-eval`, `vlmevalkit`.

A parser maps a raw generation to ``"yes"``, ``"no"`` or ``None`` (unparseable). Toolkits disagree on what an
unparseable answer does to precision and recall, so each parser also carries that rule; in accuracy it is always
wrong. Sources: specs/evals.md §1.3, §1.5, §1.6.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from interventions.registry import Registry


@dataclass(frozen=True)
class PopeParser:
    """A named answer parser.

    Args:
        name (`str`): registry key.
        parse (`Callable[[str], str | None]`): raw generation -> ``"yes"``, ``"no"`` or ``None``.
        unknown (`"drop"` or `"no"`): how a ``None`` enters precision and recall; ``"drop"`` leaves it out
            (lmms-eval), ``"no"`` counts it as a no (VLMEvalKit).
        source (`str`): where the rule comes from.
    """

    name: str
    parse: Callable[[str], str | None]
    unknown: Literal["drop", "no"]
    source: str


PARSERS: Registry[PopeParser] = Registry("POPE parser")


def _register(parser: PopeParser) -> None:
    PARSERS.register(parser.name)(parser)


def parse_official(text: str) -> str:
    """POPE `evaluate.py` / LLaVA `eval_pope.py`: first sentence, commas dropped, split on single spaces
    (case-sensitive); no if a word is ``No``, ``not`` or ``no``, else yes. Never unparseable."""
    first = text.split(".")[0]
    words = first.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def parse_exact(text: str) -> str | None:
    """lmms-eval `pope`: ``text.lower().strip()`` must be exactly ``yes`` or ``no`` (so ``"Yes."`` is unparseable)."""
    answer = text.lower().strip()
    return answer if answer in ("yes", "no") else None


_PUNCT = re.compile(r"[^\w\s']")


def parse_contains(text: str) -> str | None:
    """VLMEvalKit `YOrN_Extraction`: lowercase, punctuation to spaces, split into words; yes if ``yes`` is a word
    and ``no`` is not, no for the converse, otherwise unparseable."""
    words = set(_PUNCT.sub(" ", text.lower()).split())
    if ("yes" in words) != ("no" in words):
        return "yes" if "yes" in words else "no"
    return None


_register(PopeParser("official", parse_official, "drop", "POPE evaluate.py @109985c; LLaVA eval_pope.py @c121f04"))
_register(PopeParser("lmms-eval", parse_exact, "drop", "lmms-eval tasks/pope @75571cfe (exact match)"))
_register(PopeParser("vlmevalkit", parse_contains, "no", "VLMEvalKit YOrN_Extraction + POPE_rating @e8e78f05"))
