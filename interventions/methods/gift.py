"""GIFT, gaze-shift-guided cross-modal fusion enhancement (Qi et al., arXiv 2510.22067), to shared/specs/gift.md.

Stage 1, once per sequence: at the saliency layers, the "gaze shift" of every content word t of the question is
the positive change of attention to each image key v from row t−1 to row t, `G = max(0, A[t,v] − A[t−1,v])`; per
layer the H/2 heads with the largest total shift are kept; `h` = mean of G over (layers, kept heads, content
tokens), clipped to μ ± 3σ (unbiased σ, as torch's default) and min-max normalised to `ĥ ∈ [0, 1]`.

Stage 2, on the last query row (the last prompt row and every generated row) of the enhancement layers: in the
H/2 heads with the most image mass, image probabilities are multiplied by `S = exp(alpha·ĥ)`; in the H/2 heads
with the most question mass, question probabilities are multiplied by `new/orig` (the visual mass ratio of the
first group, one scalar per row); the row is renormalised. Implemented as the exact pre-softmax bias `alpha·ĥ` on
the image keys and `log(new/orig)` on the question keys (spec §5).

Where the map comes from (`saliency_pass`): when every saliency layer precedes every enhancement layer, inside the
same prefill (the saliency rows are requested read-only, so they are those of the unmodified model: exact, no extra
pass); otherwise (e.g. the Qwen2-VL-7B preset, saliency layer 14 inside enhancement layers 5-18) from one extra
unmodified prefill of the same inputs, run by the core as a "prefill" branch before the main prefill — the
official pipeline. The spec's zero-cost alternative for that case ("split prefill": the prompt minus its last token,
then the last token as a one-row step) gives the same numbers and is not implemented.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..core.branch import Branch
from ..core.roles import TokenRoles
from ..core.rows import RowLogits
from ..errors import ConfigError
from ..utils_imports import is_available
from .base import AttentionCall, Method, ModelInfo, RowRequest, layer_range, preset, register
from ..core.params import MethodConfig, choice, int_list, number, optional, param

logger = logging.getLogger(__name__)

#: the stream of the extra unmodified saliency prefill (`saliency_pass="separate"`)
SALIENCY = "gift_saliency"

#: spaCy coarse POS tags of content words [code] inference.py CONTENT_TAGS
CONTENT_POS = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "ADV", "NUM"})

#: closed-class English words (determiners, pronouns, auxiliaries, adpositions, conjunctions, particles,
#: wh-words, contraction pieces): the rule-based stand-in for spaCy's POS filter when spaCy is absent
STOP_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither another such what which whose
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves who whom one ones there here
am is are was were be been being do does did doing have has had having will would shall should can could may
might must ought
of in on at by for with about against between into through during before after above below to from up down out
off over under again further than as per via onto upon within without among across along around behind beyond
near toward towards
and or but nor so yet if then because while although though unless until whether since once
not just too very also only how when where why
s t d ll m re ve isn aren wasn weren don doesn didn hasn haven hadn won wouldn shan shouldn can cannot couldn
mustn mightn needn
please
""".split())

