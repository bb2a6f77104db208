"""Per-sample token roles, computed from `input_ids` at prefill and extended at every decode step.

Positions are absolute indices into the sequence (padding included). The keys of one attention call are not always
every position: a sliding-window layer's cache holds only the newest ones, a static cache pads its unused tail.
`TokenRoles.keys` gives the roles of exactly the keys a call gets (`offset` is the absolute position of the first),
`index` turns absolute positions into indices of those keys and `align` moves a per-position statistic onto them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError


@dataclass(frozen=True)
class TokenRoles:
    """Roles of every position seen so far in the current sequence batch.

    Attributes:
        valid (`torch.BoolTensor` of shape `(batch, length)`): not padding.
        image (`torch.BoolTensor` of shape `(batch, length)`): image placeholder positions.
        template (`torch.BoolTensor` of shape `(batch, length)`): chat-template and image-boundary tokens of the
            prompt (the template part is known only after `Handle.set_template`).
        prompt_len (`int`): padded prompt length; positions `>= prompt_len` are generated tokens.
        ids (`torch.LongTensor` of shape `(batch, length)`, *optional*): the token ids (None with embeddings only).
        offset (`int`, *optional*, defaults to 0): absolute position of index 0. Nonzero only for the roles of the
            keys of a sliding-window layer whose cache dropped its oldest positions (`keys`); `prompt_len` and
            every position a method reads (`AttentionCall.query_positions`, `RowLogits.rows`) stay absolute.
    """

    valid: torch.Tensor
    image: torch.Tensor
    template: torch.Tensor
    prompt_len: int
    ids: torch.Tensor | None = None
    offset: int = 0

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def positions(self) -> torch.Tensor:
        """`(length,)` long: the absolute position of each index."""
        return torch.arange(self.offset, self.offset + self.length, device=self.valid.device)

    def index(self, positions: torch.Tensor) -> torch.Tensor:
        """Indices of these roles at absolute `positions` (which must be among `self.positions`)."""
        return positions - self.offset if self.offset else positions

    def align(self, values: torch.Tensor) -> torch.Tensor:
        """`values` over absolute positions `0, 1, ...` (last dimension, e.g. a per-prompt-key statistic) on the
        indices of these roles: `(..., length)`, zero (False) at positions `values` does not reach."""
        part = values[..., self.offset: self.offset + self.length]
        if part.shape[-1] == self.length:
            return part
        pad = torch.zeros(*part.shape[:-1], self.length - part.shape[-1], dtype=part.dtype, device=part.device)
        return torch.cat([part, pad], -1)

    @property
    def last_prompt(self) -> torch.Tensor:
        """`(batch,)` long: each sample's last valid prompt position, absolute (`prompt_len - 1` with left
        padding; earlier for a right-padded short sample). -1 when it lies before these roles' keys: every one of
        them comes after it then."""
        pos = self.positions
        return torch.where(self.valid & (pos < self.prompt_len), pos, -1).amax(1)

    def from_last_prompt(self, positions: torch.Tensor, skip: int = 0) -> torch.Tensor:
        """`(batch, len(positions))` bool: absolute `positions` at or after each sample's last valid prompt
        position, plus `skip` (1: the generated rows only). "The last row" of a left- or right-padded batch."""
        return positions[None, :] >= (self.last_prompt + skip)[:, None]

    @property
    def generated(self) -> torch.Tensor:
        """`(batch, length)` bool: valid positions produced by decoding."""
        return self.valid & (self.positions >= self.prompt_len)

    @property
    def text(self) -> torch.Tensor:
        """`(batch, length)` bool: valid prompt positions that are not image tokens."""
        return self.valid & ~self.image & ~self.generated

    @property
    def prompt_image(self) -> torch.Tensor:
        """`(batch, length)` bool: image positions of the prompt (a generated image-token id is not an image)."""
        return self.image & (self.positions < self.prompt_len)

    def after_last_image(self) -> torch.Tensor:
        """`(batch, length)` bool: positions after the sample's last prompt image token (all of them without one)."""
        pos = self.positions
        return pos > torch.where(self.prompt_image, pos, -1).amax(1, keepdim=True)

    @property
    def question(self) -> torch.Tensor:
        """`(batch, length)` bool: prompt text after the sample's last image token (all prompt text without an
        image), minus template tokens."""
        return self.text & ~self.template & self.after_last_image()

    def image_spans(self, sample: int) -> list[tuple[int, int]]:
        """Contiguous runs `[start, end)` of image indices of one sample."""
        flags = self.image[sample].tolist()
        spans, start = [], None
        for i, flag in enumerate(flags + [False]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                spans.append((start, i))
                start = None
        return spans

    def keys(self, key_len: int) -> TokenRoles:
        """Roles of the `key_len` keys an attention call gets, as transformers' caches hand them over: every position
        (`key_len == length`); the newest `key_len` (a sliding-window layer once its cache dropped the oldest:
        `offset` becomes the first one's position); or every position, then invalid padding (a static cache's
        preallocated tail, its keys at their absolute positions)."""
        if key_len == self.length:
            return self
        if key_len < self.length:
            start = self.length - key_len
            ids = None if self.ids is None else self.ids[:, start:]
            return TokenRoles(self.valid[:, start:], self.image[:, start:], self.template[:, start:], self.prompt_len,
                              ids, self.offset + start)
        pad = torch.zeros(self.batch_size, key_len - self.length, dtype=torch.bool, device=self.valid.device)
        ids = None if self.ids is None else torch.cat([self.ids, pad.long()], 1)
        return TokenRoles(torch.cat([self.valid, pad], 1), torch.cat([self.image, pad], 1),
                          torch.cat([self.template, pad], 1), self.prompt_len, ids, self.offset)

    def select_rows(self, index: torch.Tensor) -> TokenRoles:
        """The roles of rows `index` (a beam search's reordering of the batch)."""
        index = index.to(self.valid.device)
        ids = None if self.ids is None else self.ids.index_select(0, index)
        return TokenRoles(self.valid.index_select(0, index), self.image.index_select(0, index),
                          self.template.index_select(0, index), self.prompt_len, ids)

    def _repeat(self, times: int) -> TokenRoles:
        """Each sample's roles `times` times in a row (the order of `Cache.batch_repeat_interleave`)."""
        ids = None if self.ids is None else self.ids.repeat_interleave(times, 0)
        return TokenRoles(self.valid.repeat_interleave(times, 0), self.image.repeat_interleave(times, 0),
                          self.template.repeat_interleave(times, 0), self.prompt_len, ids)

    def _cut(self, length: int) -> TokenRoles:
        ids = None if self.ids is None else self.ids[:, :length]
        return TokenRoles(self.valid[:, :length], self.image[:, :length], self.template[:, :length],
                          min(self.prompt_len, length), ids)

    @classmethod
    def from_prompt(cls, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                    image_token_ids: tuple[int, ...], length: int, batch_size: int, prompt_len: int,
                    device: torch.device, boundary_ids: tuple[int, ...] = (),
                    template: tuple[tuple[int, ...], ...] | None = None) -> TokenRoles:
        """Roles of a fresh sequence (empty cache) of `length` positions.

        `template` is the chat template's fixed `(prefix ids, suffix ids[, ids after the image])`: matched at the
        start of each sample's tokens, at the end of its prompt and right after its last prompt image token.
        `boundary_ids` (image start/end markers) count as template too.
        """
        valid = _valid(attention_mask, 0, length, batch_size, device)
        image = _image(input_ids, image_token_ids, batch_size, length, device) & valid
        marks = _image(input_ids, boundary_ids, batch_size, length, device) & valid
        if template is not None and input_ids is not None:
            marks |= _template(input_ids, valid, prompt_len, *template[:2])
            if len(template) > 2 and template[2]:
                marks |= _after_image(input_ids, valid, image, prompt_len, template[2])
        return cls(valid, image, marks, prompt_len, None if input_ids is None else input_ids.to(device))

    def extend(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, past_len: int,
               new_len: int, image_token_ids: tuple[int, ...]) -> TokenRoles:
        """Roles after appending `new_len` positions to a cache holding `past_len` of them."""
        if past_len > self.length:
            raise InputError(
                f"the KV cache holds {past_len} positions but this wrapper saw only {self.length}; "
                "run the prompt through the wrapped model (prefill) before decoding with a cache"
            )
        b, device = self.batch_size, self.valid.device
        if input_ids is not None and input_ids.shape[0] != b:
            if input_ids.shape[0] % b:
                raise InputError(f"batch size changed from {b} to {input_ids.shape[0]} during decoding")
            # a cache grown by `batch_repeat_interleave` (a shared prefix continued by several rows)
            return self._repeat(input_ids.shape[0] // b).extend(input_ids, attention_mask, past_len, new_len,
                                                                image_token_ids)
        kept = self._cut(past_len)
        total = past_len + new_len
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.shape[-1] >= total:
            valid = attention_mask[:, -total:].to(device=device, dtype=torch.bool)
        else:
            valid = torch.cat([kept.valid, _valid(attention_mask, past_len, new_len, b, device)], 1)
        image = torch.cat([kept.image, _image(input_ids, image_token_ids, b, new_len, device)], 1) & valid
        # prompt positions fed again after a cache rollback (`Cache.crop`) stay prompt, with their template marks
        prompt_len = min(self.prompt_len, total)
        refed = self.template[:, past_len:prompt_len]
        new_template = torch.zeros(b, new_len - refed.shape[1], dtype=torch.bool, device=device)
        template = torch.cat([kept.template, refed, new_template], 1)
        ids = None if kept.ids is None or input_ids is None else torch.cat([kept.ids, input_ids.to(device)], 1)
        return TokenRoles(valid, image, template, prompt_len, ids)


def _valid(attention_mask: Any, past_len: int, new_len: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """`(batch, new_len)` bool: which of the positions `past_len .. past_len + new_len - 1` are not padding, from the
    mask the model was given: a 2-D padding mask; a 4-D one `(batch, 1, q_len, kv_len)` (bool or additive, e.g. the
    one `generate` builds for a static cache), or a dict of them per layer type, read on its diagonal (a padding
    key is masked for every row, a real one is seen by its own row); none: all valid."""
    if isinstance(attention_mask, dict):
        masks = [m for m in attention_mask.values() if isinstance(m, torch.Tensor)]
        attention_mask = masks[0] if masks else None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        return torch.ones(batch_size, new_len, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2:
        if attention_mask.shape[-1] < new_len:
            raise InputError(f"the attention mask has {attention_mask.shape[-1]} columns for {new_len} new tokens")
        return attention_mask[:, -new_len:].to(device=device, dtype=torch.bool)
    q_len, width, total = attention_mask.shape[-2], attention_mask.shape[-1], past_len + new_len
    if q_len < new_len:
        raise InputError(f"the 4-D attention mask has {q_len} query rows for {new_len} new tokens")
    columns = torch.arange(past_len, total, device=attention_mask.device)
    if width < total:  # a window of the newest keys
        columns = columns - (total - width)
    rows = torch.arange(q_len - new_len, q_len, device=attention_mask.device)
    diagonal = attention_mask[:, 0, rows, columns]
    if diagonal.dtype != torch.bool:
        diagonal = diagonal > torch.finfo(diagonal.dtype).min / 2
    return diagonal.expand(batch_size, -1).to(device)


def _image(input_ids: torch.Tensor | None, image_token_ids: tuple[int, ...], batch_size: int, length: int,
           device: torch.device) -> torch.Tensor:
    if input_ids is None or not image_token_ids:
        return torch.zeros(batch_size, length, dtype=torch.bool, device=device)
    ids = input_ids.to(device)
    return torch.isin(ids, torch.tensor(image_token_ids, device=device))


def _template(input_ids: torch.Tensor, valid: torch.Tensor, prompt_len: int, prefix: tuple[int, ...],
              suffix: tuple[int, ...]) -> torch.Tensor:
    """Positions where each sample's valid prompt starts with `prefix` and ends with `suffix`."""
    marks = torch.zeros_like(valid)
    for b in range(input_ids.shape[0]):
        positions = valid[b, :prompt_len].nonzero().flatten().tolist()
        tokens = input_ids[b, positions].tolist()
        if prefix and tokens[: len(prefix)] == list(prefix):
            marks[b, positions[: len(prefix)]] = True
        if suffix and len(tokens) >= len(prefix) + len(suffix) and tokens[-len(suffix):] == list(suffix):
            marks[b, positions[-len(suffix):]] = True
    return marks


def _after_image(input_ids: torch.Tensor, valid: torch.Tensor, image: torch.Tensor, prompt_len: int,
                 after: tuple[int, ...]) -> torch.Tensor:
    """Positions right after each sample's last prompt image token that hold the template's `after` ids."""
    marks = torch.zeros_like(valid)
    for b in range(input_ids.shape[0]):
        images = image[b, :prompt_len].nonzero().flatten()
        if not len(images):
            continue
        positions = [p for p in range(int(images[-1]) + 1, prompt_len) if valid[b, p]][: len(after)]
        if input_ids[b, positions].tolist() == list(after):
            marks[b, positions] = True
    return marks
