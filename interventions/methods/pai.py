"""PAI attention intervention (Liu et al., ECCV 2024): on the last query row of layers ≥ 2, raise the pre-softmax
logits of the image keys by `alpha·|z|`, in every head, at prefill and at every decode step.

"Last row" is a role, not a cache artefact: the last prompt row and every generated row, so a no-cache recompute
edits exactly the rows that were the last row at their own step (shared/specs/pai.md, conformance 6).
The text-only contrastive branch (`use_cfg`, `gamma`) is not implemented yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.rows import RowLogits
from ..errors import ConfigError
from .base import METHODS, AttentionCall, Method, ModelInfo, RowRequest
from .params import MethodConfig, number, optional, param


@dataclass(frozen=True)
class PaiConfig(MethodConfig):
    """Config of `pai`. Neutral: `alpha = 0`."""

    NAME = "pai"
    STRENGTH = "alpha"
    NEUTRAL = 0.0

    alpha: float = param(0.2, "amplification of image-key logits on the last row: z + alpha·|z|",
                         "[code] LALBJ/PAI --alpha 0.2", number(0.0))
    start_layer: int = param(2, "first intervened decoder layer (0-based)", "[code] start_layer 2",
                             number(0, integer=True))
    end_layer: int | None = param(None, "end of the intervened layers, exclusive; None = number of layers",
                                  "[code] end_layer 32 for 32-layer LLaVA", optional(number(1, integer=True)))


@METHODS.register("pai")
class Pai(Method):
    """Last-row image-logit amplification; see `PaiConfig` and shared/specs/pai.md §3.1."""

    config_class = PaiConfig
    needs = frozenset({"rows"})
    needs_image_tokens = True

    def bind(self, model: ModelInfo) -> None:
        cfg: PaiConfig = self.config
        if not model.has_images:
            raise ConfigError(f"pai needs image tokens, and the {model.family} family has none (text-only model)")
        end = model.num_layers if cfg.end_layer is None else cfg.end_layer
        if not cfg.start_layer < end <= model.num_layers:
            raise ConfigError(
                f"pai: layers [{cfg.start_layer}, {end}) invalid; expected 0 <= start_layer < end_layer <= "
                f"{model.num_layers}"
            )
        self.touched_layers = frozenset() if cfg.is_neutral else frozenset(range(cfg.start_layer, end))

    def request(self, call: AttentionCall) -> RowRequest | None:
        rows = call.query_positions >= call.roles.prompt_len - 1
        return RowRequest(rows) if bool(rows.any()) else None

    def edit(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        rows = (view.rows >= call.roles.prompt_len - 1).view(1, 1, -1, 1)
        image = call.roles.image[:, None, None, :]
        bias = self.config.alpha * view.logits.abs()
        view.add_bias(torch.where(rows & image, bias, torch.zeros((), dtype=bias.dtype, device=bias.device)))
