"""Where a (possibly wrapped) VLM looks: the last prompt row's attention over the image tokens on the family's
token grid, and the image-attention share of every generated token.

    amap = iv.attention_map(model, inputs, max_new_tokens=16)   # inputs: one prompt with one image
    amap.heat            # (rows, cols): mean over heads and `amap.layers` of the last prompt row's image weights
    amap.share           # per generated token: its query row's attention mass on the image tokens

Values are `output_attentions` of the model as it is: a wrapped model returns its edited weights (the library's
attention function computes them explicitly); an unwrapped SDPA model is switched to eager attention for the
call and switched back.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError


@dataclass(frozen=True)
class AttentionMap:
    """Attention of one prompt over its image.

    Attributes:
        heat (`torch.Tensor` of shape `(rows, cols)`): the last prompt row's attention weights on the image
            tokens (row-major on the grid), mean over heads and `layers`.
        share (`list[float]`): per generated token, the attention mass its query row puts on the image tokens
            (mean over heads and `layers`); the first entry is the last prompt row's.
        tokens (`list[int]`): the generated token ids.
        layers (`tuple[int, ...]`): the decoder layers averaged.
        image_positions (`list[int]`): positions of the image tokens in the prompt (the grid's cells in order).
    """

    heat: torch.Tensor
    share: list[float]
    tokens: list[int]
    layers: tuple[int, ...]
    image_positions: list[int]


def middle_layers(n_layers: int) -> tuple[int, ...]:
    """The default band: the middle half of the decoder layers (at least one)."""
    start = n_layers // 4
    return tuple(range(start, max(start + 1, n_layers - n_layers // 4)))


def image_grid(model: torch.nn.Module) -> tuple[int, int]:
    """`(rows, cols)` of the family's image-token grid (one grid per image: llava, idefics3 crops, gemma3).

    Raises:
        InputError: a family whose grid depends on the image (llava_next) or that has none (text-only, M-RoPE).
    """
    from .errors import ConfigError
    from .families import resolve

    adapter = resolve(model)
    family = adapter.name
    try:
        grid = adapter.fixed_grid(model.config, "attention_map")
    except ConfigError as e:  # the family's refusal (no 2-D grid), as an input error of this caller
        raise InputError(str(e)) from None
    if grid is None:
        raise InputError(f"attention_map: the {family} grid depends on each image (any-resolution crops); "
                         "supported: families with one fixed grid per image (llava, idefics3, gemma3)")
    return grid.rows, grid.cols


def attention_map(model: torch.nn.Module, inputs: dict[str, Any], layers: list[int] | None = None,
                  max_new_tokens: int = 16) -> AttentionMap:
    """Greedy-generate from `inputs` (batch 1) with `output_attentions` and read the image attention.

    Args:
        model: a VLM, wrapped or not.
        inputs: processor outputs for one prompt holding one image (several crops: the last grid, the global
            image in idefics3, is mapped).
        layers: decoder layers to average; default `middle_layers`.
        max_new_tokens: length of the generated description.

    Raises:
        InputError: a batch of several prompts, no image tokens, a token count that is not a multiple of the
            grid, a layer out of range.
    """
    from .families import resolve

    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise InputError(f"attention_map takes one prompt, got a batch of {ids.shape[0]}")
    rows, cols = image_grid(model)
    image_ids = torch.tensor(resolve(model).image_token_ids(model), device=ids.device)
    positions = torch.nonzero(torch.isin(ids[0], image_ids)).flatten().tolist()
    if not positions or len(positions) % (rows * cols):
        raise InputError(f"attention_map: {len(positions)} image tokens in the prompt, not a multiple of the "
                         f"{rows} × {cols} grid")
    n_layers = len(resolve(model).attention_modules(model))
    chosen = tuple(layers) if layers is not None else middle_layers(n_layers)
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad or not chosen:
        raise InputError(f"attention_map: layers {bad or chosen} out of range 0..{n_layers - 1}")
    with torch.no_grad(), _explicit_weights(model):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             output_attentions=True, return_dict_in_generate=True)
    grid = positions[-rows * cols:]
    all_image = torch.tensor(positions, device=ids.device)
    steps = [torch.stack([step[i][0, :, -1].float() for i in chosen]).mean(dim=(0, 1)) for step in out.attentions]
    heat = steps[0][torch.tensor(grid, device=ids.device)].reshape(rows, cols).cpu()
    share = [float(row[all_image].sum()) for row in steps]
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return AttentionMap(heat, share[:len(tokens)], tokens, chosen, positions)


@contextmanager
def _explicit_weights(model: torch.nn.Module):
    """Eager attention for an unwrapped model (SDPA returns no weights); a wrapped model already returns them."""
    from .core.attention import KEYS
    from .families import resolve

    previous = resolve(model).text_config(model)._attn_implementation
    if previous in KEYS.values() or previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
