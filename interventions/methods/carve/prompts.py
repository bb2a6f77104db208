"""The inputs of CARVE's three passes, spliced at token level from the user's prompt with the processor.

The user's prompt is `[before][image segment][question][template suffix]`. The image segment is what the processor
writes for one image placeholder (e.g. `<fake_token_around_image><global-img><image>…`, Gemma3's `\\n\\n<boi>…`)
plus the special tokens around it that are not BOS/EOS/padding (Qwen's `<|vision_start|>`/`<|vision_end|>`).
The template suffix is the chat template's fixed tail after a user message, and what it puts between the image and
the text (LLaVA's `\\n`) is kept too (both empty without a chat template): pass G is `[before][image segment]
[template][general instruction][template suffix]`, as the official code writes it.

- pass G: the question is replaced by the general instruction; the image segment is unchanged, so the image
  encoding of pass Q is reused (`mm_encoder_outputs`);
- pass F: the image segment is replaced by the processor's segment for the refined image (or for the original and
  the refined image), with its pixel inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...core import templates
from ...errors import InputError

#: the official code's LLaVA-1.5 prompt (ViCrop style, not llava-hf's template): `<image>\\nUSER: {text}\\nASSISTANT:`;
#: set it as the processor's `chat_template` (and write the prompt with it) for the official prompts of every pass
OFFICIAL_LLAVA_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                           "{{ '<image>\\n' }}{% endif %}{% endfor %}USER: {% for c in m['content'] %}"
                           "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
                           "ASSISTANT:")


@dataclass(frozen=True)
class Prompt:
    """One sample's prompt, split into parts (token ids, 1-D).

    Attributes:
        ids (`torch.LongTensor`): the whole prompt, padding removed.
        per_position (`dict[str, torch.Tensor]`): inputs with one value per token (`mm_token_type_ids`, ...).
        segment (`tuple[int, int]`): `[start, end)` of the image segment.
        block (`tuple[int, int]`): `[start, end)` of the processor's block inside it.
        question (`tuple[int, int]`): `[start, end)` of the question.
    """

    ids: torch.Tensor
    per_position: dict[str, torch.Tensor]
    segment: tuple[int, int]
    block: tuple[int, int]
    question: tuple[int, int]


def placeholder(processor: Any) -> str:
    """The text a user writes for an image (Gemma3's processor expands its BOI token, the others their image
    token)."""
    return getattr(processor, "boi_token", None) or processor.image_token


def image_block(processor: Any, images: list[Any], nested: bool) -> dict[str, Any]:
    """The processor's outputs for `images` written one after the other, without special tokens around."""
    text = placeholder(processor) * len(images)
    out = processor(text=[text], images=[images] if nested else images, return_tensors="pt",
                    add_special_tokens=False)
    return dict(out)


def template_parts(processor: Any, image_ids: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(suffix, after image)`: the token ids the chat template puts after every user message (e.g.
    `<|im_end|>\\n<|im_start|>assistant\\n`) and between the image and the user's text (LLaVA's `\\n`), learnt as
    `Handle.set_template` learns them; both empty when the processor has no chat template."""
    if not getattr(processor, "chat_template", None):
        return (), ()
    _, suffix, after = templates.learn(processor, processor.tokenizer, image_ids)
    return suffix, after


def split_prompt(ids: torch.Tensor, per_position: dict[str, torch.Tensor], block: dict[str, Any],
                 image_id: int, special: set[int], suffix: tuple[int, ...], after: tuple[int, ...] = ()) -> Prompt:
    """Locate the parts of one prompt, given the processor's `block` for one image of the same kind; the question
    starts after the template's `after` ids (when they follow the image segment) and ends before its `suffix`.

    Raises:
        InputError: no image token, or the tokens around the image are not what the processor writes.
    """
    image = (ids == image_id).nonzero().flatten()
    if image.numel() == 0:
        raise InputError(f"carve: the prompt has no image token (id {image_id}); build it with the processor")
    block_ids = block["input_ids"][0]
    block_image = (block_ids == image_id).nonzero().flatten()
    head, tail = int(block_image[0]), len(block_ids) - 1 - int(block_image[-1])
    start, end = int(image[0]) - head, int(image[-1]) + 1 + tail
    if start < 0 or not (torch.equal(ids[start:image[0]], block_ids[:head])
                         and torch.equal(ids[image[-1] + 1:end], block_ids[len(block_ids) - tail:])):
        raise InputError("carve: the tokens around the image are not those the processor writes for an image; "
                         "build the prompt with the processor given to wrap")
    seg_start, seg_end = start, end
    while seg_start > 0 and int(ids[seg_start - 1]) in special:
        seg_start -= 1
    while seg_end < len(ids) and int(ids[seg_end]) in special:
        seg_end += 1
    q_start, q_end = seg_end, len(ids)
    if after and tuple(ids[seg_end:seg_end + len(after)].tolist()) == after:
        q_start += len(after)
    if suffix and len(ids) - q_start >= len(suffix) and tuple(ids[-len(suffix):].tolist()) == suffix:
        q_end -= len(suffix)
    return Prompt(ids, per_position, (seg_start, seg_end), (start, end), (q_start, q_end))


def general_inputs(prompt: Prompt, general_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pass G: the prompt with its question replaced by `general_ids`."""
    q0, q1 = prompt.question
    out = {"input_ids": torch.cat([prompt.ids[:q0], general_ids.to(prompt.ids), prompt.ids[q1:]])[None]}
    for key, value in prompt.per_position.items():
        out[key] = torch.cat([value[:q0], value.new_zeros(len(general_ids)), value[q1:]])[None]
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


def final_inputs(prompt: Prompt, blocks: list[dict[str, Any]], pixels: dict[str, Any]) -> dict[str, Any]:
    """Pass F: the prompt with its image segment replaced by one segment per entry of `blocks` (the processor's
    outputs for each image alone), with `pixels` (the processor's outputs for all of them at once) as the vision
    inputs."""
    s0, s1 = prompt.segment
    b0, b1 = prompt.block
    ids, values = [prompt.ids[:s0]], {key: [v[:s0]] for key, v in prompt.per_position.items()}
    for block in blocks:
        block_ids = block["input_ids"][0].to(prompt.ids)
        ids += [prompt.ids[s0:b0], block_ids, prompt.ids[b1:s1]]
        for key, v in prompt.per_position.items():
            new = block[key][0].to(v) if key in block else v.new_zeros(len(block_ids))
            values[key] += [v[s0:b0], new, v[b1:s1]]
    ids.append(prompt.ids[s1:])
    out: dict[str, Any] = {"input_ids": torch.cat(ids)[None]}
    for key, parts in values.items():
        out[key] = torch.cat(parts + [prompt.per_position[key][s1:]])[None]
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    shape = pixels["input_ids"].shape  # the processor's own per-token outputs are not vision inputs
    out.update({key: value for key, value in pixels.items()
                if key not in out and getattr(value, "shape", None) != shape})
    return out