_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class GiftConfig(MethodConfig):
    """Config of `gift`. Neutral: `alpha = 0`. `alpha` and the layers default to the preset of the model
    (`interventions/presets/gift.json`: LLaVA-1.5-7B/13B, Qwen2-VL-7B); other models need them explicitly."""

    NAME = "gift"
    STRENGTH = "alpha"
    NEUTRAL = 0.0

    alpha: float | None = param(None, "image probabilities of the top visual heads × exp(alpha·map); None = preset",
                                "[code] configs alpha 5.0 (LLaVA-1.5-7B/13B), 4.0 (Qwen2-VL-7B)",
                                optional(number(0.0)))
    saliency_layers: tuple | None = param(None, "layers whose question rows give the gaze-shift map; None = preset",
                                          "[code] visual_saliency_computation_layers [11] / [10] / [14]",
                                          optional(int_list()))
    enhancement_layers: tuple | None = param(None, "layers whose last row is enhanced; None = preset",
                                             "[code] attention_enhancement_layers 12-22 / 14-20 / 5-18",
                                             optional(int_list()))
    content_words: str = param("auto", "question tokens kept for the map: 'spacy' POS tags, the 'stopwords' rule, "
                               "'all', or 'auto' (spacy when installed with en_core_web_sm, else stopwords)",
                               "[code] spaCy en_core_web_sm POS in CONTENT_POS; [derived] spec §3 fallback",
                               choice("auto", "spacy", "stopwords", "all"))
    empty_content_fallback: str = param("all_query_tokens", "a question without content word: use all its tokens, "
                                        "or 'disable' the sample (map 0, no enhancement)",
                                        "[derived] spec §3 (the official code gives NaN)",
                                        choice("all_query_tokens", "disable"))
    saliency_pass: str = param("auto", "where the map comes from: 'same_prefill' (needs every saliency layer before "
                               "every enhancement layer; no extra pass), 'separate' (an extra unmodified prefill, as "
                               "the official code), or 'auto' (same_prefill when possible, else separate)",
                               "[code] separate saliency pass; [derived] spec §5 same-prefill simplification",
                               choice("auto", "same_prefill", "separate"))


