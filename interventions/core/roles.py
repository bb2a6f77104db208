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
        prompt_len (`int`): padded prompt length; positions `>= prompt_len` are generated tokens.
    """

    valid: torch.Tensor
    image: torch.Tensor
    prompt_len: int

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
            return TokenRoles(self.valid[:, :key_len], self.image[:, :key_len], self.prompt_len)
        pad = torch.zeros(self.batch_size, key_len - self.length, dtype=torch.bool, device=self.valid.device)
        return TokenRoles(torch.cat([self.valid, pad], 1), torch.cat([self.image, pad], 1), self.prompt_len)

    @classmethod
    def from_prompt(cls, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                    image_token_ids: tuple[int, ...], length: int, batch_size: int, prompt_len: int,
                    device: torch.device) -> TokenRoles:
        """Roles of a fresh sequence (empty cache) of `length` positions."""
        valid = _valid(attention_mask, batch_size, length, device)
        image = _image(input_ids, image_token_ids, batch_size, length, device) & valid
        return cls(valid, image, prompt_len)

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
            raise InputError(f"batch size changed from {b} to {input_ids.shape[0]} during decoding")
        kept = TokenRoles(self.valid[:, :past_len], self.image[:, :past_len], min(self.prompt_len, past_len))
        total = past_len + new_len
        if attention_mask is not None and attention_mask.shape[-1] >= total:
            valid = attention_mask[:, -total:].to(device=device, dtype=torch.bool)
        else:
            valid = torch.cat([kept.valid, torch.ones(b, new_len, dtype=torch.bool, device=device)], 1)
        image = torch.cat([kept.image, _image(input_ids, image_token_ids, b, new_len, device)], 1) & valid
        return TokenRoles(valid, image, self.prompt_len if past_len >= self.prompt_len else kept.prompt_len)


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
