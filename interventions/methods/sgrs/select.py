"""SGRS's acceptance rule for one decoding step, batched with per-sample state (shared/specs/sgrs_locore.md §3).

Candidates are the top-K tokens of the step's scores. Up to R rounds: draw a candidate among those left (multinomial
over their renormalised probabilities, or the best one when decoding greedily), accept it when its saliency is at
least τ = α · mean of the sample's last W accepted saliencies (τ = 0 with no history), else remove it and draw
again. A sample whose R draws are all rejected takes the candidate of highest saliency among the original top-K.
Saliencies are computed at most once per (sample, candidate) and step: the fallback reuses the rejected ones.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TopKLogitsWarper

#: saliency of one candidate token per sample, `(batch,)` long → `(batch,)` float
SaliencyFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Choice:
    """The token picked for each sample at one step.

    Attributes:
        tokens (`torch.LongTensor` of shape `(batch,)`): the chosen tokens.
        saliency (`torch.Tensor` of shape `(batch,)`): their saliency (NaN where none was computed).
        accepted (`torch.BoolTensor` of shape `(batch,)`): chosen by acceptance (False: the fallback).
        rejected (`torch.LongTensor` of shape `(batch,)`): candidates rejected at this step.
    """

    tokens: torch.Tensor
    saliency: torch.Tensor
    accepted: torch.Tensor
    rejected: torch.Tensor


class Sampler:
    """Draws one token per row from scores: multinomial (transformers' own draw) or argmax when not sampling.

    Args:
        do_sample (`bool`): sample; otherwise take the highest score.
        seeds (`list[int]`, *optional*): one generator per sample seeded with these; None draws from torch's global
            generator exactly as transformers' `_sample` does (one `torch.multinomial` over the rows).
        device (`torch.device`): device of the generators.
    """

    def __init__(self, do_sample: bool, seeds: list[int] | None, device: torch.device) -> None:
        self.do_sample = do_sample
        self.generators = None if seeds is None else [torch.Generator(device).manual_seed(s) for s in seeds]

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Tokens `(batch,)` drawn from `scores` `(batch, vocab)` for the `rows` `(batch,)` bool (others: argmax)."""
        tokens = scores.argmax(-1)
        if not self.do_sample:
            return tokens
        probs = torch.softmax(scores, dim=-1)
        picked = rows.nonzero().flatten()
        if self.generators is None:
            tokens[picked] = torch.multinomial(probs[picked], num_samples=1).squeeze(1)
            return tokens
        for b in picked.tolist():
            tokens[b] = torch.multinomial(probs[b:b + 1], num_samples=1, generator=self.generators[b])[0, 0]
        return tokens


def sample_seeds(seed: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """One seed per sample from `seed`, its unpadded prompt and its rank among identical prompts of the batch, so
    that a prompt draws the same tokens alone or in any batch, and copies (`num_return_sequences`) differ."""
    seen: Counter[bytes] = Counter()
    seeds = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
        key = ids.to(torch.int64).cpu().numpy().tobytes()
        digest = hashlib.sha256(f"{seed}:{seen[key]}:".encode() + key).digest()
        seen[key] += 1
        seeds.append(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return seeds


class History:
    """Per-sample saliencies of the last `window` accepted tokens, and the thresholds τ = α · their mean."""

    def __init__(self, batch: int, window: int, alpha: float, device: torch.device) -> None:
        self.values = torch.full((batch, window), float("nan"), device=device)
        self.alpha = alpha

    def thresholds(self) -> torch.Tensor:
        """τ per sample, `(batch,)`; 0 for a sample without history (its first token is always accepted)."""
        return self.alpha * self.values.nanmean(1).nan_to_num(0.0)

    def add(self, saliency: torch.Tensor, rows: torch.Tensor) -> None:
        """Append `saliency[b]` for every `rows[b]`, dropping the oldest entry."""
        shifted = torch.cat([self.values[:, 1:], saliency[:, None].to(self.values.dtype)], 1)
        self.values = torch.where(rows[:, None], shifted, self.values)


def choose(scores: torch.Tensor, top_k: int, rounds: int, draw: Sampler, active: torch.Tensor,
           thresholds: torch.Tensor, saliency: SaliencyFn | None) -> Choice:
    """Pick one token per sample by SGRS's rule.

    Args:
        scores (`torch.Tensor` of shape `(batch, vocab)`): next-token scores after `generate`'s logits processors.
        top_k (`int`): K, the candidates per step.
        rounds (`int`): R, draws before the fallback.
        draw (`Sampler`): draws a candidate among those left.
        active (`torch.BoolTensor` of shape `(batch,)`): unfinished samples; the others take their first draw.
        thresholds (`torch.Tensor` of shape `(batch,)`): τ per sample.
        saliency (`SaliencyFn`, *optional*): saliency of a token per sample; None when every τ is 0 and nothing
            needs recording (α = 0): the first draw is taken, which is plain top-K sampling.

    Returns:
        `Choice`.
    """
    batch = scores.shape[0]
    left = TopKLogitsWarper(top_k)(None, scores)
    tokens = draw(left, torch.ones(batch, dtype=torch.bool, device=scores.device))  # every row, as transformers
    nan = torch.full((batch,), float("nan"), device=scores.device)
    rejected = torch.zeros(batch, dtype=torch.long, device=scores.device)
    if saliency is None:
        return Choice(tokens, nan, torch.ones_like(active), rejected)
    candidates = torch.topk(left, min(top_k, left.shape[-1]), dim=-1).indices  # (batch, K): C_orig
    valid = torch.isfinite(left.gather(1, candidates))  # fewer than K tokens may be left by other processors
    known = torch.full(candidates.shape, float("nan"), device=scores.device)
    chosen, decided = nan.clone(), ~active
    for round_ in range(rounds):
        if round_ > 0:
            pending = ~decided & torch.isfinite(left).any(-1)
            if not pending.any():
                break
            tokens = torch.where(pending, draw(left, pending), tokens)
        values = saliency(tokens)
        known = torch.where(candidates == tokens[:, None], values[:, None], known)
        ok = ~decided & (values >= thresholds)
        removed = (~decided & ~ok).nonzero().flatten()
        left[removed, tokens[removed]] = float("-inf")
        rejected[removed] += 1
        chosen = torch.where(ok, values, chosen)
        decided |= ok
    accepted = decided & active
    fallback = ~decided
    if fallback.any():
        for k in range(candidates.shape[1]):
            need = fallback & valid[:, k] & known[:, k].isnan()
            if need.any():
                known[:, k] = torch.where(need, saliency(candidates[:, k]), known[:, k])
        best = known.masked_fill(~valid, float("-inf")).argmax(1, keepdim=True)
        tokens = torch.where(fallback, candidates.gather(1, best)[:, 0], tokens)
        chosen = torch.where(fallback, known.gather(1, best)[:, 0], chosen)
    return Choice(tokens, chosen, accepted, rejected)
