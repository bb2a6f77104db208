"""What a method is to the core: a config plus a few hooks that declare what it needs and how it edits rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.branch import Branch
from ..core.call import AttentionCall, RowRequest
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
    #: the top-level model config, for methods that need layout facts (image grid sizes); None in unit tests
    config: Any = None


#: what a method can ask the core for; a method lists the ones it uses in `Method.needs`
CAPABILITIES = frozenset({"rows", "head_outputs", "layer_inputs", "positions", "mask", "decoding_loop",
                          "branch", "model_hooks"})


class Method:
    """Base class of a method. Subclasses set `config_class` and `needs`, and override the matching hooks.

    The core calls: `bind` once at wrap (validate against the model, resolve `touched_layers`); at each forward,
    `positions` ("positions") and, from an empty cache, `read_inputs` + `start_sequence`; in each touched layer,
    `on_layer_input` ("layer_inputs"), then inside attention `edit_mask` ("mask"), `request` + `edit` ("rows";
    then `grad_probs` for a `grad` request) and `edit_head_outputs` ("head_outputs"); `decoding_loop`
    ("decoding_loop") replaces the loop of `generate`.
    "branch": the core runs `branches` (second streams, in whose layers the owner's hooks see `call.stream`) and
    hands each mirroring branch's logits to `combine_logits`.
    "model_hooks": `install_hooks` once at wrap, for hooks outside the text decoder (e.g. on the vision tower).
    """

    config_class: ClassVar[type[MethodConfig]]
    #: capabilities used, a subset of `CAPABILITIES`
    needs: ClassVar[frozenset[str]] = frozenset()
    #: the method reads image-token keys, so every prompt must contain image tokens
    needs_image_tokens: ClassVar[bool] = False
    #: its decoding loop rolls the KV cache back (`Cache.crop`), which a branch mirroring every forward cannot follow
    rolls_back_cache: ClassVar[bool] = False
    #: `wrap` must be given the model's processor (`iv.wrap(model, name, processor=processor)`), for `use_processor`
    needs_processor: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.touched_layers: frozenset[int] = frozenset()

    @property
    def name(self) -> str:
        return self.config.NAME

    def bind(self, model: ModelInfo) -> None:
        """Check the config against the model and set `touched_layers` (empty when neutral)."""

    def use_processor(self, processor: Any) -> None:
        """Receive the processor given to `wrap` (methods with `needs_processor`), before `bind`; check it here."""

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Receive the tokenizer given to `Handle.set_template` (for methods that read words, e.g. content words)."""

    def read_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Keyword inputs (e.g. `image_sizes`) of a `generate` call, which encodes the images before prefill and drops
        them, and of every forward that starts from an empty cache, before `start_sequence`."""

    def start_sequence(self, roles: TokenRoles) -> None:
        """Forget per-sequence state; called before each forward that starts from an empty cache."""

    def reorder_rows(self, index: torch.Tensor) -> None:
        """Beam search reordered the batch's rows (row `i` continues old row `index[i]`): reorder per-row state kept
        across decode steps (the KV cache and the token roles are reordered already)."""

    def request(self, call: AttentionCall) -> RowRequest | None:
        """Rows and heads to edit in this call, or `None` to leave it alone."""
        return None

    def observe(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        """For an `observe` request: read one block of its rows, unedited; every block comes here before the first
        `edit` of the call (blocks bound the memory of many rows, so a statistic over all rows is gathered here)."""

    def edit(self, call: AttentionCall, view: RowLogits, request: RowRequest) -> None:
        """Edit `view` (add a bias) for the rows and heads of `request`; `view` may hold more rows and heads, and,
        when the rows are many, only a block of them (each block is edited in turn)."""

    def observe_received(self, call: AttentionCall, received: torch.Tensor, count: torch.Tensor,
                         request: RowRequest) -> None:
        """For an `observe` + `columns` request on the fused path, instead of `observe`: the attention each key
        receives from the request's rows that are valid (not padding), `(batch, heads, kv_len)` for the request's
        heads (all heads when it names none), and how many of those rows may see each key, `(batch, 1, kv_len)`."""
        raise NotImplementedError(f"{self.name}: a columns request needs observe_received")

    def edit_columns(self, call: AttentionCall, request: RowRequest) -> torch.Tensor:
        """For a `columns` request on the fused path, after any `observe_received`: the key columns (a LongTensor of
        indices, possibly empty) that `edit` may bias in this call, over every batch element and head."""
        raise NotImplementedError(f"{self.name}: a columns request needs edit_columns")

    def grad_probs(self, call: AttentionCall, probs: torch.Tensor, request: RowRequest) -> None:
        """For a `grad` request, when grad mode is on: the final probabilities (after every method's edit) of the
        request's rows and heads, in increasing order, `(batch, heads, rows, kv_len)`. It is an autograd leaf on
        which the layer's output depends (the output's value is unchanged), so the gradient of a later loss with
        respect to it is `∂loss/∂A` for the probabilities A used in `A·V`. Called once per block of rows."""

    def edit_mask(self, call: AttentionCall, allowed: torch.Tensor) -> torch.Tensor | None:
        """Keys each query row may attend to, `(batch, 1, q_len, kv_len)` bool (possibly a broadcast view: do not
        write into it); return a new mask for the base backend and every later edit, or None to keep it."""
        return None

    def mask_ranks(self, call: AttentionCall) -> torch.Tensor | None:
        """For a mask editor whose mask, on a plain causal call, is exactly `rank(k) <= rank(q)` (equal ranks see each
        other): the `(batch, kv_len)` ranks, or None. The core then keeps SDPA's causal kernel (in rank order, plus
        the ties) instead of a dense masked call; `edit_mask` still serves every other call."""
        return None

    def edit_head_outputs(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """Per-head attention outputs before `o_proj`, `(batch, q_len, heads, head_dim)`; return the edited ones."""
        return out

    def on_layer_input(self, layer: int, hidden: torch.Tensor, roles: TokenRoles) -> torch.Tensor | None:
        """Input hidden states of a touched decoder layer, `(batch, q_len, hidden)`; return a replacement or None."""
        return None

    def positions(self, roles: TokenRoles, position_ids: torch.Tensor | None, new_len: int) -> torch.Tensor | None:
        """Position ids for the `new_len` newest tokens (`roles` already includes them), or None to keep them."""
        return None

    def install_hooks(self, model: Any) -> list[Callable[[], None]]:
        """Register hooks on `model` outside the text decoder's attention (e.g. on the vision tower) and return the
        callables that remove them. Called once by `wrap` after `bind`, only when `touched_layers` is not empty;
        check everything before registering anything."""
        return []

    def decoding_loop(self, model: Any, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """Replaces `generate`'s decoding loop (a transformers `custom_generate` callable)."""
        raise NotImplementedError

    #: second streams the core runs for this method ("branch"), set in `bind`; empty when neutral
    branches: tuple[Branch, ...] = ()

    def combine_logits(self, branch: Branch, main: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Next-token scores from the main stream's logits and those of an `every_forward` branch, both
        `(batch, rows, vocab)` over the same positions; e.g. `core.branch.guidance`."""
        raise NotImplementedError


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

