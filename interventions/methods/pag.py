"""Head-level perturbation guidance (HeadHunter / SoftPAG, Ahn, Kang et al., arXiv 2506.10978) ported to LLM/VLM
decoding, to shared/specs/head_perturbation.md §3.

A branch with its own KV cache runs the same inputs with the selected (layer, query head) pairs' attention
interpolated toward a target, `A' = (1−u)·A + u·T`, written on the head outputs so that no probabilities are needed:
- `identity` (SoftPAG, T = I): `O' = (1−u)·O + u·V_self`, the value at the query's own position (its KV head, GQA);
- `uniform` (T = U, uniform over the visible keys): `O' = (1−u)·O + u·mean(V over the keys the row may see)`.
The guided next-token scores are `l + w·(l − l_pert)` on log-probabilities, with −inf on tokens whose
`log p < log(cutoff) + max log p` (`methods.guidance`). The original stream is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.branch import Branch
from .guidance import guidance
from ..core.rows import allowed_keys
from ..errors import ConfigError
from .base import AttentionCall, Method, ModelInfo, register
from ..core.params import MethodConfig, choice, head_list, number, optional, param

PERTURBED = "pag:perturbed"


@dataclass(frozen=True)
class PagConfig(MethodConfig):
    """Config of `pag`. Neutral: `w = 0` or `u = 0` (no perturbed branch). `heads` is required (a head list from
    `interventions calibrate perturb-heads`, or any list of `[layer, head]` pairs)."""

    NAME = "pag"
    STRENGTH = "w"
    NEUTRAL = 0.0

    w: float = param(1.0, "guidance weight: l + w·(l − l_perturbed) on log-probabilities (0 = off)",
                     "[derived] spec §3.2; project default 1.0 (= PAI gamma 2); SD3 3.0, FLUX 8.0 in the paper",
                     number(0.0))
    u: float = param(0.5, "interpolation toward the target in the perturbed branch: (1−u)·A + u·T (0 = off)",
                     "[paper] SoftPAG Eq. 7; u = 0.5 best with k = 9 heads (Fig. 11)", number(0.0, 1.0))
    heads: tuple | None = param(None, "perturbed (layer, query head) pairs, a {layer: [heads]} mapping or a JSON file "
                                "(e.g. the output of `interventions calibrate perturb-heads`)",
                                "[code] perturb_heads; [paper] Alg. 1 HeadHunter search", optional(head_list))
    target: str = param("identity", "attention target T: 'identity' (SoftPAG) or 'uniform' over the visible keys",
                        "[paper] Eq. 7 and App. C; identity most robust (Table 2)", choice("identity", "uniform"))
    cutoff: float = param(0.1, "adaptive plausibility cutoff: tokens with p < cutoff·max p get −inf (0 = none)",
                          "[derived] spec §3.2, as contrastive decoding / PAI", number(0.0, 1.0, hi_open=True))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heads is None or not self.heads:
            raise ConfigError("pag: heads is required: a list of [layer, head] pairs, a {layer: [heads]} mapping or a "
                              "JSON file from `interventions calibrate perturb-heads`")

    @property
    def is_neutral(self) -> bool:
        return self.w == 0 or self.u == 0


@register
class Pag(Method):
    """Perturbed-branch guidance with head-level attention perturbation; see `PagConfig`."""

    config_class = PagConfig
    needs = frozenset({"head_outputs", "branch"})

    def bind(self, model: ModelInfo) -> None:
        cfg: PagConfig = self.config
        bad = [p for p in cfg.heads if p[0] >= model.num_layers or p[1] >= model.num_heads]
        if bad:
            raise ConfigError(f"pag: heads {bad[:5]} out of range; this model has {model.num_layers} layers of "
                              f"{model.num_heads} query heads")
        per_layer: dict[int, list[int]] = {}
        for layer, head in cfg.heads:
            per_layer.setdefault(layer, []).append(head)
        self._heads = {layer: torch.tensor(heads) for layer, heads in per_layer.items()}
        self._groups = model.num_heads // model.num_kv_heads
        self.branches = (Branch(PERTURBED, "same", "every_forward", frozenset(per_layer)),)

    def edit_head_outputs(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        heads = self._heads[call.layer].to(out.device)
        value = call.value[:, torch.div(heads, self._groups, rounding_mode="floor")]  # (batch, heads, kv_len, dim)
        if self.config.target == "identity":
            target = value[:, :, call.query_positions]
        else:
            batch, q_len = out.shape[:2]
            allowed, _ = allowed_keys(call.attention_mask, batch, q_len, value.shape[2], out.device)
            weights = allowed.to(value.dtype)
            target = torch.matmul(weights / weights.sum(-1, keepdim=True).clamp_min(1), value)
        u = self.config.u
        out = out.clone()
        out[:, :, heads] = (1 - u) * out[:, :, heads] + u * target.transpose(1, 2).to(out.dtype)
        return out

    def combine_logits(self, branch: Branch, main: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return guidance(main, other, self.config.w, self.config.cutoff)
