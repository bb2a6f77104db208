"""ACT, attention calibration of hidden sinks (Yu et al., ICML 2024), exact to shared/specs/act.md §3.

In each selected (layer, query head): sink keys are those whose mean attention over the prompt rows that can see
them exceeds `threshold`; the first detected sink is kept; the other sinks' probabilities are scaled by `beta`
and the freed mass goes to the non-sink keys in proportion. Implemented as the exact per-row pre-softmax bias
`log(beta·(1-m)/(1-beta·m))` on the sink keys (m = the row's sink mass), not the static `log beta` shortcut.
Decode (`reuse_prefill_sinks`): the prompt's sink set is kept and every generated row is calibrated with its own m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.roles import TokenRoles
from ..core.rows import RowLogits
from ..errors import ConfigError
from .base import AttentionCall, Method, ModelInfo, RowRequest, layer_range, register
from ..core.params import MethodConfig, choice, head_list, int_list, number, optional, param


@dataclass(frozen=True)
class ActConfig(MethodConfig):
    """Config of `act`. Neutral: `beta = 1`. Give `heads` (a searched head list) or `layers` (all their heads);
    with neither, all heads of layers 2..L-2 (the official code's 2..30 for 32 layers)."""

    NAME = "act"
    STRENGTH = "beta"
    NEUTRAL = 1.0

    beta: float = param(0.4, "scale of the non-first sink probabilities (1 = off, 0 = remove them)",
                        "[code] GATECH-EIC/ACT scripts BETA=0.4", number(0.0, 1.0))
    threshold: float = param(0.1, "a key is a sink when its causal column-mean attention exceeds this",
                             "[code] THRES=0.1 (absolute column mean; spec §3.1)", number(0.0, 1.0, lo_open=True))
    heads: tuple | None = param(None, "(layer, head) pairs, a {layer: [heads]} mapping or a JSON file path",
                                "[code] models/augment_index.py; offline head search", optional(head_list))
    layers: tuple | None = param(None, "calibrate all heads of these layers (exclusive with heads)",
                                 "[code] range(2, 31) for Llama-2-7B", optional(int_list()))
    decode_policy: str = param("reuse_prefill_sinks", "generated rows: calibrate with the prompt's sinks, or not",
                               "[derived] spec §3.2", choice("reuse_prefill_sinks", "prefill_only"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heads is not None and self.layers is not None:
            raise ConfigError("act: give either heads or layers, not both")


@register
class Act(Method):
    """Hidden-sink calibration; see `ActConfig`."""

    config_class = ActConfig
    needs = frozenset({"rows"})

    def bind(self, model: ModelInfo) -> None:
        cfg: ActConfig = self.config
        if cfg.heads is not None:
            bad = [p for p in cfg.heads if p[0] >= model.num_layers or p[1] >= model.num_heads]
            if bad:
                raise ConfigError(
                    f"act: heads {bad[:5]} out of range; this model has {model.num_layers} layers of "
                    f"{model.num_heads} query heads"
                )
            per_layer: dict[int, list[int]] = {}
            for layer, head in cfg.heads:
                per_layer.setdefault(layer, []).append(head)
        else:
            layers = layer_range(model, "act", cfg.layers, range(2, model.num_layers - 1))
            per_layer = {layer: list(range(model.num_heads)) for layer in layers}
        if not per_layer:
            raise ConfigError(
                f"act: no head selected (model has {model.num_layers} layers; the default layers 2..L-2 are empty "
                "for it); pass layers=[...] or heads=[...]"
            )
        self._heads = {layer: torch.tensor(heads) for layer, heads in per_layer.items()}
        self._num_heads = model.num_heads
        self.touched_layers = frozenset(per_layer)
        self._sinks: dict[int, torch.Tensor] = {}
        self._detected: dict[int, torch.Tensor] = {}
        self._columns: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def start_sequence(self, roles: TokenRoles) -> None:
        self._sinks, self._detected, self._columns = {}, {}, {}

    def _edited_rows(self, positions: torch.Tensor, prompt_len: int) -> torch.Tensor:
        if self.config.decode_policy == "prefill_only":
            return positions < prompt_len
        return torch.ones_like(positions, dtype=torch.bool)

    def request(self, call: AttentionCall) -> RowRequest | None:
        if not call.covers_prompt and call.layer not in self._sinks:
            raise RuntimeError(f"act: layer {call.layer} decodes before its prompt was seen")
        rows = self._edited_rows(call.query_positions, call.roles.prompt_len)
        if call.covers_prompt:  # every prompt row is needed to find the sinks
            rows = rows | (call.query_positions < call.roles.prompt_len)
        if not bool(rows.any()):
            return None
        # the column means need every prompt row: they are summed block by block (`observe`) before any edit; the
        # edit biases only the sink columns, so a call of exactly the prompt (or decode rows) may take the fused path
        exact_prompt = call.query_positions.shape[0] == call.roles.prompt_len
        return RowRequest(rows, self._heads[call.layer].to(rows.device), observe=call.covers_prompt, blockwise=True,
                          columns=exact_prompt or not call.covers_prompt)

    def observe(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        """Add this block's attention received by each prompt key, and the valid prompt rows that see it."""
        prompt_len = call.roles.prompt_len
        prompt_rows = view.rows < prompt_len
        rows_valid = call.roles.valid[:, view.rows[prompt_rows]][:, None, :, None]  # (batch, 1, rows, 1)
        probs = view.probs()[:, :, prompt_rows, :prompt_len]
        # the column sum over valid rows as one product (no (heads, rows, keys) temporary)
        received = torch.matmul(rows_valid.transpose(-1, -2).to(probs.dtype), probs)[:, :, 0]  # (batch, heads, keys)
        count = (view.allowed[:, :, prompt_rows, :prompt_len] & rows_valid).sum(2)
        if call.layer in self._columns:
            received, count = (a + b for a, b in zip(self._columns[call.layer], (received, count)))
        self._columns[call.layer] = (received, count)

    def observe_received(self, call: AttentionCall, received: torch.Tensor, count: torch.Tensor,
                         request: RowRequest) -> None:
        """The fused path's column sums (the call is exactly the prompt): attention received and rows counted."""
        self._columns[call.layer] = (received, count)

    def edit_columns(self, call: AttentionCall, request: RowRequest) -> torch.Tensor:
        heads = request.heads.sort().values
        self._settle_sinks(call, heads, torch.ones_like(heads, dtype=torch.bool))
        return self._sinks[call.layer].any(1).any(0).nonzero().squeeze(1)

    def _settle_sinks(self, call: AttentionCall, heads: torch.Tensor, selected: torch.Tensor) -> None:
        """After the last observed block (or the fused column sums): find this layer's sinks, drop each first one."""
        if call.layer in self._columns:
            found = self._find_sinks(*self._columns.pop(call.layer), heads, selected, call.roles)
            first = torch.nn.functional.one_hot(found.int().argmax(-1), call.roles.prompt_len).bool()
            self._detected[call.layer] = found
            self._sinks[call.layer] = found & ~first

    def edit(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        prompt_len = call.roles.prompt_len
        probs = view.probs()
        selected = torch.isin(view.heads, request.heads)
        self._settle_sinks(call, view.heads, selected)
        sinks = self._sinks[call.layer][:, view.heads]  # (batch, heads, prompt_len)
        if view.columns is None:
            sinks = torch.nn.functional.pad(sinks, (0, probs.shape[-1] - sinks.shape[-1]))[:, :, None, :]
        else:  # a view of some key columns, which are all prompt keys (edit_columns named sinks only)
            sinks = sinks[:, :, None, view.columns]
        mass = torch.matmul(probs, sinks.to(probs.dtype).transpose(-1, -2))  # (batch, heads, rows, 1)
        beta = self.config.beta
        bias = torch.log(beta * (1 - mass) / (1 - beta * mass))
        rows = self._edited_rows(view.rows, prompt_len).view(1, 1, -1, 1)
        # a row with all its mass on sinks is left as is; per-row factors first, one (heads, rows, keys) select last
        bias = torch.where((mass < 1) & rows & selected.view(1, -1, 1, 1), bias, torch.zeros_like(bias))
        view.add_bias(torch.where(sinks, bias, torch.zeros((), dtype=bias.dtype, device=bias.device)))

    def _find_sinks(self, received: torch.Tensor, count: torch.Tensor, heads: torch.Tensor, selected: torch.Tensor,
                    roles: TokenRoles) -> torch.Tensor:
        """`(batch, num_heads, prompt_len)` bool: keys whose causal column-mean attention exceeds the threshold,
        from the attention each key received over the valid prompt rows and the number of those rows that see it."""
        prompt_len = roles.prompt_len
        score = received / count.clamp_min(1)
        found = (score > self.config.threshold) & (count > 0) & roles.valid[:, None, :prompt_len]
        found &= selected.view(1, -1, 1)
        full = torch.zeros(found.shape[0], self._num_heads, prompt_len, dtype=torch.bool, device=found.device)
        full[:, heads] = found
        return full

    def sinks(self, calibrated: bool = True) -> dict[int, torch.Tensor]:
        """Sinks of the last prefill, `{layer: (batch, num_heads, prompt_len) bool}`: the calibrated ones (the
        first detected sink of each head dropped), or with `calibrated=False` every detected one."""
        return dict(self._sinks if calibrated else self._detected)
