"""Second streams ("branches"): forwards the core runs beside the wrapped model's own, for methods that contrast
the model with a variant of itself (heads perturbed, the prompt without its image).

A method declares its branches in `bind` (`Method.branches`); the core runs them, the method only configures them:
which inputs a branch sees, in which layers the owner's hooks run there (every other method of the stack is off in
a branch: a branch is the unedited model plus its owner's edits), and, for a branch that mirrors every forward, how
the two streams' next-token scores combine (`Method.combine_logits`).

- `schedule="prefill"`: one pass, without a cache, before the first forward of a sequence (a prefill; not a no-cache
  recompute of a generation in progress, which keeps what the first pass found). `refresh_before` names main layers
  before which the core runs it again within that first forward, when the owner's edits in the main stream change
  what the branch computes.
- `schedule="every_forward"`: mirrors every forward of the main stream (prefill, each decode step, each no-cache
  recompute) with its own KV cache, fed the same new tokens; after the main forward, the owner combines the two
  logits tensors row by row, aligned from the right (left padding keeps the newest tokens aligned).
- `inputs="same"`: the main inputs. `inputs="no_image"`: each sample's tokens without its image placeholders and
  the family's image boundary markers, re-padded on the left; vision inputs dropped; position ids from the new mask.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError
from .roles import TokenRoles

if TYPE_CHECKING:
    from .contract import Method
    from .session import Session

#: name of the wrapped model's own stream (`AttentionCall.stream`)
MAIN = "main"

#: logits entries combined at a time (16 MiB of float32): bounds the temporaries of a full-sequence combination
_CHUNK_ELEMENTS = 1 << 22
#: inputs a branch never receives (it only needs next-token logits)
_NOT_FORWARDED = ("labels", "output_attentions", "output_hidden_states", "cache", "past_key_values")


@dataclass(frozen=True)
class Branch:
    """One second stream of a method.

    Attributes:
        name (`str`): stream name, unique in the stack; the owner's hooks see it as `call.stream`.
        inputs (`str`): `"same"` or `"no_image"` (see the module docstring).
        schedule (`str`): `"every_forward"` (own KV cache, logits combined) or `"prefill"` (one pass per sequence).
        layers (`frozenset[int]`): layers where the owner's hooks run in this stream.
        refresh_before (`frozenset[int]`): `"prefill"` branches only: main layers before which it runs again.
    """

    name: str
    inputs: str = "same"
    schedule: str = "every_forward"
    layers: frozenset[int] = frozenset()
    refresh_before: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.inputs not in ("same", "no_image") or self.schedule not in ("every_forward", "prefill"):
            raise ValueError(f"branch {self.name}: inputs {self.inputs!r} / schedule {self.schedule!r} unknown")
        if self.refresh_before and self.schedule != "prefill":
            raise ValueError(f"branch {self.name}: refresh_before needs schedule='prefill'")


@dataclass
class _State:
    """What a branch keeps between the forwards of one sequence."""

    roles: TokenRoles
    cache: Any
    mask: torch.Tensor | None  # (batch, branch length) 2-D mask; None when the main inputs have none ("same")
    main_length: int  # main positions this state covers
    aligned: torch.Tensor  # (batch, main length): main positions that have a counterpart in the branch
    logits: torch.Tensor | None = None


class BranchRunner:
    """Runs the branches of a session's methods around each forward of the main stream."""

    def __init__(self, session: Session, methods: list[Method], image_ids: tuple[int, ...],
                 boundary_ids: tuple[int, ...]) -> None:
        self.session = session
        self.owned = [(m, b) for m in methods for b in m.branches]
        names = [b.name for _, b in self.owned]
        if len(set(names)) != len(names):
            raise ValueError(f"branch names must be unique in a stack; got {names}")
        self._image_ids, self._boundary_ids = image_ids, boundary_ids
        params = inspect.signature(session.model.forward).parameters
        self._cache_key = "cache" if "cache" in params else "past_key_values"
        self._keep_one = "logits_to_keep" in params
        self._states: dict[str, _State] = {}
        self._main: tuple[torch.Tensor | None, dict[str, Any]] | None = None
        self._fresh = False

    def _owners(self) -> str:
        """The names of the methods that own branches, for messages."""
        return ", ".join(dict.fromkeys(m.name for m, _ in self.owned))

    @property
    def mirrors(self) -> bool:
        """True when some branch follows every forward (decoding then needs both caches in step)."""
        return any(b.schedule == "every_forward" for _, b in self.owned)

    @property
    def refresh_layers(self) -> frozenset[int]:
        return frozenset().union(*(b.refresh_before for _, b in self.owned))

    def layers(self) -> dict[str, dict[int, list[Method]]]:
        """`{stream: {layer: [owner]}}`: who runs in which layer of each branch."""
        return {b.name: {layer: [m] for layer in b.layers} for m, b in self.owned}

    # ---- around the main forward -----------------------------------------------------------------------------
    def before_main(self, args: tuple, kwargs: dict, past_len: int) -> None:
        """Run the branches due before this main forward (the main roles are already up to date)."""
        if len(args) > 1:
            raise InputError(f"with a branch method ({self._owners()}) pass the model inputs as keywords")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._main = (ids, {**kwargs, "input_ids": ids} if args else kwargs)
        roles = self.session.roles
        self._fresh = past_len == 0 and not bool(roles.generated.any())
        for _, branch in self.owned:
            if branch.schedule == "every_forward":
                self._run(branch, past_len)
            elif self._fresh:
                self._run(branch, 0)

    def refresh(self, layer: int) -> None:
        """Re-run the prefill branches that asked for it before main `layer` of a sequence's first forward."""
        if self.session.stream != MAIN or not self._fresh:
            return
        for _, branch in self.owned:
            if layer in branch.refresh_before:
                self._run(branch, 0)

    def after_main(self, output: Any) -> Any:
        """Combine the main logits with each mirroring branch's, in stack order."""
        if isinstance(output, tuple):
            raise InputError(f"{self._owners()} combine logits: call the model with return_dict=True")
        for method, branch in self.owned:
            if branch.schedule != "every_forward":
                continue
            state = self._states[branch.name]
            other, state.logits = state.logits, None
            output.logits = _combine(method, branch, output.logits, other, state.aligned)
        return output

    # ---- one branch forward ----------------------------------------------------------------------------------
    def _run(self, branch: Branch, past_len: int) -> None:
        ids, kwargs = self._main
        main_roles = self.session.roles
        if past_len == 0:
            state, inputs = self._fresh_inputs(branch, ids, kwargs, main_roles)
        else:
            state = self._states.get(branch.name)
            if state is None or state.main_length != past_len:
                raise InputError(
                    f"branch {branch.name!r} holds {None if state is None else state.main_length} positions but the "
                    f"main KV cache holds {past_len}: a cache that was rolled back, reordered (beam search) or filled "
                    "outside this wrapper cannot be followed; decode greedily or by sampling with the wrapped model"
                )
            inputs = self._decode_inputs(branch, state, ids, kwargs, main_roles)
        inputs.update({k: v for k, v in kwargs.items() if k not in inputs and k not in _NOT_FORWARDED
                       and not (branch.inputs == "no_image" and self.session.adapter.is_vision_input(k))})
        if branch.schedule == "prefill":
            inputs["use_cache"] = False
            if self._keep_one:
                inputs["logits_to_keep"] = 1
        elif past_len > 0:
            inputs[self._cache_key] = state.cache
        inputs["return_dict"] = True
        with self._stream(branch.name, state.roles):
            out = self.session.model(**inputs)
        if branch.schedule == "every_forward":
            state.cache = out.get(self._cache_key)
            state.main_length = main_roles.length
            state.logits = out.logits
            self._states[branch.name] = state

    def _fresh_inputs(self, branch: Branch, ids: torch.Tensor | None, kwargs: dict,
                      roles: TokenRoles) -> tuple[_State, dict[str, Any]]:
        if branch.inputs == "same":
            return _State(roles, None, kwargs.get("attention_mask"), roles.length, torch.ones_like(roles.valid)), {}
        if ids is None:
            raise InputError(f"branch {branch.name!r} removes image tokens, so it needs input_ids (got embeddings)")
        if not bool(roles.valid[:, -1].all()):  # streams are aligned at their last tokens
            raise InputError(f"branch {branch.name!r} ({self._owners()}) needs left padding; this batch is padded on "
                             "the right (set the tokenizer's or processor's padding_side='left')")
        drop = roles.image | torch.isin(ids, torch.tensor(self._boundary_ids, dtype=ids.dtype, device=ids.device))
        keep = roles.valid & ~drop
        width = int(keep.sum(1).max())
        mask = _left_pack(keep.long(), keep, width, fill=0)
        inputs = {"input_ids": _left_pack(ids, keep, width, fill=0)}
        for key in self.session.adapter.per_position_inputs:
            if kwargs.get(key) is not None:
                inputs[key] = _left_pack(kwargs[key], keep, width, fill=0)
        inputs["attention_mask"] = mask
        inputs["position_ids"] = _positions(mask, width, kwargs.get("position_ids"))
        position = torch.arange(roles.length, device=ids.device)
        last_dropped = torch.where(drop & roles.valid, position, -1).amax(1, keepdim=True)
        generated = roles.length - roles.prompt_len
        branch_roles = TokenRoles.from_prompt(inputs["input_ids"], mask, self._image_ids, width, ids.shape[0],
                                              width - generated, ids.device, self._boundary_ids,
                                              self.session.template)
        return _State(branch_roles, None, mask, roles.length, position > last_dropped), inputs

    def _decode_inputs(self, branch: Branch, state: _State, ids: torch.Tensor | None, kwargs: dict,
                       roles: TokenRoles) -> dict[str, Any]:
        new_len = roles.length - state.main_length
        state.aligned = torch.cat([state.aligned, torch.ones_like(roles.valid[:, -new_len:])], 1)
        if branch.inputs == "same":
            state.roles = roles
            return {}
        mask = kwargs.get("attention_mask")
        new_mask = (mask[:, -new_len:] if mask is not None and mask.dim() == 2
                    else torch.ones(roles.batch_size, new_len, dtype=torch.long, device=roles.valid.device))
        past = state.mask.shape[1]
        state.mask = torch.cat([state.mask, new_mask.to(state.mask)], 1)
        state.roles = state.roles.extend(ids, state.mask, past, new_len, self._image_ids)
        return {"attention_mask": state.mask,
                "position_ids": _positions(state.mask, new_len, kwargs.get("position_ids"))}

    @contextlib.contextmanager
    def _stream(self, name: str, roles: TokenRoles) -> Iterator[None]:
        session = self.session
        saved = session.stream, session.roles
        session.stream, session.roles = name, roles
        try:
            yield
        finally:
            session.stream, session.roles = saved


