"""SGRS, saliency-guided rejection sampling (*Hallucination Begins Where Saliency Drops*, ICLR 2026, §3.1, Eqs. 4-7,
Alg. 1), exact to shared/specs/sgrs_locore.md §2-§5.

At each step, candidates come from the top-K of the next-token scores; a drawn candidate c is accepted when its
saliency 𝒮(c) ≥ α · mean 𝒮 of the sample's last W accepted tokens, else it is removed and another is drawn, R draws
at most; then the top-K candidate of highest saliency is taken. 𝒮(c): on each target layer, the attention row A of
the query that predicts c (the newest position), S = |A ⊙ ∂L/∂A| with L = −log p(c), mean over heads, divided by its
L2 norm over keys, averaged over the keys J after the sample's last image token (template and image-boundary tokens
excluded, generated tokens included, up to the row itself; 1 when J is empty), then averaged over the layers.

Computed exactly and cheaply: A is the same for every candidate of a step, so each step runs one forward with
gradients enabled, in which the target layers hand over their last row's final probabilities as an autograd leaf
(core `grad` row requests: the forward's values stay the base backend's bit for bit), then one backward from
−log p(c) per evaluated candidate (all samples of the batch at once). The first step re-feeds the last prompt token
after `Cache.crop(-1)` (one extra one-token forward; sliding-window cache layers record their past for it) instead of
differentiating the whole prefill; the prompt's images are never re-encoded. The cache is detached after each step.
Plain forwards of the wrapped model are untouched (`model(**inputs)` is bit-identical). Cost per step: the backward
runs through every layer after the first target layer and the LM head, so a step costs about twice an unmodified
one when the first draw is accepted (SmolLM2-135M, CPU: 1.8-2.0×); a fallback step runs K backwards (each candidate
once: the rejected ones' saliencies are reused).

Differences from the released code (`do_reject_sample.py`): it reads the saliency on the candidate's own row, whose
gradient with respect to a loss on the previous position is exactly zero, so 𝒮 ≡ 0, τ = 0 and nothing is ever
rejected (it is top-5 sampling); this module uses the predicting row, as the paper defines. The code also adds the
fallback token's saliency to the history (`history_includes_fallback=True` here; default False: accepted tokens
only), runs a full uncached forward (image re-encoded) and three backwards per candidate, and J starts at the
constant 35 + 576 (here: from token roles, per sample). Observed: 𝒮 tends to shrink as J grows, so a history that
stops updating keeps τ high; on SmolLM2 at α 0.9 (16 tokens) every step from the third fell back with the default,
5 of 16 with `history_includes_fallback=True`.

Decoding: with `do_sample=True` the draws are multinomial over the candidates' renormalised probabilities after
`generate`'s own logits processors (temperature 1 by default, as in the paper); with `do_sample=False` they are taken
in decreasing score order (deterministic SGRS; α = 0 is then greedy decoding). α = 0 is plain top-K sampling and
computes no saliency. `seed` makes runs reproducible from the config; `seed=None` draws from torch's global
generator exactly as transformers' sampling does. Beam search is not supported.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ...core.branch import MAIN
from ...core.params import MethodConfig, boolean, int_list, number, optional, param
from ..base import (
    AttentionCall,
    Method,
    ModelInfo,
    RowRequest,
    layer_range,
    preset,
    register,
)

#: target layers per model (official code default for LLaVA-1.5-7B, else a relative depth), with sources


@dataclass(frozen=True)
class SgrsConfig(MethodConfig):
    """Config of `sgrs`. Neutral: `alpha = 0` (plain top-K sampling; forward logits are never changed)."""

    NAME = "sgrs"
    STRENGTH = "alpha"
    NEUTRAL = 0.0

    alpha: float = param(0.6, "threshold sensitivity: accept c when S(c) >= alpha * mean S of the last `window` "
                         "accepted tokens; 0 = plain top-K sampling", "[paper] §3.1, 0.6 recommended (0.9 stronger); "
                         "[code] --sgrs_alpha 0.6", number(0.0))
    top_k: int = param(5, "K: candidates per step (the top-K of the scores)", "[paper] K; [code] --sgrs_top_k 5",
                       number(1, integer=True))
    retries: int = param(3, "R: candidates drawn per step before the fallback (the first draw included)",
                         "[paper] R; [code] --sgrs_max_resample 3 (a loop of R draws)", number(1, integer=True))
    window: int = param(5, "W: the threshold averages the saliency of the last W accepted tokens",
                        "[paper] W; [code] --sgrs_history_window 5", number(1, integer=True))
    layers: tuple | None = param(None, "target layers of the saliency; None = preset (LLaVA-1.5-7B: 6, 7, 8; other "
                                 "models: relative depth 0.1875..0.25)", "[code] --sgrs_target_layers [6, 7, 8]; "
                                 "presets/sgrs_layers.json", optional(int_list()))
    seed: int | None = param(0, "per-sample generators derived from this seed and each prompt (a prompt draws the "
                             "same tokens alone or in a batch); None = torch's global generator, as transformers",
                             "[derived] reproducibility", optional(number(0, integer=True)))
    history_includes_fallback: bool = param(False, "also add a fallback token's saliency to the history",
                                            "[spec] §3 project choice: no; [code] yes", boolean)


@register
class Sgrs(Method):
    """Saliency-guided rejection sampling in the user's `generate`; see `SgrsConfig` and the module docstring."""

    config_class = SgrsConfig
    needs = frozenset({"rows", "decoding_loop"})
    #: the first step re-feeds the last prompt token after `Cache.crop(-1)`
    rolls_back_cache = True

    def bind(self, model: ModelInfo) -> None:
        cfg: SgrsConfig = self.config
        self.layers = layer_range(model, "sgrs", cfg.layers, preset_layers(model.family, model.num_layers))
        self.touched_layers = self.layers
        self._probes: dict[int, tuple[torch.Tensor, AttentionCall]] | None = None
        #: counts of the last `generate`, summed over the batch: steps, rejected candidates, fallbacks
        self.stats: dict[str, int] = {}

    @contextlib.contextmanager
    def probing(self) -> Iterator[dict[int, tuple[torch.Tensor, AttentionCall]]]:
        """Collect, for the forwards run inside, each target layer's newest-row probabilities (an autograd leaf)."""
        self._probes = {}
        try:
            with torch.enable_grad():
                yield self._probes
        finally:
            self._probes = None

    def request(self, call: AttentionCall) -> RowRequest | None:
        if self._probes is None or call.stream != MAIN:
            return None
        rows = torch.zeros(call.query_positions.shape[0], dtype=torch.bool, device=call.query_positions.device)
        rows[-1] = True
        return RowRequest(rows, read_only=True, grad=True)

    def grad_probs(self, call: AttentionCall, probs: torch.Tensor, request: RowRequest) -> None:
        if self._probes is not None:
            self._probes[call.layer] = (probs, call)

    def decoding_loop(self, model: Any, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        from .loop import generate

        return generate(self, model, input_ids, **kwargs)


class CandidateSaliency:
    """𝒮 of candidates at one step, from the step's probing forward: call it with one token per sample.

    Args:
        probes: per target layer, the newest row's probabilities `(batch, heads, 1, kv_len)` (autograd leaves) and
            the attention call they come from.
        logits (`torch.Tensor` of shape `(batch, vocab)`): the same forward's next-token logits (with their graph).
    """

    def __init__(self, probes: dict[int, tuple[torch.Tensor, AttentionCall]], logits: torch.Tensor) -> None:
        layers = sorted(probes)
        self.leaves = [probes[layer][0] for layer in layers]
        self.log_p = torch.log_softmax(logits.float(), dim=-1)
        self.keys = history_keys(probes[layers[0]][1])  # J: the same roles and query in every layer

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """𝒮 of `tokens` `(batch,)`, one candidate per sample, as `(batch,)` float32."""
        loss = -self.log_p.gather(1, tokens[:, None].to(self.log_p.device)).sum()  # samples are independent
        grads = torch.autograd.grad(loss, self.leaves, retain_graph=True)
        per_layer = []
        for probs, grad in zip(self.leaves, grads):
            s = (probs * grad).abs()[:, :, -1].float().mean(1)  # (batch, kv_len)
            s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-9)
            keys = self.keys.to(s.device)
            count = keys.sum(-1)
            mean = (s * keys).sum(-1) / count.clamp_min(1)
            per_layer.append(torch.where(count > 0, mean, torch.ones_like(mean)).to(tokens.device))  # empty J: 1
        return torch.stack(per_layer).mean(0)


def history_keys(call: AttentionCall) -> torch.Tensor:
    """J per sample, `(batch, kv_len)` bool: valid keys after the sample's last image token up to the newest query,
    without template and image-boundary tokens (the paper's Sys_L + Img_L ≤ j ≤ P, from token roles)."""
    roles = call.roles
    keys = torch.arange(roles.length, device=roles.valid.device)
    newest = call.query_positions[-1].to(keys.device)
    return roles.valid & ~roles.template & roles.after_last_image() & (keys <= newest)


def preset_layers(family: str, num_layers: int) -> range | list[int]:
    """Target layers of the preset for this family and depth, else the default relative depth."""
    layers = preset("sgrs_layers")
    entry = layers["families"].get(family)
    if entry is not None and entry["num_layers"] == num_layers:
        return entry["layers"]
    default = layers["default"]
    first = math.floor(default["first_fraction"] * num_layers + 0.5)
    last = math.floor(default["last_fraction"] * num_layers + 0.5)
    return range(min(first, num_layers - 1), min(last, num_layers - 1) + 1)
