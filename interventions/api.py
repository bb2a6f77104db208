"""Public entry points: `wrap`, `unwrap`, `apply`, `methods`, `families`."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from . import families as _families
from . import methods as _methods
from .core.attention import KEYS
from .core.contract import Capability, Method, ModelInfo
from .core.roles import TokenRoles
from .core.session import Session
from .errors import AlreadyWrappedError, ConfigError
from .version import __version__

CONFIG_SCHEMA = 1
_HANDLES: weakref.WeakKeyDictionary[torch.nn.Module, Handle] = weakref.WeakKeyDictionary()

Stack = str | Sequence[tuple[str, Mapping[str, Any]]] | Mapping[str, Any]


def methods() -> list[str]:
    """Sorted names of the available methods."""
    return _methods.METHODS.names()


def families() -> list[str]:
    """Sorted `config.model_type` values this library can wrap."""
    return _families.FAMILIES.names()


def family(model: Any) -> _families.FamilyAdapter:
    """The family adapter serving `model` (a model or its config): its `name`, whether prompts carry images
    (`has_images`), whether its processor takes one list of images per prompt (`nests_images`), its image layout.

    Raises:
        ValueError: an unsupported model type, naming it and listing `families()`.
    """
    if isinstance(model, torch.nn.Module):
        return _families.resolve(model)
    return _families.resolve_config(model, type(model).__name__)


def method_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate `params` for the method `name`: every parameter, defaults filled, as plain JSON types.

    Raises:
        ValueError: unknown method or parameter, wrong type or range.
    """
    return _methods.METHODS.get(name).config_class.from_params(dict(params or {})).to_params()


def describe(name: str) -> str:
    """One line per parameter of the method `name`: its default, help and source."""
    return _methods.METHODS.get(name).config_class.describe()


class Handle:
    """What `wrap` returns: the stack's config and the way back.

    Attributes:
        model (`torch.nn.Module`): the wrapped model (patched in place).
        methods (`list[Method]`): the bound methods, in stack order.
    """

    def __init__(self, model: torch.nn.Module, session: Session) -> None:
        self.model = model
        self.methods = session.methods
        self._session = session

    @property
    def roles(self) -> TokenRoles | None:
        """Token roles of the sequence the model last ran (`None` before the first forward)."""
        return self._session.roles

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of the stack; `iv.wrap(model, handle.config)` rebuilds it."""
        return {
            "schema": CONFIG_SCHEMA,
            "library": f"interventions {__version__}",
            "stack": [{"method": m.name, "params": m.config.to_params()} for m in self.methods],
        }

    def set_template(self, tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Learn the chat template's fixed token prefix and suffix around a user message, so that token roles
        mark them as template and `roles.question` is the user's text alone; methods that read words get the
        tokenizer too.

        Args:
            tokenizer: a tokenizer with a chat template, or a processor holding one (`.tokenizer`).

        Returns:
            `(prefix ids, suffix ids)`: the ids common to two renderings with different user texts.
        """
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        renders = [
            tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
            for text in ("Alpha question?", "Different words here.")
        ]
        a, b = (list(r[0] if r and isinstance(r[0], list) else r) for r in renders)
        prefix = 0
        while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
            prefix += 1
        suffix = 0
        while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
            suffix += 1
        self._session.template = (tuple(a[:prefix]), tuple(a[len(a) - suffix:]))
        for method in self.methods:
            method.use_tokenizer(tokenizer)
        return self._session.template

    def unwrap(self) -> None:
        """Restore the model's original behaviour bit for bit. Safe to call twice."""
        self._session.detach()
        if _HANDLES.get(self.model) is self:
            del _HANDLES[self.model]

    def __repr__(self) -> str:
        stack = ", ".join(m.name for m in self.methods)
        return f"Handle({type(self.model).__name__}, [{stack}])"


