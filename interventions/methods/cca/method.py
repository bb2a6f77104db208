"""CCA, concentric causal attention (Xing et al., NeurIPS 2024), shared/specs/cca.md §3–4.

Image tokens get concentric position ids (ring index on their 2-D grid, periphery first, centre last, so the
centre ends nearest the instruction); text after an image and every generated token are shifted back by
`grid tokens - rings`; in prefill, image tokens of one grid attend to each other by ring (`ring(k) <= ring(q)`)
instead of causally. Built per sample (left padding, a different image offset per row), unlike the official code,
which broadcasts the last sample's positions and masks only sample 0 of a batch.

CCA is a training method: published numbers come from the retrained `cca-llava-1.5-7b` checkpoint run with this
patch. On a vanilla model it is a training-free, unvalidated ablation (hidden states go out of distribution).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...core.geometry import place_grids
from ...core.params import MethodConfig, boolean, param
from ...core.roles import TokenRoles
from ...errors import ConfigError, InputError
from ..base import AttentionCall, Method, ModelInfo, register
from .geometry import (
    Rings,
    build_layout,
    concentric_allowed,
    concentric_positions,
    concentric_ranks,
)


@dataclass(frozen=True)
class CcaConfig(MethodConfig):
    """Config of `cca`. No continuous strength: `enabled=False` (or both flags off) leaves the model
    bit-identical."""

    NAME = "cca"
    STRENGTH = "enabled"
    NEUTRAL = False

    enabled: bool = param(True, "apply CCA; False keeps the wrapped model bit-identical to the unwrapped one",
                          "[derived] no-op switch (spec §9)", boolean)
    remap_positions: bool = param(True, "concentric position ids for image tokens, shifted ids for later text",
                                  "[paper][code] cca_forward; spec §3", boolean)
    concentric_mask: bool = param(True, "in prefill, image tokens attend within their grid by ring",
                                  "[paper][code] cca_forward; spec §4", boolean)

    @property
    def is_neutral(self) -> bool:
        """True when disabled, or with both parts off."""
        return not self.enabled or not (self.remap_positions or self.concentric_mask)


@register
class Cca(Method):
    """Concentric position ids and concentric causal mask; see `CcaConfig`. The grids are the family adapter's
    (`Layout.fixed_grid` / `image_grids`); grids of one image (LLaVA-NeXT) or of several crops follow each other
    causally, like text."""

    config_class = CcaConfig
    needs = frozenset({"positions", "mask"})
    needs_image_family = True

    def bind(self, model: ModelInfo) -> None:
        if model.layout.multi_axis_positions:
            raise ConfigError(
                f"cca: the {model.family} family uses 3-D M-RoPE position ids (temporal, height, width), which have "
                "no 1-D position to remap; CCA is defined for 1-D RoPE only (shared/specs/cca.md §7)"
            )
        self._family_layout, self._model_config = model.layout, model.config
        self._fixed = model.layout.fixed_grid(model.config, "cca")
        self._inputs: Mapping[str, Any] = {}
        self._layout: Rings | None = None
        self.touched_layers = frozenset(range(model.num_layers))

    def read_inputs(self, inputs: Mapping[str, Any]) -> None:
        self._inputs = {key: inputs[key] for key in self._family_layout.grid_inputs if key in inputs}

    def start_sequence(self, roles: TokenRoles) -> None:
        if not self.touched_layers:
            return
        if roles.ids is None:
            raise InputError("cca needs input_ids to find the image tokens; got inputs_embeds only")
        end = roles.prompt_len  # generated image ids are text
        runs = [[(s, min(e, end)) for s, e in roles.image_spans(b) if s < end] for b in range(roles.batch_size)]
        blocks = (None if self._fixed is not None
                  else self._family_layout.image_grids(self._model_config, self._inputs, "cca"))
        placed = place_grids(self._family_layout.name, self._fixed, blocks, runs)
        self._inputs = {}
        self._layout = build_layout(roles.valid[:, : roles.prompt_len], placed)

    def positions(self, roles: TokenRoles, position_ids: torch.Tensor | None, new_len: int) -> torch.Tensor | None:
        if not self.config.remap_positions:
            return None
        return concentric_positions(self._layout, roles.valid)[:, -new_len:]

    def edit_mask(self, call: AttentionCall, allowed: torch.Tensor) -> torch.Tensor | None:
        if not self.config.concentric_mask:
            return None
        if call.first_position is not None and call.first_position >= self._layout.ring.shape[1]:
            return None  # a decode step: no image query row (known on the host, no tensor work)
        return concentric_allowed(self._layout, allowed, call.query_positions, call.roles.offset)

    def mask_ranks(self, call: AttentionCall) -> torch.Tensor | None:
        if not self.config.concentric_mask:
            return None
        return concentric_ranks(self._layout, call.query_positions.shape[0])

