"""The inputs of CARVE's three passes, spliced at token level from the user's prompt with the processor.

The user's prompt is `[before][image segment][question][template suffix]`. The image segment is what the processor
writes for one image placeholder (e.g. `<fake_token_around_image><global-img><image>…`, Gemma3's `\\n\\n<boi>…`)
plus the special tokens around it that are not BOS/EOS/padding (Qwen's `<|vision_start|>`/`<|vision_end|>`).
The template suffix is the chat template's fixed tail after a user message (empty without a chat template).

- pass G: the question is replaced by the general instruction; the image segment is unchanged, so the image
  encoding of pass Q is reused (`mm_encoder_outputs`);
- pass F: the image segment is replaced by the processor's segment for the refined image (or for the original and
  the refined image), with its pixel inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import InputError


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


def template_suffix(processor: Any) -> tuple[int, ...]:
    """Token ids the chat template puts after every user message (e.g. `<|im_end|>\\n<|im_start|>assistant\\n`);
    empty when the processor has no chat template."""
    if getattr(processor, "chat_template", None) is None:
        return ()
    tokenizer = processor.tokenizer
    renders = []
    for text in ("Question 0", "Question 1"):  # the renders differ in the last digit only
        try:
            rendered = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                                     add_generation_prompt=True, tokenize=False)
        except TypeError:  # a text-only template wants the content as a string
            rendered = processor.apply_chat_template([{"role": "user", "content": text}],
                                                     add_generation_prompt=True, tokenize=False)
        renders.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    a, b = renders
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return tuple(a[len(a) - n:])


def split_prompt(ids: torch.Tensor, per_position: dict[str, torch.Tensor], block: dict[str, Any],
                 image_id: int, special: set[int], suffix: tuple[int, ...]) -> Prompt:
    """Locate the parts of one prompt, given the processor's `block` for one image of the same kind.

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
    q_end = len(ids)
    if suffix and len(ids) - seg_end >= len(suffix) and tuple(ids[-len(suffix):].tolist()) == suffix:
        q_end -= len(suffix)
    return Prompt(ids, per_position, (seg_start, seg_end), (start, end), (seg_end, q_end))


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
