"""What a chat template puts around the user's text, learnt by rendering two user turns that differ only in the text.

Real VLM templates differ in what they read: LLaVA-1.5, LLaVA-NeXT, Idefics3 and SmolVLM iterate a list of typed
parts (a string content renders as nothing), Qwen2-VL and Gemma3 take both. A turn is rendered with string content
first and with `[{"type": "text", ...}]` when the string's text is missing; with an image part for a VLM processor,
tokenized by the processor itself (which expands the image), as a user's prompt is.
"""

from __future__ import annotations

from typing import Any

import jinja2
import PIL.Image

from ..errors import ConfigError

#: two user texts of different words and lengths; what differs between their renders is the user's text
TEXTS = ("Alpha question?", "Different words here.")
#: the image of the image-part renders (any image: only its expanded tokens' position matters)
_IMAGE_SIZE = (32, 32)


def config_boundary(layout: Any, config: Any) -> tuple[int, ...]:
    """The image-marker ids that `config` names, per the family `layout` (its adapter; none without one)."""
    return () if layout is None else tuple(layout.config_boundary_ids(config))


def boundary_ids(adapter: Any, tokenizer: Any) -> tuple[int, ...]:
    """Ids of the family's `boundary_tokens` in `tokenizer`'s vocabulary (those it has)."""
    if adapter is None or not getattr(adapter, "boundary_tokens", ()):
        return ()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return tuple(vocab[token] for token in adapter.boundary_tokens if token in vocab)


def learn(processor: Any, tokenizer: Any, image_ids: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """`(prefix ids, suffix ids, ids after the image)` of the template of `processor` (or of its tokenizer);
    `image_ids` are the model's image placeholder ids (Gemma3's processor calls its BOI id `image_token_id`)."""
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(f"{type(processor).__name__} has no chat template (neither it nor its tokenizer sets "
                          "chat_template); set one, or leave roles without a template")
    texts = [_render(tokenizer, template, text, image=False) for text in TEXTS]
    a, b = (_tokenize(tokenizer, text) for text in texts)
    prefix, suffix = _common(a, b)
    after: list[int] = []
    if image_ids and getattr(processor, "image_processor", None) is not None:
        rows = [_expanded(processor, tokenizer, template, text) for text in TEXTS]
        tails = [row[max(i for i, t in enumerate(row) if t in image_ids) + 1:] for row in rows]
        for x, y in zip(*tails):
            if x != y:
                break
            after.append(x)
    return tuple(prefix), tuple(suffix), tuple(after)


def _render(tokenizer: Any, template: str, text: str, image: bool) -> str:
    for parts in (False, True):
        if image or parts:
            content: Any = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        else:
            content = text
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                                     add_generation_prompt=True, tokenize=False)
        except (TypeError, KeyError, AttributeError, jinja2.TemplateError):  # string content given a list, or the reverse
            continue
        if text in rendered:
            return rendered
    raise ConfigError("the chat template drops the user's text from a user turn (with string and list content)")


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    """Ids as a processor's `apply_chat_template` tokenizes a render: no second BOS where the render has one."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])


def _expanded(processor: Any, tokenizer: Any, template: str, text: str) -> list[int]:
    rendered = _render(tokenizer, template, text, image=True)
    image = PIL.Image.new("RGB", _IMAGE_SIZE)
    nested = type(processor).__name__ in ("Idefics3Processor", "SmolVLMProcessor")
    bos = getattr(tokenizer, "bos_token", None)
    out = processor(text=[rendered], images=[[image]] if nested else [image],
                    add_special_tokens=not (bos and rendered.startswith(bos)))
    ids = out["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _common(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return a[:prefix], a[len(a) - suffix:]