def wrap(model: torch.nn.Module, name_or_stack: Stack, *, processor: Any = None, **params: Any) -> Handle:
    """Apply one method, or a stack of methods, to an already-loaded transformers model, in place.

    Everything is validated first; on any error the model is left untouched.

    Args:
        model (`transformers.PreTrainedModel`): a model of a supported family (`families()`), with SDPA or eager
            attention in its text decoder.
        name_or_stack (`str`, `list[tuple[str, dict]]` or `dict`): a method name (parameters as keyword
            arguments), a list of `(name, params)` applied in list order, or a `Handle.config` dict.
        processor (`transformers.ProcessorMixin`, *optional*): the model's processor, for methods that build
            their own inputs (`carve`); a stack entry may also carry its own under the key `"processor"`. It is
            not part of `Handle.config`: pass it again when re-wrapping from a config.
        **params: parameters of the single named method.

    Returns:
        `Handle`: with `.config` and `.unwrap()`.

    Raises:
        ValueError: unknown method or parameter, wrong type or range, unsupported family or attention backend,
            or a model that is already wrapped.

    Example:
        >>> h = iv.wrap(model, "act", beta=0.4, layers=[2, 3])
        >>> out = model.generate(**inputs)
        >>> h.unwrap()
    """
    stack = _parse_stack(name_or_stack, params)
    processors = [p.pop("processor", processor) if _methods.METHODS.get(name).needs_processor else processor
                  for name, p in stack]
    configs = [_methods.METHODS.get(name).config_class.from_params(p) for name, p in stack]
    for config, given in zip(configs, processors, strict=True):
        if _methods.METHODS.get(config.NAME).needs_processor and given is None:
            raise ConfigError(f"{config.NAME}: processor is required: iv.wrap(model, {config.NAME!r}, "
                              "processor=processor) with the model's transformers processor")
    adapter = _families.resolve(model)
    if model in _HANDLES:
        raise AlreadyWrappedError(
            f"{type(model).__name__} is already wrapped with {_HANDLES[model]!r}; call unwrap() first, or pass "
            "all methods at once as a stack"
        )
    text_config = adapter.text_config(model)
    base = text_config._attn_implementation
    if base in KEYS.values():
        raise AlreadyWrappedError(f"{type(model).__name__} already uses an interventions attention key ({base})")
    if base not in KEYS:
        raise ConfigError(
            f"the text decoder uses attn_implementation={base!r}; interventions needs 'sdpa' or 'eager' "
            "(load the model with attn_implementation='sdpa')"
        )
    info = ModelInfo(
        family=adapter.name,
        num_layers=len(adapter.attention_modules(model)),
        num_heads=text_config.num_attention_heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
        has_images=adapter.has_images,
        config=model.config,
        layout=adapter,
    )
    loops = [c.NAME for c in configs if Capability.decoding_loop in _methods.METHODS.get(c.NAME).needs]
    if len(loops) > 1:
        raise ConfigError(f"{', '.join(loops)} each run their own decoding loop; stack at most one of them")
    bound: list[Method] = []
    for config, given in zip(configs, processors, strict=True):
        method = _methods.METHODS.get(config.NAME)(config)
        if method.needs_processor:
            method.use_processor(given)
        method.attach(info)
        bound.append(method)
    _check_rollbacks(bound)
    session = Session(model, adapter, bound, base)
    session.attach()
    handle = Handle(model, session)
    _HANDLES[model] = handle
    return handle


def _check_rollbacks(methods: list[Method]) -> None:
    rolling = [m.name for m in methods if m.rolls_back_cache and m.touched_layers]
    mirroring = [m.name for m in methods if any(b.schedule == "every_forward" for b in m.branches)]
    if rolling and mirroring:
        raise ConfigError(f"{', '.join(rolling)} rolls the KV cache back, which the own cache of "
                          f"{', '.join(mirroring)} cannot follow; use them in separate runs")


def unwrap(model: torch.nn.Module) -> None:
    """Undo `wrap` on `model`; a model that is not wrapped is left as is."""
    handle = _HANDLES.get(model)
    if handle is not None:
        handle.unwrap()


@contextlib.contextmanager
def apply(model: torch.nn.Module, name_or_stack: Stack, *, processor: Any = None, **params: Any) -> Iterator[Handle]:
    """`wrap` for the duration of a `with` block; unwraps on exit, also on an exception.

    Example:
        >>> with iv.apply(model, "pai", alpha=0.2):
        ...     out = model.generate(**inputs)
    """
    handle = wrap(model, name_or_stack, processor=processor, **params)
    try:
        yield handle
    finally:
        handle.unwrap()


def _parse_stack(name_or_stack: Stack, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(name_or_stack, str):
        return [(name_or_stack, params)]
    if params:
        raise ConfigError("keyword parameters go with a single method name; put them inside the stack entries")
    if isinstance(name_or_stack, Mapping):
        extra = set(name_or_stack) - {"schema", "library", "stack"}
        if extra or "stack" not in name_or_stack:
            raise ConfigError(f"a config dict has keys schema, library, stack; got {sorted(name_or_stack)}")
        if name_or_stack.get("schema", CONFIG_SCHEMA) != CONFIG_SCHEMA:
            raise ConfigError(f"config schema {name_or_stack['schema']!r} is not supported (expected {CONFIG_SCHEMA})")
        entries = []
        for entry in name_or_stack["stack"]:
            if not isinstance(entry, Mapping) or set(entry) - {"method", "params"} or "method" not in entry:
                raise ConfigError(f"a stack entry is {{'method': name, 'params': {{...}}}}; got {entry!r}")
            entries.append((entry["method"], dict(entry.get("params", {}))))
        return entries
    entries = []
    for entry in name_or_stack:
        if isinstance(entry, str):
            entries.append((entry, {}))
        elif isinstance(entry, Sequence) and len(entry) == 2 and isinstance(entry[1], Mapping):
            entries.append((entry[0], dict(entry[1])))
        else:
            raise ConfigError(f"a stack entry is a method name or a (name, params) pair; got {entry!r}")
    if not entries:
        raise ConfigError("the stack is empty; give at least one method")
    return entries
