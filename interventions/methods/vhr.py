"""VHR, vision-aware head reinforcement (He et al., ACL 2025, arXiv 2412.13949), to shared/specs/vhr.md §3.

At the first forward of a sequence, a prefill branch without the image records each head's output at the last
prompt position in every reinforced layer: `A(no image)`. In the main prefill, layer by layer, at the last prompt
position: `VHD = ‖A(image) − A(no image)‖₂` per head; heads whose VHD and `TA = ‖A(no image)‖²` both exceed
mean + 1·std over the layer's heads (unbiased std) get VHD 0; heads with VHD strictly above the layer's median
(numpy's: the mean of the two middle values for an even count) have their outputs scaled by `alpha` at every
position before `o_proj`, before the next layer runs, so deeper layers' VHD already sees the reinforcement. Head
sets are per sample and kept for every later step, with a KV cache or with a no-cache recompute.

Spec §7 open point, `reinforce_noimage_stream=True`: the no-image stream also gets the earlier layers' head sets;
its pass is re-run before each reinforced layer after the first (|layers| − 1 extra short passes, exact lock-step).
`selection="all_layers_upfront"` (spec §4, for comparison): VHD from unreinforced streams, via one extra pass with
the image before the reinforced one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.branch import Branch
from ..core.roles import TokenRoles
from ..errors import ConfigError
from .base import AttentionCall, Method, ModelInfo, layer_range, preset, register
from ..core.params import MethodConfig, boolean, choice, int_list, number, optional, param

NO_IMAGE = "vhr:no_image"
UPFRONT = "vhr:upfront"


@dataclass(frozen=True)
class VhrConfig(MethodConfig):
    """Config of `vhr`. Neutral: `alpha = 1` (no extra pass)."""

    NAME = "vhr"
    STRENGTH = "alpha"
    NEUTRAL = 1.0

    alpha: float = param(2.0, "scale of the selected heads' outputs before o_proj (1 = off)",
                         "[paper] §4.4 alpha = 2; [3rd-party] official aug_ratio 2.0", number(0.0))
    layers: tuple | None = param(None, "reinforced layers (0-based); None = the family preset (presets/vhr_layers.json)",
                                 "[paper] LLaVA-1.5/NeXT-7B: {1} ∪ {18..31}; other families extrapolated",
                                 optional(int_list()))
    reinforce_noimage_stream: bool = param(False, "also reinforce the no-image stream with the earlier layers' heads "
                                           "while selecting (exact lock-step: one extra short pass per layer)",
                                           "[derived] spec §7 open point; official code unavailable", boolean)
    selection: str = param("layer_by_layer", "'layer_by_layer' (paper) or 'all_layers_upfront' (VHD from "
                           "unreinforced streams, one extra pass with the image)",
                           "[paper] §3.3 step 5; [3rd-party] Qwen2.5-VL port for upfront",
                           choice("layer_by_layer", "all_layers_upfront"))


@register
class Vhr(Method):
    """Vision-aware head reinforcement; see `VhrConfig` and the module docstring."""

    config_class = VhrConfig
    needs = frozenset({"head_outputs", "branch"})
    needs_image_tokens = True

    def bind(self, model: ModelInfo) -> None:
        cfg: VhrConfig = self.config
        self.layers = layer_range(model, "vhr", cfg.layers, preset_layers(model))
        if cfg.reinforce_noimage_stream and cfg.selection == "all_layers_upfront":
            raise ConfigError("vhr: reinforce_noimage_stream=True needs selection='layer_by_layer' (upfront selection "
                              "reads unreinforced streams)")
        self.touched_layers = self.layers
        refresh = frozenset(sorted(self.layers)[1:]) if cfg.reinforce_noimage_stream else frozenset()
        self.branches = (Branch(NO_IMAGE, "no_image", "prefill", self.layers, refresh),)
        if cfg.selection == "all_layers_upfront":
            self.branches += (Branch(UPFRONT, "same", "prefill", self.layers),)
        self._reset()

    def _reset(self) -> None:
        self._heads: dict[int, torch.Tensor] = {}
        self._vhd: dict[int, torch.Tensor] = {}
        self._plain: dict[int, torch.Tensor] = {}
        self._upfront: dict[int, torch.Tensor] = {}

    def start_sequence(self, roles: TokenRoles) -> None:
        if not bool(roles.generated.any()):  # a new sequence; a no-cache recompute keeps the head sets of step 0
            self._reset()

    def edit_head_outputs(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        layer = call.layer
        if call.stream == UPFRONT:
            self._upfront[layer] = _last_prompt_row(out, call)
            return out
        if call.stream == NO_IMAGE:
            self._plain[layer] = _last_prompt_row(out, call)
            reinforce = self.config.reinforce_noimage_stream and layer in self._heads
            return self._scale(out, self._heads[layer]) if reinforce else out
        if layer not in self._heads:
            if not call.covers_prompt:
                raise RuntimeError(f"vhr: layer {layer} decodes before its prompt was seen")
            upfront = self.config.selection == "all_layers_upfront"
            self._select(layer, self._upfront[layer] if upfront else _last_prompt_row(out, call))
        return self._scale(out, self._heads[layer])

    def _select(self, layer: int, with_image: torch.Tensor) -> None:
        """Spec §3.3 steps 1–3 on `(batch, heads, head_dim)` last-position outputs."""
        plain = self._plain[layer]
        dtype = torch.promote_types(plain.dtype, torch.float32)
        vhd = (with_image.to(dtype) - plain.to(dtype)).norm(dim=-1)  # (batch, heads)
        ta = plain.to(dtype).pow(2).sum(-1)
        outlier = (vhd > vhd.mean(1, keepdim=True) + vhd.std(1, keepdim=True)) & (
            ta > ta.mean(1, keepdim=True) + ta.std(1, keepdim=True))
        score = vhd.masked_fill(outlier, 0.0)
        self._vhd[layer] = vhd
        self._heads[layer] = score > score.quantile(0.5, dim=1, keepdim=True)

    def _scale(self, out: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        factor = torch.where(heads, self.config.alpha, 1.0).to(device=out.device, dtype=out.dtype)
        return out * factor[:, None, :, None]

    def selected_heads(self) -> dict[int, torch.Tensor]:
        """Head sets of the current sequence, `{layer: (batch, num_heads) bool}` (empty before a prefill)."""
        return dict(self._heads)

    def divergence(self) -> dict[int, torch.Tensor]:
        """VHD of the current sequence before outlier zeroing, `{layer: (batch, num_heads)}`."""
        return dict(self._vhd)


def _last_prompt_row(out: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """`(batch, heads, head_dim)`: the outputs at the last prompt position (the row that predicts the first token)."""
    return out[:, call.roles.prompt_len - 1 - int(call.query_positions[0])]


def preset_layers(model: ModelInfo) -> list[int]:
    """The family's reinforced layers from `presets/vhr_layers.json`."""
    families = preset("vhr_layers")["families"]
    entry = families.get(model.family, families["default"])
    count = entry["last"] if "last" in entry else math.ceil(entry["last_fraction"] * model.num_layers)
    first = {layer for layer in entry["first"] if layer < model.num_layers}
    return sorted(first | set(range(max(0, model.num_layers - count), model.num_layers)))
