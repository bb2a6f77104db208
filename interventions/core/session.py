"""The state of one wrapped model: which methods touch which layers, the token roles of the current sequence,
and every change made to the model, so that `detach` undoes exactly those changes."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from .attention import KEYS, Binding, base_attention, bind, unbind
from .branch import MAIN, BranchRunner
from .call import AttentionCall
from .contract import Capability
from .roles import TokenRoles

if TYPE_CHECKING:
    from .contract import Layout, Method


class Session:
    """Owns the hooks and per-sequence state of one wrapped model."""

    def __init__(self, model: torch.nn.Module, adapter: Layout, methods: list[Method], base: str) -> None:
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.base = base
        self.roles: TokenRoles | None = None
        self._image_ids = adapter.image_token_ids(model)
        self._boundary_ids = adapter.boundary_token_ids(model)
        #: chat template `(prefix ids, suffix ids)`, set by `Handle.set_template`
        self.template: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._prompt_len: int | None = None  # set while `generate` runs
        self._generate_depth = 0  # nesting of `generate` calls (a decoding loop may call generate itself)
        self._by_layer: dict[int, list[Method]] = {}
        for method in methods:
            for layer in method.touched_layers:
                self._by_layer.setdefault(layer, []).append(method)
        #: the stream the current forward belongs to: MAIN, or a branch's name (core/branch.py)
        self.stream = MAIN
        self.branches = BranchRunner(self, methods, self._image_ids, self._boundary_ids)
        self._branch_layers = self.branches.layers()
        self._undo: list[Any] = []

    # ---- attach / detach -------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Switch the text decoder to the intervened attention and install the hooks; on an error, undo them."""
        try:
            self._attach()
        except BaseException:
            self.detach()
            raise

    def _attach(self) -> None:
        for method in self.methods:
            if Capability.model_hooks in method.needs and method.touched_layers:
                self._undo.extend(method.install_hooks(self.model))
        config = self.adapter.text_config(self.model)
        previous = config._attn_implementation_internal
        for layer, module in self.adapter.attention_modules(self.model):
            bind(module, Binding(self, layer, base_attention(module, self.base)))
            self._undo.append(functools.partial(unbind, module))
        config._attn_implementation_internal = KEYS[self.base]
        self._undo.append(functools.partial(setattr, config, "_attn_implementation_internal", previous))
        hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._undo.append(hook.remove)
        layers = self.adapter.decoder(self.model).layers
        for layer, methods in self._by_layer.items():
            readers = [m for m in methods if Capability.layer_inputs in m.needs]
            if readers:
                hook = layers[layer].register_forward_pre_hook(
                    functools.partial(self._layer_input, layer, readers), with_kwargs=True)
                self._undo.append(hook.remove)
        for layer in self.branches.refresh_layers:
            hook = layers[layer].register_forward_pre_hook(functools.partial(self._refresh_branches, layer))
            self._undo.append(hook.remove)
        if self.branches.mirrors:
            hook = self.model.register_forward_hook(self._after_forward)
            self._undo.append(hook.remove)
        self._wrap_generate()

    def detach(self) -> None:
        """Undo every change `attach` made, newest first. Safe to call twice."""
        while self._undo:
            self._undo.pop()()
        self.roles = None

    def _wrap_generate(self) -> None:
        # An instance attribute shadowing the class method, so that the user's own `model.generate(...)` tells the
        # session where the prompt ends (also when every step recomputes the full sequence without a cache).
        model = self.model
        had_own = "generate" in vars(model)
        own = vars(model).get("generate")
        original = model.generate

        loops = [m for m in self.methods if Capability.decoding_loop in m.needs]

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            if prompt is None and kwargs.get("inputs_embeds") is not None:
                prompt = kwargs["inputs_embeds"][..., 0]
            if loops and not self._generate_depth:  # a loop's own nested `model.generate` calls run the standard one
                if kwargs.get("custom_generate") is not None:
                    raise InputError(f"{loops[0].name} runs its own decoding loop; custom_generate cannot be given")
                kwargs["custom_generate"] = loops[0].decoding_loop
            config = kwargs.get("generation_config") or model.generation_config
            if self.branches.mirrors and (kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1) > 1:
                raise InputError("beam search reorders the main KV cache, which a branch's own cache (pag, pai "
                                 "use_cfg) cannot follow; decode greedily or by sampling")
            for method in self.methods:  # generate encodes the images before prefill and drops e.g. image_sizes
                method.read_inputs(kwargs)
            with self._generating(None if prompt is None else prompt.shape[1]):
                return original(*args, **kwargs)

        model.generate = generate
        self._undo.append(functools.partial(setattr, model, "generate", own) if had_own
                          else functools.partial(delattr, model, "generate"))

    @contextlib.contextmanager
    def _generating(self, prompt_len: int | None) -> Iterator[None]:
        outer, self._prompt_len = self._prompt_len, prompt_len
        self._generate_depth += 1
        try:
            yield
        finally:
            self._prompt_len = outer
            self._generate_depth -= 1

    # ---- per forward -----------------------------------------------------------------------------------------
    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.stream != MAIN:  # a branch forward: the branch runner has set its roles
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        source = input_ids if input_ids is not None else embeds
        if source is None:
            raise InputError("the wrapped model needs input_ids or inputs_embeds")
        batch, new_len = source.shape[0], source.shape[1]
        # transformers >= 5.2x passes `cache`; earlier 5.x `past_key_values`
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past_len = int(cache.get_seq_length()) if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if past_len == 0:
            prompt_len = new_len if self._prompt_len is None else min(self._prompt_len, new_len)
            self.roles = TokenRoles.from_prompt(input_ids, mask, self._image_ids, new_len, batch, prompt_len,
                                                source.device, self._boundary_ids, self.template)
            self._check_inputs(input_ids)
            for method in self.methods:
                method.read_inputs(kwargs)
                method.start_sequence(self.roles)
        elif self.roles is None:
            raise InputError("decoding with a KV cache that this wrapper did not see filled; run the prompt first")
        else:
            self.roles = self.roles.extend(input_ids, mask, past_len, new_len, self._image_ids)
        if self.branches.owned:
            self.branches.before_main(args, kwargs, past_len)
        return self._override_positions(args, kwargs, new_len)

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        return self.branches.after_main(output) if self.stream == MAIN else None

    def _refresh_branches(self, layer: int, module: torch.nn.Module, args: tuple) -> None:
        self.branches.refresh(layer)

    def _override_positions(self, args: tuple, kwargs: dict, new_len: int) -> tuple[tuple, dict] | None:
        changed = False
        for method in self.methods:
            if Capability.positions in method.needs and method.touched_layers:
                ids = method.positions(self.roles, kwargs.get("position_ids"), new_len)
                if ids is not None:
                    kwargs["position_ids"] = ids
                    changed = True
        if not changed:
            return None
        if kwargs.get("attention_mask") is None:
            # an explicit 2-D mask keeps transformers from reading remapped ids as packed sequences
            kwargs["attention_mask"] = self.roles.valid.long()
        return args, kwargs

    def _layer_input(self, layer: int, readers: list[Method], module: torch.nn.Module, args: tuple,
                     kwargs: dict) -> tuple[tuple, dict] | None:
        if self.stream != MAIN:  # other methods are off in a branch
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        replaced = False
        for method in readers:
            new = method.on_layer_input(layer, hidden, self.roles)
            if new is not None:
                hidden, replaced = new, True
        if not replaced:
            return None
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _check_inputs(self, input_ids: torch.Tensor | None) -> None:
        needing = [m.name for m in self.methods if m.needs_image_tokens and m.touched_layers]
        if not needing:
            return
        if input_ids is None:
            raise InputError(f"{', '.join(needing)} need input_ids to find the image tokens; got inputs_embeds only")
        prompt_image = self.roles.image[:, : self.roles.prompt_len]
        missing = (~prompt_image.any(1)).nonzero().flatten().tolist()
        if missing:
            raise InputError(
                f"{', '.join(needing)} need image tokens, but sample(s) {missing} of the batch have none "
                f"(image token ids {list(self._image_ids)}); build the prompt with the processor and an image"
            )

    def editors(self, layer: int) -> list[Method]:
        """Methods touching `layer` in the current stream, in stack order."""
        if self.stream == MAIN:
            return self._by_layer.get(layer, [])
        return self._branch_layers[self.stream].get(layer, [])

    def attention_call(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None) -> AttentionCall:
        if self.roles is None:
            raise InputError("call the wrapped model itself (its forward records the token roles), not a submodule")
        total, q_len = self.roles.length, query.shape[2]
        positions = torch.arange(total - q_len, total, device=query.device)
        return AttentionCall(layer, self.roles.keys(key.shape[2]), positions, self.stream, value, attention_mask,
                             total - q_len)
