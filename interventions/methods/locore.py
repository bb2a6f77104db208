"""LocoRE, local coherence reinforcement (*Hallucination Begins Where Saliency Drops*, ICLR 2026, §3.1.1, Eqs. 8-10,
Alg. 2), exact to shared/specs/sgrs_locore.md §6.

At each decoding step, the newest query's attention to the `window` most recent context tokens after the image
(keys j with 1 <= q - j <= window and j past the sample's last image token) is multiplied by `1 + beta` and the row
renormalised: exactly the pre-softmax bias `log(1 + beta)` on those keys, in every head of every decoder layer.

Decode rows are a role, not a cache artefact: every generated row (position >= prompt length) is edited, so a
no-cache recompute edits exactly the rows that were the newest at their own step. The paper gives no window size:
the default 5 is a project choice (a phrase-sized neighbourhood, the size of SGRS's history window W = 5; sweep 3-10).
The unnormalised post-softmax reading of "×(1+β)" is not offered (it is not a softmax of biased logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.roles import TokenRoles
from ..core.rows import RowLogits
from .base import AttentionCall, Method, ModelInfo, RowRequest, layer_range, preset, register
from ..core.params import MethodConfig, boolean, int_list, number, optional, param

#: `beta` for families without a preset: the paper's main model, LLaVA-1.5
DEFAULT_BETA = 0.15


@dataclass(frozen=True)
class LocoreConfig(MethodConfig):
    """Config of `locore`. Neutral: `beta = 0`."""

    NAME = "locore"
    STRENGTH = "beta"
    NEUTRAL = 0.0

    beta: float | None = param(None, "gain on the window keys (attention ×(1+beta), renormalised); None = the "
                               "family's preset (llava 0.15, qwen2_vl 0.20), else 0.15",
                               "[paper] Table 3 caption: 0.15 LLaVA-1.5, 0.20 Qwen2-VL", optional(number(0.0)))
    window: int = param(5, "w_s: keys at distance 1..window from the newest query are reinforced",
                        "[derived] not given in the paper; project choice, sweep 3-10", number(1, integer=True))
    include_self: bool = param(False, "also reinforce the query's own key (distance 0)",
                               "[derived] off-by-one reading of (P - j) <= w_s", boolean)
    apply_on_prefill_last_row: bool = param(False, "also edit the last prompt row (it predicts the first token)",
                                            "[paper] Alg. 2 runs after a token is accepted, so off", boolean)
    layers: tuple | None = param(None, "decoder layers to edit; None = all",
                                 "[derived] Alg. 2 takes no layer argument", optional(int_list()))


@register
class Locore(Method):
    """Recent-context gain on decode rows; see `LocoreConfig`."""

    config_class = LocoreConfig
    needs = frozenset({"rows"})

    def bind(self, model: ModelInfo) -> None:
        cfg: LocoreConfig = self.config
        self.beta = cfg.beta if cfg.beta is not None else family_beta(model.family)
        layers = layer_range(model, "locore", cfg.layers, range(model.num_layers))
        self.touched_layers = layers
        self._first_row_offset = 1 if cfg.apply_on_prefill_last_row else 0

    @property
    def is_neutral(self) -> bool:
        """`beta` as resolved at bind (given, or the family preset) is 0."""
        return self.beta == 0

    def start_sequence(self, roles: TokenRoles) -> None:
        # J starts after the sample's last image token (Sys_L + Img_L); 0 without an image. Generated tokens are
        # text, so the prompt's value holds for the whole sequence
        keys = torch.arange(roles.length, device=roles.image.device)
        self._text_start = torch.where(roles.image, keys, -1).amax(1) + 1  # (batch,)

    def _edited(self, positions: torch.Tensor, prompt_len: int) -> torch.Tensor:
        return positions >= prompt_len - self._first_row_offset

    def request(self, call: AttentionCall) -> RowRequest | None:
        rows = self._edited(call.query_positions, call.roles.prompt_len)
        return RowRequest(rows, blockwise=True) if bool(rows.any()) else None  # row by row: blocks are fine

    def edit(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        cfg: LocoreConfig = self.config
        roles = call.roles
        keys = torch.arange(roles.length, device=view.rows.device)
        distance = view.rows[:, None] - keys[None, :]  # (rows, kv_len)
        window = (distance >= (0 if cfg.include_self else 1)) & (distance <= cfg.window)
        window &= self._edited(view.rows, roles.prompt_len)[:, None]
        where = window[None] & (keys[None, None, :] >= self._text_start[:, None, None])  # (batch, rows, kv_len)
        view.add_bias(where[:, None].to(view.logits.dtype) * math.log1p(self.beta))


def family_beta(family: str) -> float:
    """`beta` of the family's preset (paper Table 3), or `DEFAULT_BETA`."""
    families = preset("locore_beta")["families"]
    return float(families[family]["beta"]) if family in families else DEFAULT_BETA
