"""Per-sample token roles, computed from `input_ids` at prefill and extended at every decode step.

Positions are absolute indices into the key/value sequence (left padding included), so the same tensors index the
keys of every attention call of the sequence, with or without a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    valid: torch.Tensor
    image: torch.Tensor
    template: torch.Tensor
    prompt_len: int
    ids: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def generated(self) -> torch.Tensor:
        """`(batch, length)` bool: valid positions produced by decoding."""
        pos = torch.arange(self.length, device=self.valid.device)
        return self.valid & (pos >= self.prompt_len)

    @property
    def text(self) -> torch.Tensor:
        """`(batch, length)` bool: valid prompt positions that are not image tokens."""
        return self.valid & ~self.image & ~self.generated

    @property
    def prompt_image(self) -> torch.Tensor:
        """`(batch, length)` bool: image positions of the prompt (a generated image-token id is not an image)."""
        return self.image & (torch.arange(self.length, device=self.valid.device) < self.prompt_len)

    def after_last_image(self) -> torch.Tensor:
        """`(batch, length)` bool: positions after the sample's last prompt image token (all of them without one)."""
        pos = torch.arange(self.length, device=self.valid.device)
        return pos > torch.where(self.prompt_image, pos, -1).amax(1, keepdim=True)

    @property
    def question(self) -> torch.Tensor:
        """`(batch, length)` bool: prompt text after the sample's last image token (all prompt text without an
        image), minus template tokens."""
        return self.text & ~self.template & self.after_last_image()

    def image_spans(self, sample: int) -> list[tuple[int, int]]:
        """Contiguous runs `[start, end)` of image positions of one sample."""
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
        """Roles padded (with invalid positions) or cut to `key_len` keys, e.g. for a static cache."""
        if key_len == self.length:
            return self
        if key_len < self.length:
            return self._cut(key_len)
        pad = torch.zeros(self.batch_size, key_len - self.length, dtype=torch.bool, device=self.valid.device)
        ids = None if self.ids is None else torch.cat([self.ids, pad.long()], 1)
        return TokenRoles(torch.cat([self.valid, pad], 1), torch.cat([self.image, pad], 1),
                          torch.cat([self.template, pad], 1), self.prompt_len, ids)

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
        valid = _valid(attention_mask, batch_size, length, device)
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
        if attention_mask is not None and attention_mask.shape[-1] >= total:
            valid = attention_mask[:, -total:].to(device=device, dtype=torch.bool)
        else:
            valid = torch.cat([kept.valid, torch.ones(b, new_len, dtype=torch.bool, device=device)], 1)
        image = torch.cat([kept.image, _image(input_ids, image_token_ids, b, new_len, device)], 1) & valid
        # prompt positions fed again after a cache rollback (`Cache.crop`) stay prompt, with their template marks
        prompt_len = min(self.prompt_len, total)
        refed = self.template[:, past_len:prompt_len]
        new_template = torch.zeros(b, new_len - refed.shape[1], dtype=torch.bool, device=device)
        template = torch.cat([kept.template, refed, new_template], 1)
        ids = None if kept.ids is None or input_ids is None else torch.cat([kept.ids, input_ids.to(device)], 1)
        return TokenRoles(valid, image, template, prompt_len, ids)


def _valid(attention_mask: torch.Tensor | None, batch_size: int, length: int, device: torch.device) -> torch.Tensor:
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.ones(batch_size, length, dtype=torch.bool, device=device)
    return attention_mask[:, -length:].to(device=device, dtype=torch.bool)


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
