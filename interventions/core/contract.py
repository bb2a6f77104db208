"""The contract between the core and the methods and families it serves: what a method is (a config plus hooks
that declare the capabilities they use), what it may know of the model (`ModelInfo`, `Layout`), and the types of
one attention call. The core imports only itself; methods and families implement these types.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..errors import ConfigError
from .branch import Branch
from .call import AttentionCall, RowRequest
from .geometry import Grid, Placed, View
from .params import MethodConfig
from .roles import TokenRoles
from .rows import RowLogits

__all__ = ["AttentionCall", "Capability", "Layout", "Method", "ModelInfo", "RowRequest", "VisionTower"]


class Capability(str, enum.Enum):
    """What a method can ask the core for; a method lists the ones it uses in `Method.needs`."""

    rows = "rows"
    head_outputs = "head_outputs"
    layer_inputs = "layer_inputs"
    positions = "positions"
    mask = "mask"
    decoding_loop = "decoding_loop"
    branch = "branch"
    model_hooks = "model_hooks"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class VisionTower:
    """Where a family's vision tower keeps its attention, and how its patches become LLM image tokens.

    Attributes:
        find: model -> (the tower module, its attention modules in layer order).
        cls_token (`bool`): the tower's sequence starts with a CLS token (CLIP); its attention modules are
            CLIP-style (`q_proj`, `k_proj`, `head_dim`, `scale`).
        summary_layer (`int`): index (into the attention modules) of the layer the LLM's features come from.
        qk: for a CLS-less tower, one attention module's call `(module, args, kwargs)` -> the `(q, k, scaling, mask)`
            of each attention it computes, `q`, `k` of shape `(n, heads, length, head_dim)`, in tower order.
        units: for a CLS-less tower, `(model, patch scores of one tower pass, the tower's keyword inputs)` -> the
            token scores of each selection unit (image or crop), in the order the model fills the image positions.
        features: for a CLS tower, `(model, crops, patches, image_sizes)` -> per image, the flat `crop·patches + patch`
            index behind each of its LLM image features (-1: a feature with no patch, e.g. a newline).
    """

    find: Callable[[Any], tuple[torch.nn.Module, list[torch.nn.Module]]]
    cls_token: bool
    summary_layer: int
    qk: Callable[[torch.nn.Module, tuple, dict], list[tuple]] | None = None
    units: Callable[[Any, torch.Tensor, dict], list[torch.Tensor]] | None = None
    features: Callable[[Any, int, int, Any], list[torch.Tensor]] | None = None


class Layout(Protocol):
    """The image layout of a model family, implemented by its adapter (`interventions/families/<family>.py`).

    Methods read grids, pixels and towers only through this, and the core reads where the decoder, its attention
    modules and the visual token ids are, so a new family is one adapter file.
    """

    name: str
    has_images: bool
    #: model inputs with one entry per position (they follow `input_ids` when positions are dropped)
    per_position_inputs: tuple[str, ...]
    #: the processor takes one list of images per prompt (`images=[[img], ...]`)
    nests_images: bool
    #: position ids are multi-dimensional (M-RoPE): there is no 1-D position to remap
    multi_axis_positions: bool
    #: forward inputs that `image_grids` reads (besides what a fixed grid needs)
    grid_inputs: tuple[str, ...]
    #: forward inputs that describe the images, kept from a `generate` call before it encodes them
    pixel_inputs: tuple[str, ...]

    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The text decoder (the module holding `layers`)."""

    def text_config(self, model: torch.nn.Module) -> Any:
        """The config the text decoder's attention modules read their implementation from."""

    def attention_modules(self, model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
        """`(layer index, self-attention module)` of every decoder layer."""

    def image_token_ids(self, model: torch.nn.Module) -> tuple[int, ...]:
        """Ids of the visual placeholder tokens."""

    def boundary_token_ids(self, model: torch.nn.Module) -> tuple[int, ...]:
        """Ids of the markers around an image."""

    def is_vision_input(self, name: str) -> bool:
        """Whether a model input carries the image itself (a no-image forward drops it)."""

    def fixed_grid(self, config: Any, method: str) -> Grid | None:
        """The grid of every image-token run, or None when it depends on the image (then `image_grids`)."""

    def image_grids(self, config: Any, inputs: Mapping[str, Any], method: str) -> Iterator[list[Grid]]:
        """The grids of each image of a batch, in batch order, from the forward inputs."""

    def pixel_view(self, config: Any, image_processor: Any, inputs: Mapping[str, Any], method: str) -> View:
        """The image the model saw for the one image of a one-prompt batch, with the grids covering it."""

    def sample_pixels(self, inputs: Mapping[str, Any], sample: int, batch: int, method: str) -> dict[str, Any]:
        """The pixel inputs of one prompt of a batch whose prompts hold one image each."""

    def on_original(self, view: View, image_processor: Any, size: tuple[int, int]) -> tuple[Placed, ...]:
        """The grids of `view` re-expressed over the original image of `size` (height, width)."""

    def vision_tower(self) -> VisionTower | None:
        """The tower's description, or None where none is defined."""


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
    #: the family's image layout (its adapter); None in unit tests
    layout: Layout | None = None


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
    #: capabilities used (`Capability` members, or their names, checked when the class is defined)
    needs: ClassVar[frozenset[Capability]] = frozenset()
    #: the method reads image-token keys, so every prompt must contain image tokens
    needs_image_tokens: ClassVar[bool] = False
    #: the method acts on images, so a text-only family is refused at wrap (implied by `needs_image_tokens`)
    needs_image_family: ClassVar[bool] = False
    #: its decoding loop rolls the KV cache back (`Cache.crop`), which a branch mirroring every forward cannot follow
    rolls_back_cache: ClassVar[bool] = False
    #: `wrap` must be given the model's processor (`iv.wrap(model, name, processor=processor)`), for `use_processor`
    needs_processor: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = [n for n in cls.needs if n not in Capability._value2member_map_]
        if unknown:
            raise TypeError(f"{cls.__name__}.needs names unknown capabilities {sorted(map(str, unknown))}; "
                            f"allowed: {', '.join(c.value for c in Capability)}")
        cls.needs = frozenset(Capability(n) for n in cls.needs)

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.touched_layers: frozenset[int] = frozenset()

    @property
    def name(self) -> str:
        """The method's registry name, stated once: its config's `NAME`."""
        return self.config.NAME

    @property
    def is_neutral(self) -> bool:
        """The one neutral rule: the config's strength is at its neutral value (override only where a default is
        resolved at bind time, e.g. from a preset). A neutral method touches nothing and runs no branch."""
        return self.config.is_neutral

    def attach(self, model: ModelInfo) -> None:
        """What `wrap` calls: the shared checks, `bind`, then the neutral rule. Not to be overridden."""
        if (self.needs_image_tokens or self.needs_image_family) and not model.has_images:
            raise ConfigError(f"{self.name} needs image tokens, and the {model.family} family has none "
                              "(text-only model)")
        self.bind(model)
        if self.is_neutral:
            self.touched_layers, self.branches = frozenset(), ()

    def bind(self, model: ModelInfo) -> None:
        """Check the config against the model and set `touched_layers` (`attach` empties them when neutral)."""

    def use_processor(self, processor: Any) -> None:
        """Receive the processor given to `wrap` (methods with `needs_processor`), before `bind`; check it here."""

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Receive the tokenizer given to `Handle.set_template` (for methods that read words, e.g. content words)."""

    def read_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Keyword inputs (e.g. `image_sizes`) of a `generate` call, which encodes the images before prefill and drops
        them, and of every forward that starts from an empty cache, before `start_sequence`."""

    def start_sequence(self, roles: TokenRoles) -> None:
        """Forget per-sequence state; called before each forward that starts from an empty cache."""

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
        `(batch, rows, vocab)` over the same positions; e.g. `methods.guidance`."""
        raise NotImplementedError


