"""PAINT, Paying Attention to INformed Tokens (Arif et al., arXiv 2501.12206), to shared/specs/head_perturbation.md §5.

Dual-stream selection, once per image, from the vision tower's CLS query row (CLIP: llava, llava_next; attention
summed over heads, CLS → patch columns):
- summary tokens Σ: patches whose score in the penultimate ViT layer exceeds `Q3 + 1.5·IQR` (quartiles of the
  image's patch scores, linear interpolation): the high-norm, register-like patches;
- local tokens L: the top `local_ratio` (25 %) patches by first-ViT-layer score, minus Σ.

Edit, on the last query row (the last prompt row and every generated row) of layers `[start_layer, end_layer)`, all
heads alike: logits `z + alpha·|z|` on L and `z + beta·|z|` on Σ, as exact additive pre-softmax biases (§5.2).

The CLS rows are recomputed from the inputs of the two ViT attention modules (forward pre-hooks: the CLS query
against all keys), so the vision tower keeps its own (SDPA) kernel. LLaVA-NeXT runs the rule on every crop (each
ViT pass has its own CLS) and maps the selected patches to LLM positions through the model's own packing
(unpadding; newline features are never selected). The text-only contrastive branch (`use_cfg`, `gamma`) and the
"spatial" tokens of later versions are not implemented.

Towers without a CLS token (qwen2_vl, qwen2_5_vl, idefics3 / smolvlm, gemma3) score each LLM image token by the
attention its patches receive instead, a project extension described in `received.py`. Where each family's
tower keeps its attention and how patches merge into LLM tokens is the family adapter's (`Layout.vision_tower`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...core.params import MethodConfig, number, optional, param
from ...core.roles import TokenRoles
from ...core.rows import RowLogits
from ...errors import ConfigError, InputError
from ..base import AttentionCall, Method, ModelInfo, RowRequest, register
from .received import column_scores


@dataclass(frozen=True)
class PaintConfig(MethodConfig):
    """Config of `paint`. Neutral: `alpha = beta = 0`."""

    NAME = "paint"
    STRENGTH = "alpha"
    NEUTRAL = 0.0

    alpha: float = param(0.7, "boost of the local tokens' logits on the last row: z + alpha·|z|",
                         "[paper, 2nd-hand] 0.7; [code] hasanar1f/PAINT chair_eval.py --alpha 0.7", number(0.0))
    beta: float = param(0.4, "boost of the summary tokens' logits on the last row: z + beta·|z|",
                        "[paper, 2nd-hand] 0.4; [code] chair_eval.py --beta 0.3", number(0.0))
    local_ratio: float = param(0.25, "share of an image's patches taken as local tokens (first-layer CLS attention)",
                               "[code] clip_encoder.py update_modpai_alpha, hard-coded 0.25",
                               number(0.0, 1.0, lo_open=True))
    start_layer: int = param(2, "first intervened decoder layer (0-based)", "[code] modPAI start_layer 2",
                             number(0, integer=True))
    end_layer: int | None = param(None, "end of the intervened layers, exclusive; None = number of layers",
                                  "[code] end_layer 32 for 32-layer Vicuna", optional(number(1, integer=True)))

    @property
    def is_neutral(self) -> bool:
        """Both boosts are 0 (either alone still edits the model)."""
        return self.alpha == 0 and self.beta == 0


@register
class Paint(Method):
    """Local/summary visual-token amplification on the last row; see `PaintConfig` and the module docstring."""

    config_class = PaintConfig
    needs = frozenset({"rows", "model_hooks"})
    needs_image_tokens = True

    def bind(self, model: ModelInfo) -> None:
        cfg: PaintConfig = self.config
        self._tower = model.layout.vision_tower() if model.layout is not None else None
        if self._tower is None:
            raise ConfigError(f"paint: no token selection is defined for the {model.family} vision tower")
        end = model.num_layers if cfg.end_layer is None else cfg.end_layer
        if not cfg.start_layer < end <= model.num_layers:
            raise ConfigError(
                f"paint: layers [{cfg.start_layer}, {end}) invalid; expected 0 <= start_layer < end_layer <= "
                f"{model.num_layers}"
            )
        self.touched_layers = frozenset(range(cfg.start_layer, end))
        self._pass: _Pass | None = None
        self._passes = self._passes_before = 0
        self._sizes: Any = None  # image_sizes of the next vision pass
        self._encoded: Any = None  # the pre-encoded images a prefill receives
        self._masks: tuple[torch.Tensor, torch.Tensor] | None = None

    def install_hooks(self, model: Any) -> list[Callable[[], None]]:
        """Hooks on the tower: its pass, and the scores of its first layer (local) and of the layer the LLM's
        features come from (summary: LLaVA's penultimate CLIP layer, the last layer of the CLS-less towers)."""
        self._model = model
        try:
            tower, attentions = self._tower.find(model)
        except ConfigError as e:
            raise ConfigError(f"paint: its token selection reads the CLS token of a CLIP vision tower; {e}") from None
        # the CLS path reads no tower keyword inputs; the received path needs Qwen's grid_thw
        handles = [tower.register_forward_pre_hook(self._pass_starts, with_kwargs=not self._tower.cls_token),
                   tower.register_forward_hook(self._pass_ends)]
        streams = {0: ["local"]}
        streams.setdefault(len(attentions) + self._tower.summary_layer, []).append("summary")
        handles += [attentions[i].register_forward_pre_hook(functools.partial(self._capture, names),
                                                            with_kwargs=True)
                    for i, names in streams.items()]
        return [h.remove for h in handles]

    # A vision pass may run inside the forward (pixel_values) or before it: `generate` encodes the images first and
    # hands the tower's output object to every prefill as `mm_encoder_outputs`. Each pass is kept with that object.
    def _pass_starts(self, module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        grid = (kwargs or {}).get("grid_thw", args[1] if len(args) > 1 else None)
        self._pass = _Pass(self._sizes, {"grid_thw": grid})
        self._sizes = None

    def _capture(self, names: list[str], module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            scores = (cls_scores(module, args[0] if args else kwargs["hidden_states"]) if self._tower.cls_token
                      else torch.cat([column_scores(*call) for call in self._tower.qk(module, args, kwargs)], -1))
        for name in names:
            getattr(self._pass, name).append(scores)

    def _pass_ends(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._pass.output = weakref.ref(output)
        self._passes += 1

    def read_inputs(self, inputs: Mapping[str, Any]) -> None:
        if inputs.get("image_sizes") is not None:
            self._sizes = inputs["image_sizes"]
        self._encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        self._passes_before = self._passes

    def start_sequence(self, roles: TokenRoles) -> None:
        self._masks = None

    def selection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(local, summary)` of the last prefill, each `(batch, prompt_len)` bool over LLM positions; None before
        a prefill reached an intervened layer."""
        return self._masks

    # ---- rows ------------------------------------------------------------------------------------------------
    def request(self, call: AttentionCall) -> RowRequest | None:
        rows = call.query_positions >= call.roles.prompt_len - 1
        if not bool(rows.any()):
            return None
        if self._masks is None:
            self._masks = self._select(call.roles)
        return RowRequest(rows, blockwise=True)  # row by row: blocks are fine

    def edit(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        pad = view.logits.shape[-1] - call.roles.prompt_len
        local, summary = (torch.nn.functional.pad(m, (0, pad))[:, None, None, :] for m in self._masks)
        cfg: PaintConfig = self.config
        gain = cfg.alpha * local.to(view.logits.dtype) + cfg.beta * summary.to(view.logits.dtype)
        rows = (view.rows >= call.roles.prompt_len - 1).view(1, 1, -1, 1)
        bias = gain * view.logits.abs()
        view.add_bias(torch.where(rows, bias, torch.zeros((), dtype=bias.dtype, device=bias.device)))

    # ---- selection -------------------------------------------------------------------------------------------
    def _select(self, roles: TokenRoles) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-crop selection mapped onto the prompt's image positions (batch-major, as the model fills them)."""
        vision = self._pass
        seen = vision is not None and (self._passes > self._passes_before if self._encoded is None
                                       else vision.output() is self._encoded)
        if not seen:
            raise InputError("paint: this prompt's images were not encoded by a vision-tower pass this wrapper saw; "
                             "pass pixel_values to the wrapped model (or to its generate)")
        if not self._tower.cls_token:
            return self._select_received(roles, vision)
        local, summary = select_tokens(torch.cat(vision.local), torch.cat(vision.summary), self.config.local_ratio)
        device = roles.image.device
        source = torch.cat(self._tower.features(self._model, *local.shape, vision.image_sizes)).to(device)
        image = roles.image[:, : roles.prompt_len]
        where = image.nonzero(as_tuple=True)
        if source.numel() != where[0].numel():
            raise InputError(f"paint: the prompt has {where[0].numel()} image tokens, the vision tower produced "
                             f"{source.numel()} image features")
        masks = []
        for flags in (local, summary):
            picked = flags.flatten().to(device)[source.clamp_min(0)] & (source >= 0)
            mask = torch.zeros_like(image)
            mask[where] = picked
            masks.append(mask)
        return masks[0], masks[1]

    def _select_received(self, roles: TokenRoles, vision: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """The rule per selection unit on token scores, in the order the model fills the image positions."""
        model, tower = self._model, self._tower
        units = zip(tower.units(model, torch.cat(vision.local), vision.inputs),
                    tower.units(model, torch.cat(vision.summary), vision.inputs), strict=True)
        flags = [select_tokens(local[None], summary[None], self.config.local_ratio) for local, summary in units]
        image = roles.image[:, : roles.prompt_len]
        where = image.nonzero(as_tuple=True)
        count = sum(local.numel() for local, _ in flags)
        if count != where[0].numel():
            raise InputError(f"paint: the prompt has {where[0].numel()} image tokens, the vision tower produced "
                             f"{count} image features")
        masks = []
        for stream in range(2):
            mask = torch.zeros_like(image)
            mask[where] = torch.cat([pair[stream].flatten() for pair in flags]).to(image.device)
            masks.append(mask)
        return masks[0], masks[1]


@dataclass
class _Pass:
    """One call of the vision tower: the scores of its crops, the image sizes and tower inputs it was given, its
    output."""

    image_sizes: Any
    inputs: dict = field(default_factory=dict)
    local: list[torch.Tensor] = field(default_factory=list)
    summary: list[torch.Tensor] = field(default_factory=list)
    output: Callable[[], Any] = lambda: None


def cls_scores(attention: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """CLS → patch attention of a CLIP attention module, summed over heads: `(images, patches)`.

    Args:
        attention: a `CLIPAttention` (`q_proj`, `k_proj`, `head_dim`, `scale`).
        hidden (`torch.Tensor` of shape `(images, 1 + patches, dim)`): its input, CLS first.
    """
    n, length, _ = hidden.shape
    q = attention.q_proj(hidden[:, :1]).view(n, 1, -1, attention.head_dim).transpose(1, 2)
    k = attention.k_proj(hidden).view(n, length, -1, attention.head_dim).transpose(1, 2)
    dtype = torch.promote_types(q.dtype, torch.float32)
    logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * attention.scale  # (n, heads, 1, length)
    return logits.softmax(-1)[:, :, 0, 1:].sum(1)


def select_tokens(local_scores: torch.Tensor, summary_scores: torch.Tensor,
                  local_ratio: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """PAINT's dual-stream selection per image (or crop).

    Args:
        local_scores (`torch.Tensor` of shape `(images, patches)`): first-ViT-layer CLS → patch attention.
        summary_scores (`torch.Tensor` of shape `(images, patches)`): penultimate-layer CLS → patch attention.
        local_ratio (`float`, *optional*, defaults to `0.25`): local tokens are the top `int(patches·ratio)`.

    Returns:
        `(local, summary)` bool masks `(images, patches)`: summary = scores above `Q3 + 1.5·IQR`; local = top
        `local_ratio` of the local scores that are not summary tokens.
    """
    quartiles = torch.quantile(summary_scores, torch.tensor([0.25, 0.75], dtype=summary_scores.dtype,
                                                           device=summary_scores.device), dim=-1, keepdim=True)
    q1, q3 = quartiles[0], quartiles[1]
    summary = summary_scores > q3 + 1.5 * (q3 - q1)
    top = local_scores.topk(int(local_scores.shape[-1] * local_ratio), dim=-1).indices
    local = torch.zeros_like(summary).scatter_(-1, top, True) & ~summary
    return local, summary
