"""PAI attention intervention (Liu et al., ECCV 2024): on the last query row of layers ≥ 2, raise the pre-softmax
logits of the image keys by `alpha·|z|`, in every head, at prefill and at every decode step.

"Last row" is a role, not a cache artefact: the last prompt row and every generated row, so a no-cache recompute
edits exactly the rows that were the last row at their own step (shared/specs/pai.md, conformance 6).

Logit refinement (spec §3.2, `use_cfg=True` and `gamma != 1`): a branch with its own KV cache runs each prompt
without its image (no attention edit there) and is fed the same generated tokens; the next-token scores are
`gamma·(log p_img − log p_text) + log p_text` with −inf on tokens whose `log p_img < log(cutoff) + max log p_img`.
`official_cfg_first_token_quirk=True` (spec §3.3): with CFG on, the prompt rows (the last one included, so the
first generated token and its cached keys) are not edited, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.branch import Branch
from .guidance import guidance
from ..core.rows import RowLogits
from ..errors import ConfigError
from .base import AttentionCall, Method, ModelInfo, RowRequest, register
from ..core.params import MethodConfig, boolean, number, optional, param

TEXT_ONLY = "pai:text_only"


@dataclass(frozen=True)
class PaiConfig(MethodConfig):
    """Config of `pai`. Neutral: `alpha = 0` with the text-only branch off (`use_cfg=False` or `gamma = 1`)."""

    NAME = "pai"
    STRENGTH = "alpha"
    NEUTRAL = 0.0

    alpha: float = param(0.2, "amplification of image-key logits on the last row: z + alpha·|z|",
                         "[code] LALBJ/PAI --alpha 0.2", number(0.0))
    start_layer: int = param(2, "first intervened decoder layer (0-based)", "[code] start_layer 2",
                             number(0, integer=True))
    end_layer: int | None = param(None, "end of the intervened layers, exclusive; None = number of layers",
                                  "[code] end_layer 32 for 32-layer LLaVA", optional(number(1, integer=True)))
    use_cfg: bool = param(False, "contrast with a text-only branch (the prompt without its image, no edit, own cache)",
                          "[code] CFG.py CFGLogits, --use-cfg", boolean)
    gamma: float = param(1.1, "with use_cfg: gamma·(log p_img − log p_text) + log p_text (1 = branch off)",
                         "[code] README example 1.1 (argparse default 2)", number(0.0))
    cutoff: float = param(0.1, "with use_cfg: tokens with p_img < cutoff·max p_img get −inf",
                          "[code] CFG.py plausibility cutoff 0.1", number(0.0, 1.0, hi_open=True))
    official_cfg_first_token_quirk: bool = param(False, "with use_cfg: leave the prompt rows (first token) unedited, "
                                                 "as the official code does", "[code] spec §3.3 (issue #22)", boolean)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.official_cfg_first_token_quirk and not self.use_cfg:
            raise ConfigError("pai: official_cfg_first_token_quirk=True needs use_cfg=True (the quirk is part of the "
                              "official CFG code path)")

    @property
    def cfg_active(self) -> bool:
        """True when the text-only branch runs (use_cfg and gamma != 1)."""
        return self.use_cfg and self.gamma != 1

    @property
    def is_neutral(self) -> bool:
        return self.alpha == self.NEUTRAL and not self.cfg_active


@register
class Pai(Method):
    """Last-row image-logit amplification and its text-only contrast; see `PaiConfig` and shared/specs/pai.md §3."""

    config_class = PaiConfig
    needs = frozenset({"rows", "branch"})
    needs_image_tokens = True

    def bind(self, model: ModelInfo) -> None:
        cfg: PaiConfig = self.config
        end = model.num_layers if cfg.end_layer is None else cfg.end_layer
        if not cfg.start_layer < end <= model.num_layers:
            raise ConfigError(
                f"pai: layers [{cfg.start_layer}, {end}) invalid; expected 0 <= start_layer < end_layer <= "
                f"{model.num_layers}"
            )
        self.touched_layers = frozenset() if cfg.alpha == 0 else frozenset(range(cfg.start_layer, end))
        self.branches = (Branch(TEXT_ONLY, "no_image", "every_forward"),) if cfg.cfg_active else ()
        # the quirk leaves every prompt row alone: the first edited row is the first generated one
        self._first_row_offset = 0 if cfg.official_cfg_first_token_quirk else 1

    def request(self, call: AttentionCall) -> RowRequest | None:
        rows = call.query_positions >= call.roles.prompt_len - self._first_row_offset
        return RowRequest(rows, blockwise=True) if bool(rows.any()) else None  # row by row: blocks are fine

    def edit(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        rows = (view.rows >= call.roles.prompt_len - self._first_row_offset).view(1, 1, -1, 1)
        image = call.roles.image[:, None, None, :]
        bias = self.config.alpha * view.logits.abs()
        view.add_bias(torch.where(rows & image, bias, torch.zeros((), dtype=bias.dtype, device=bias.device)))

    def combine_logits(self, branch: Branch, main: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return guidance(main, other, self.config.gamma - 1, self.config.cutoff)
