"""What a method is to the core: a config plus a few hooks that declare what it needs and how it edits rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.roles import TokenRoles
from ..core.rows import RowLogits
from ..errors import ConfigError
from ..registry import Registry
from .params import MethodConfig


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the wrapped model when it binds."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    has_images: bool


@dataclass(frozen=True)
class AttentionCall:
    """One call of a text-decoder attention function.

    Attributes:
        layer (`int`): decoder layer index.
        roles (`TokenRoles`): roles of the keys, `kv_len` long.
        query_positions (`torch.LongTensor` of shape `(q_len,)`): absolute positions of the query rows.
    """

    layer: int
    roles: TokenRoles
    query_positions: torch.Tensor

    @property
    def covers_prompt(self) -> bool:
        """True when this call's rows include the whole prompt (a prefill, or a no-cache recompute)."""
        return int(self.query_positions[0]) == 0


@dataclass(frozen=True)
class RowRequest:
    """Rows (and heads) a method edits in one attention call.

    Attributes:
        rows (`torch.BoolTensor` of shape `(q_len,)`): rows the method edits.
        heads (`torch.LongTensor`, *optional*): query heads it edits; `None` for all.
    """

    rows: torch.Tensor
    heads: torch.Tensor | None = None


class Method:
    """Base class of a method. Subclasses set `config_class` and override the hooks they need.

    The core calls, in order: `bind` once at wrap (validate against the model, resolve layers); `start_sequence`
    at every forward that starts from an empty cache; then, in each touched layer, `request` and, if it returned
    rows, `edit`.
    """

    config_class: ClassVar[type[MethodConfig]]
    #: the method reads image-token keys, so every prompt must contain image tokens
    needs_image_tokens: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.touched_layers: frozenset[int] = frozenset()

    @property
    def name(self) -> str:
        return self.config.NAME

    def bind(self, model: ModelInfo) -> None:
        """Check the config against the model and set `touched_layers` (empty when neutral)."""

    def start_sequence(self, roles: TokenRoles) -> None:
        """Forget per-sequence state; called before each forward that starts from an empty cache."""

    def request(self, call: AttentionCall) -> RowRequest | None:
        """Rows and heads to edit in this call, or `None` to leave it alone."""
        return None

    def edit(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        """Edit `view` (add a bias) for the rows and heads of `request`; `view` may hold more rows and heads."""


METHODS: Registry[type[Method]] = Registry("method")


def layer_range(model: ModelInfo, method: str, layers: tuple[int, ...] | None, default: range) -> frozenset[int]:
    """Validate explicit layers against the model, or use `default`."""
    if layers is None:
        return frozenset(default)
    bad = [layer for layer in layers if layer >= model.num_layers]
    if bad:
        raise ConfigError(
            f"{method}: layers={list(layers)} out of range; this model has layers 0..{model.num_layers - 1}"
        )
    return frozenset(layers)

