"""VAR, visual attention redistribution (Kang et al., *See What You Are Told: Visual Attention Sink in Large
Multimodal Models*, ICLR 2025), exact to shared/specs/var.md §3 and §5.

Step A: a token is a sink of layer l when `phi(x) = max_{d in sink_dims} |x_d| / RMS(x) >= tau` on its input hidden
state to layer l (RMS without the learned norm weight, eps 1e-6; generated tokens are tested at their own step).
Step B: on each text row after the first image token, each head is image-centric when its visual mass is at least
`min_visual_mass` and its visual non-sink ratio is at least `rho`. Step C: in those (head, row) pairs a fraction `p`
of the attention on every sink (text and visual) goes to the visual non-sinks in proportion. That is the exact
pre-softmax bias `log(1-p)` on sinks and `log(1 + Omega/S_ns)` on visual non-sinks (the row's normaliser is
unchanged), with the masses taken from the unmodified row. Layers 2..L-2 by default (the paper excludes the last).

`compat="official"` reproduces seilk/VisAttnSink@98e62d6 (spec §4): strict `phi > tau`, sinks frozen after the
prefill, nothing selected in a layer without visual sinks, the last layer modified, the code's head test
`S_vis_sink / (S_vis + n_vis·1e-6) <= 1 - rho`, and p defaulting to 0.4 (the code's `p: 0.6` is the kept
fraction). `p` and `rho` always use the paper's conventions (recycled fraction, non-sink ratio).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.roles import TokenRoles
from ..core.rows import RowLogits
from ..errors import ConfigError
from .base import AttentionCall, Method, ModelInfo, RowRequest, layer_range, preset, register
from ..core.params import MethodConfig, choice, int_list, number, optional, param

#: sink dims per language model, with sources
#: rho per task profile ([paper, 2nd-hand] §5: hallucination 0.5, general vision-language 0.8, vision-centric 0.9)
PROFILES = {"hallucination": 0.5, "general": 0.8, "vision": 0.9}
#: recycled fraction p by default: paper 0.6; the official code's `p: 0.6` keeps 0.6, i.e. recycles 0.4
DEFAULT_P = {"paper": 0.6, "official": 0.4}
RMS_EPS = 1e-6
#: the official code's per-image-token epsilon in the denominator of its head test
OFFICIAL_EPS = 1e-6


def sink_dim_list(method: str, name: str, value: Any) -> Any:
    """Sink dims: a list of ints, or a path to a JSON file holding one (optionally under `"sink_dims"`, as
    `interventions calibrate sink-dims` writes it). Returned as a sorted tuple, so configs stay data."""
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value) as f:
                value = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{method}: {name}: cannot read sink dims file {str(value)!r}: {e}") from e
        if isinstance(value, Mapping):
            if "sink_dims" not in value:
                raise ConfigError(f"{method}: {name}: the JSON file has no 'sink_dims' key (keys: {sorted(value)})")
            value = value["sink_dims"]
    return int_list()(method, name, value)


@dataclass(frozen=True)
class VarConfig(MethodConfig):
    """Config of `var`. Neutral: `p = 0`. `p` and `rho` default per `compat` and `profile`."""

    NAME = "var"
    STRENGTH = "p"
    NEUTRAL = 0.0

    p: float | None = param(None, "fraction of the sink attention recycled to visual non-sinks; None = 0.6 (paper), "
                            "0.4 with compat='official'", "[paper] p=0.6 recycled (author, issue #5); [code] p: 0.6 "
                            "kept", optional(number(0.0, 1.0, hi_open=True)))
    rho: float | None = param(None, "a (head, row) is image-centric when its visual non-sink ratio >= rho; None = "
                              "the profile's value", "[paper] 0.5 hallucination, 0.8 general, 0.9 vision-centric",
                              optional(number(0.0, 1.0, lo_open=True)))
    profile: str = param("hallucination", "task type giving the default rho (0.5 / 0.8 / 0.9)", "[paper] §5",
                         choice(*PROFILES))
    tau: float = param(20.0, "sink test: max over sink_dims of |x_d|/RMS(x) >= tau at the layer's input",
                       "[paper] tau=20; [code] tau=20 (strict >)", number(0.0, lo_open=True))
    sink_dims: tuple | None = param(None, "hidden dims with massive activations: a list, or a JSON file written by "
                                    "`interventions calibrate sink-dims`; None = the model's preset",
                                    "[code] DIM_SINK; [paper] App. A.1; presets/var_sink_dims.json",
                                    optional(sink_dim_list))
    min_visual_mass: float = param(0.2, "a (head, row) needs at least this attention on image tokens",
                                   "[paper] 0.2; [code] summ=0.2", number(0.0, 1.0))
    layers: tuple | None = param(None, "decoder layers to edit; None = 2..L-2 (paper), 2..L-1 with compat='official'",
                                 "[paper] last layer excluded; [code] range(2, L)", optional(int_list()))
    compat: str = param("paper", "'official' reproduces the released code (spec §4)", "[code] seilk/VisAttnSink",
                        choice("paper", "official"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.p is None:
            object.__setattr__(self, "p", DEFAULT_P[self.compat])
        if self.rho is None:
            object.__setattr__(self, "rho", PROFILES[self.profile])


@register
class Var(Method):
    """Visual attention redistribution; see `VarConfig`."""

    config_class = VarConfig
    needs = frozenset({"rows", "layer_inputs"})
    needs_image_tokens = True

    def bind(self, model: ModelInfo) -> None:
        cfg: VarConfig = self.config
        self._official = cfg.compat == "official"
        if cfg.sink_dims is not None:
            self.dims, self._hidden_size = cfg.sink_dims, None
        else:
            self.dims, self._hidden_size = preset_sink_dims(model)
        last = model.num_layers if self._official else model.num_layers - 1
        layers = layer_range(model, "var", cfg.layers, range(2, last))
        if not layers:
            raise ConfigError(f"var: no layer to edit: the default layers 2..{last - 1} are empty for a "
                              f"{model.num_layers}-layer model; pass layers=[...]")
        self.touched_layers = layers
        self._sinks: dict[int, torch.Tensor] = {}

    def start_sequence(self, roles: TokenRoles) -> None:
        self._sinks = {}
        # each sample's first image position (generated tokens are text, so it holds for the whole sequence)
        keys = torch.arange(roles.length, device=roles.image.device)
        self._first_image = torch.where(roles.image, keys, torch.iinfo(torch.long).max).amin(1, keepdim=True)

    def sinks(self) -> dict[int, torch.Tensor]:
        """Sink tokens of the current sequence, `{layer: (batch, length) bool}` (text and visual)."""
        return dict(self._sinks)

    # ---- step A: sink tokens from the layer's input hidden states -----------------------------------------------
    def on_layer_input(self, layer: int, hidden: torch.Tensor, roles: TokenRoles) -> None:
        self._check_hidden_size(hidden.shape[-1])
        start = roles.length - hidden.shape[1]
        phi = sink_scores(hidden, self.dims)
        found = phi > self.config.tau if self._official else phi >= self.config.tau
        found &= roles.valid[:, start:]
        if self._official:  # the released code tests the prompt only
            found &= torch.arange(start, roles.length, device=found.device) < roles.prompt_len
        if start == 0:
            self._sinks[layer] = found
        elif layer not in self._sinks:
            raise RuntimeError(f"var: layer {layer} decodes before its prompt was seen")
        else:
            self._sinks[layer] = torch.cat([self._sinks[layer][:, :start], found], 1)

    def _check_hidden_size(self, size: int) -> None:
        if self._hidden_size is not None and size != self._hidden_size:
            raise ConfigError(f"var: the sink_dims preset is for hidden size {self._hidden_size}, this model has "
                              f"{size}; find its dims with `interventions calibrate sink-dims` and pass sink_dims")
        if max(self.dims) >= size:
            raise ConfigError(f"var: sink_dims {list(self.dims)} out of range for hidden size {size}")

    # ---- steps B and C: rows, head selection, redistribution as a bias ------------------------------------------
    def _text_after_image(self, roles: TokenRoles, positions: torch.Tensor) -> torch.Tensor:
        """`(batch, len(positions))` bool: valid non-image positions after the sample's first image token."""
        return roles.valid[:, positions] & ~roles.image[:, positions] & (positions[None] > self._first_image)

    def request(self, call: AttentionCall) -> RowRequest | None:
        rows = self._text_after_image(call.roles, call.query_positions).any(0)
        return RowRequest(rows, blockwise=True) if bool(rows.any()) else None  # each row's edit reads that row

    def edit(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        cfg: VarConfig = self.config
        roles, kv_len = call.roles, view.logits.shape[-1]
        sinks = self._sinks[call.layer][:, :kv_len]
        sinks = torch.nn.functional.pad(sinks, (0, kv_len - sinks.shape[1]))[:, None, None, :]  # (batch,1,1,kv)
        image = roles.image[:, None, None, :]
        visual_non_sink = image & ~sinks
        probs = view.probs()
        # the rows' mass on each key set at once: (batch, heads, rows, sets)
        sets = [image, visual_non_sink, sinks] + ([image & sinks] if self._official else [])
        masses = torch.matmul(probs, torch.stack(sets, -1)[:, :, 0].to(probs.dtype)).unbind(-1)
        s_vis, s_ns, s_sink = masses[:3]
        if self._official:
            s_vis_sink = masses[3]
            n_vis = image.sum(-1)
            centric = s_vis_sink / (s_vis + n_vis * OFFICIAL_EPS) <= 1 - cfg.rho
            centric &= (image & sinks).any(-1)  # the code selects nothing in a layer without visual sinks
        else:
            centric = s_ns / s_vis.clamp_min(torch.finfo(s_vis.dtype).tiny) >= cfg.rho
        selected = centric & (s_vis >= cfg.min_visual_mass) & (s_ns > 0)
        selected &= self._text_after_image(roles, view.rows)[:, None, :]
        boost = torch.log1p(cfg.p * s_sink / s_ns.clamp_min(torch.finfo(s_ns.dtype).tiny))[..., None]
        zero = torch.zeros((), dtype=probs.dtype, device=probs.device)
        bias = torch.where(sinks, torch.full((), math.log1p(-cfg.p), dtype=probs.dtype, device=probs.device), zero)
        bias = torch.where(visual_non_sink, boost, bias)
        view.add_bias(torch.where(selected[..., None], bias, zero))


def rms_ratio(hidden: torch.Tensor) -> torch.Tensor:
    """`|x_d| / RMS(x)` per channel, `RMS(x) = sqrt(mean(x²) + 1e-6)` without the learned norm weight, in float32 or
    wider; same shape as `hidden`."""
    x = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    return x.abs() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def sink_scores(hidden: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """`phi(x) = max_{d in dims} |x_d| / RMS(x)`, `(batch, q_len)` from `(batch, q_len, hidden)`."""
    return rms_ratio(hidden)[..., list(dims)].amax(-1)


def preset_sink_dims(model: ModelInfo) -> tuple[tuple[int, ...], int]:
    """`(sink dims, hidden size)` of the preset matching the model's family and decoder shape, or a `ConfigError`
    saying how to find them."""
    entries = preset("var_sink_dims")["models"]
    shape = (model.family, model.num_layers, model.num_heads, model.num_kv_heads)
    for entry in entries:
        if (entry["family"], entry["num_layers"], entry["num_heads"], entry["num_kv_heads"]) == shape:
            return tuple(entry["sink_dims"]), entry["hidden_size"]
    raise ConfigError(
        f"var: no sink_dims preset for this model ({model.family}, {model.num_layers} layers, {model.num_heads} "
        f"heads, {model.num_kv_heads} key/value heads; presets: {', '.join(e['name'] for e in entries)}). Find its "
        "massive-activation dims with `interventions calibrate sink-dims --model <id> --output dims.json` (or "
        "evals.calibrate.sink_dims.find_sink_dims) and pass sink_dims='dims.json', or pass sink_dims=[...]"
    )