def _left_pack(values: torch.Tensor, keep: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """The kept entries of each row of `values` (batch, length), right-aligned in a `(batch, width)` tensor."""
    out = torch.full((values.shape[0], width), fill, dtype=values.dtype, device=values.device)
    for sample in range(values.shape[0]):
        kept = values[sample, keep[sample]]
        out[sample, width - kept.shape[0]:] = kept
    return out


def _positions(mask: torch.Tensor, new_len: int, like: torch.Tensor | None) -> torch.Tensor:
    """Position ids of the last `new_len` tokens from a left-padded 2-D mask (as `generate` computes them), shaped
    like the main stream's (M-RoPE families pass `(k, batch, len)`; a text-only branch repeats the text positions)."""
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -new_len:]
    if like is not None and like.dim() == 3:
        positions = positions[None].expand(like.shape[0], -1, -1)
    return positions


def _combine(method: Method, branch: Branch, logits: torch.Tensor, other: torch.Tensor,
             aligned: torch.Tensor) -> torch.Tensor:
    """The owner's combination on the rows with a counterpart (the last rows of both, aligned from the right).

    Written into `logits` itself (a float32-or-wider tensor outside autograd), a few rows at a time, so that a
    full-sequence forward holds two logits tensors, not five."""
    rows = min(logits.shape[1], other.shape[1])
    start, other_start = logits.shape[1] - rows, other.shape[1] - rows
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = logits if logits.dtype == dtype and not (torch.is_grad_enabled() and logits.requires_grad) \
        else logits.to(dtype, copy=True)
    chunk = max(1, _CHUNK_ELEMENTS // (logits.shape[0] * logits.shape[2]))
    for first in range(0, rows, chunk):
        last = min(rows, first + chunk)
        main = out[:, start + first:start + last]
        mixed = method.combine_logits(branch, main, other[:, other_start + first:other_start + last])
        where = aligned[:, aligned.shape[1] - rows + first:aligned.shape[1] - rows + last, None]
        main.copy_(torch.where(where, mixed.to(dtype), main))
    return out