@register
class Gift(Method):
    """Gaze-shift saliency map + last-row cross-modal enhancement; see `GiftConfig` and the module docstring."""

    config_class = GiftConfig
    needs = frozenset({"rows", "branch"})
    needs_image_tokens = True

    def bind(self, model: ModelInfo) -> None:
        cfg: GiftConfig = self.config
        preset = _preset(model)
        missing = [n for n in ("alpha", "saliency_layers", "enhancement_layers") if getattr(cfg, n) is None]
        if missing and preset is None:
            raise ConfigError(
                f"gift: no preset for a {model.family} model with {model.num_layers} layers × {model.num_heads} heads "
                f"(presets: {_preset_names()}); pass {', '.join(missing)} explicitly"
            )
        pick = {n: preset[n] if n in missing else getattr(cfg, n)
                for n in ("alpha", "saliency_layers", "enhancement_layers")}
        saliency = layer_range(model, "gift", tuple(pick["saliency_layers"]), range(0))
        enhancement = layer_range(model, "gift", tuple(pick["enhancement_layers"]), range(0))
        in_prefill = max(saliency) < min(enhancement)
        if cfg.saliency_pass == "same_prefill" and not in_prefill:
            raise ConfigError(
                f"gift: saliency_pass='same_prefill' needs saliency_layers {sorted(saliency)} to all precede "
                f"enhancement_layers {min(enhancement)}..{max(enhancement)}; use saliency_pass='separate' or 'auto'"
            )
        if cfg.content_words == "spacy" and not _spacy_available():
            raise ConfigError("gift: content_words='spacy' needs spacy and its en_core_web_sm model installed; "
                              "use 'auto', 'stopwords' or 'all'")
        self.alpha = float(pick["alpha"])
        self.saliency_layers, self.enhancement_layers = saliency, enhancement
        self._num_heads = model.num_heads
        self._tokenizer: Any = None
        self._warned = False
        self.separate = cfg.saliency_pass == "separate" or not in_prefill
        if self.alpha == 0:
            self.touched_layers, self.branches = frozenset(), ()
        elif self.separate:
            self.touched_layers = enhancement
            self.branches = (Branch(SALIENCY, "same", "prefill", saliency),)
        else:
            self.touched_layers, self.branches = saliency | enhancement, ()
        self._map: torch.Tensor | None = None
        self._content: list[torch.Tensor] | None = None
        self._acc: dict[int, tuple[torch.Tensor, int]] = {}

    def use_tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def start_sequence(self, roles: TokenRoles) -> None:
        if self.separate and bool(roles.generated.any()):
            return  # a no-cache recompute of a generation keeps the map of its first prefill (no branch runs)
        self._map, self._content, self._acc = None, None, {}

    def saliency_map(self) -> torch.Tensor | None:
        """`ĥ` of the last prefill, `(batch, prompt_len)` in [0, 1] on image positions, 0 elsewhere (S = exp(α·ĥ));
        None before a prefill or when no sample had a question."""
        return self._map

    # ---- rows ------------------------------------------------------------------------------------------------
    def _reads_saliency(self, call: AttentionCall) -> bool:
        return call.stream == SALIENCY if self.separate else call.layer in self.saliency_layers

    def request(self, call: AttentionCall) -> RowRequest | None:
        roles = call.roles
        if self._reads_saliency(call):
            if not call.covers_prompt:
                return None
            question = roles.question.any(0)
            before = torch.cat([question[1:], question[:1] & False])  # the row before each question row
            rows = (question | before)[call.query_positions]
            return RowRequest(rows, read_only=True) if bool(rows.any()) else None
        rows = call.query_positions >= roles.prompt_len - 1
        return RowRequest(rows, blockwise=True) if bool(rows.any()) else None  # the enhancement is row by row

    def edit(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        if view.heads.numel() != self._num_heads:
            raise RuntimeError("gift needs every query head of its rows")
        if self._reads_saliency(call):
            self._accumulate(call, view)
            if call.layer == max(self.saliency_layers):
                self._finish_map(call.roles, view.logits.dtype)
        else:
            self._enhance(call, view)

    def _accumulate(self, call: AttentionCall, view: RowLogits) -> None:
        """Add the gaze shifts of this saliency layer's kept heads; no bias (the rows stay unmodified)."""
        probs = view.probs()
        row_of = torch.full((call.roles.length,), -1, dtype=torch.long, device=probs.device)
        row_of[view.rows] = torch.arange(view.rows.numel(), device=probs.device)
        if self._content is None:
            self._content = [self._content_positions(call.roles, b) for b in range(call.roles.batch_size)]
        for b, tokens in enumerate(self._content):
            if tokens.numel() == 0:
                continue
            image = call.roles.prompt_image[b].nonzero().flatten()
            a = probs[b][:, :, image]  # (heads, rows, image keys)
            shift = (a[:, row_of[tokens]] - a[:, row_of[tokens - 1]]).clamp_min(0)  # (heads, tokens, image)
            kept = shift.sum((1, 2)).topk(self._num_heads // 2).indices
            total, count = self._acc.get(b, (torch.zeros_like(shift[0, 0]), 0))
            self._acc[b] = (total + shift[kept].sum((0, 1)), count + kept.numel() * tokens.numel())

    def _finish_map(self, roles: TokenRoles, dtype: torch.dtype) -> None:
        """Mean, 3-sigma clip and min-max of each sample's accumulated shifts (a constant map gives 0)."""
        self._map = torch.zeros(roles.batch_size, roles.prompt_len, dtype=dtype, device=roles.valid.device)
        for b, (total, count) in self._acc.items():
            h = total / count
            sigma = h.std() if h.numel() > 1 else torch.zeros((), dtype=h.dtype, device=h.device)
            h = h.clamp(float(h.mean() - 3 * sigma), float(h.mean() + 3 * sigma))
            span = h.max() - h.min()
            if span > 0:
                self._map[b, roles.prompt_image[b, : roles.prompt_len]] = (h - h.min()) / span

    def _enhance(self, call: AttentionCall, view: RowLogits) -> None:
        roles, probs, k = call.roles, view.probs(), self._num_heads // 2
        length = probs.shape[-1]
        hat = torch.zeros(roles.batch_size, length, dtype=probs.dtype, device=probs.device)
        if self._map is not None:
            hat[:, : self._map.shape[1]] = self._map[:, :length]
        image = roles.prompt_image[:, None, None, :]
        question = roles.question[:, None, None, :]
        image_mass = (probs * image).sum(-1)  # (batch, heads, rows)
        visual_heads = _top_heads(image_mass, k)
        orig = (image_mass * visual_heads).sum(1)  # (batch, rows)
        new = ((probs * image * torch.exp(self.alpha * hat)[:, None, None, :]).sum(-1) * visual_heads).sum(1)
        log_scale = torch.where(orig > 0, torch.log(new / orig.where(orig > 0, 1)), 0)
        question_heads = _top_heads((probs * question).sum(-1), k)
        bias = (self.alpha * hat[:, None, None, :] * (image & visual_heads[..., None])
                + log_scale[:, None, :, None] * (question & question_heads[..., None]))
        last = (view.rows >= roles.prompt_len - 1).view(1, 1, -1, 1)
        view.add_bias(torch.where(last, bias, torch.zeros((), dtype=bias.dtype, device=bias.device)))

    # ---- content words ---------------------------------------------------------------------------------------
    def _content_positions(self, roles: TokenRoles, b: int) -> torch.Tensor:
        """Positions of the content words of sample `b`'s question (all of it as the fallback)."""
        question = roles.question[b, : roles.prompt_len].nonzero().flatten()
        mode = self.config.content_words
        if mode == "auto":
            mode = "spacy" if _spacy_available() else "stopwords"
        if mode == "all" or question.numel() == 0:
            return question
        if self._tokenizer is None or roles.ids is None:
            if not self._warned:
                logger.warning("gift: no tokenizer given (Handle.set_template(tokenizer)); every question token "
                               "counts as a content word")
                self._warned = True
            return question
        keep = content_mask(roles.ids[b, question].tolist(), self._tokenizer, mode)
        if any(keep):
            return question[torch.tensor(keep, device=question.device)]
        if self.config.empty_content_fallback == "disable":
            logger.warning("gift: sample %d's question has no content word; no enhancement for it", b)
            return question[:0]
        return question


def content_mask(ids: list[int], tokenizer: Any, mode: str = "stopwords") -> list[bool]:
    """Which of the tokens `ids` (one text span) belong to a content word.

    The tokens are decoded one prefix at a time to get each token's character span; words come from spaCy
    (`mode="spacy"`: POS in `CONTENT_POS`) or from the rule (`"stopwords"`: runs of letters/digits not in
    `STOP_WORDS`, case-insensitive). A token is content when its span overlaps a content word, as the official
    code aligns spaCy words through the tokenizer's offsets.
    """
    text, spans = "", []
    for end in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:end])
        spans.append((len(os.path.commonprefix([text, prefix])), len(prefix)))
        text = prefix
    if mode == "spacy":
        words = [(t.idx, t.idx + len(t.text)) for t in _spacy()(text) if t.pos_ in CONTENT_POS]
    else:
        words = [m.span() for m in _WORD.finditer(text) if m.group().lower() not in STOP_WORDS]
    return [start < end and any(start < w_end and end > w_start for w_start, w_end in words)
            for start, end in spans]


def _top_heads(mass: torch.Tensor, k: int) -> torch.Tensor:
    """`(batch, heads, rows)` bool: the `k` heads with the largest `mass` per sample and row."""
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(1, mass.topk(k, dim=1).indices, True)


@functools.cache
def _spacy_available() -> bool:
    return is_available("spacy") and is_available("en_core_web_sm")


@functools.cache
def _spacy() -> Any:
    import spacy

    return spacy.load("en_core_web_sm", disable=["parser", "ner"])


def _presets() -> list[dict[str, Any]]:
    return preset("gift")["presets"]


def _preset(model: ModelInfo) -> dict[str, Any] | None:
    for entry in _presets():
        if (entry["family"], entry["num_layers"], entry["num_heads"]) == (
                model.family, model.num_layers, model.num_heads):
            return entry
    return None


def _preset_names() -> str:
    return ", ".join(f"{p['model']} ({p['family']}, {p['num_layers']}×{p['num_heads']})" for p in _presets())
