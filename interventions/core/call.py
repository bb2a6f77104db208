"""The types the core hands to methods for one attention call."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .roles import TokenRoles


@dataclass(frozen=True)
class AttentionCall:
    """One call of a text-decoder attention function.

    Attributes:
        layer (`int`): decoder layer index.
        roles (`TokenRoles`): roles of the keys, `kv_len` long.
        query_positions (`torch.LongTensor` of shape `(q_len,)`): absolute positions of the query rows.
        stream (`str`): `"main"`, or the name of the branch (core/branch.py) this forward belongs to.
        value (`torch.Tensor` of shape `(batch, kv_heads, kv_len, head_dim)`, *optional*): the layer's values.
        attention_mask (`torch.Tensor`, *optional*): the mask the model passed to its attention function.
        first_position (`int`, *optional*): the first query row's absolute position, known on the host.
    """

    layer: int
    roles: TokenRoles
    query_positions: torch.Tensor
    stream: str = "main"
    value: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    #: `query_positions[0]` as a Python int, when the core knows it (reading the tensor would wait for a GPU)
    first_position: int | None = None

    @property
    def covers_prompt(self) -> bool:
        """True when this call's rows include the whole prompt (a prefill, or a no-cache recompute)."""
        first = self.first_position if self.first_position is not None else int(self.query_positions[0])
        return first == 0


@dataclass(frozen=True)
class RowRequest:
    """Rows (and heads) a method edits in one attention call.

    Attributes:
        rows (`torch.BoolTensor` of shape `(q_len,)`): rows the method edits.
        heads (`torch.LongTensor`, *optional*): query heads it edits; `None` for all.
        read_only (`bool`): the method reads the rows (e.g. a saliency map) without editing them.
        observe (`bool`): the core shows the method every block of the rows (`Method.observe`) before editing any.
        blockwise (`bool`): the method reads each row on its own (no statistic across rows inside one `edit`), so
            many rows may be computed in blocks of bounded memory.
        grad (`bool`): the method differentiates a later loss with respect to these rows' final probabilities;
            with grad mode on, the core hands them to `Method.grad_probs` (see there).
        columns (`bool`): the method's bias falls only on the few key columns `Method.edit_columns` names, and its
            `observe` needs only the attention each key receives (`Method.observe_received`). Where every request
            of a layer says so and a fused kernel with row log-sum-exp is available (`core/fused.py`), the core
            keeps the layer on that kernel, hands `edit` a view of those columns only, and corrects the output in
            closed form; otherwise it uses the explicit rows as for any request.
    """

    rows: torch.Tensor
    heads: torch.Tensor | None = None
    #: the method only reads these rows (adds no bias): their base-backend output is kept bit for bit
    read_only: bool = False
    #: every block of these rows goes to `Method.observe` before the first `edit` (a row's edit needs all rows)
    observe: bool = False
    #: the method's `observe` and `edit` read each row on its own, so the core may hand the rows over in blocks
    blockwise: bool = False
    grad: bool = False
    #: the bias touches only `Method.edit_columns`: the core may use the fused kernel and a closed-form correction
    columns: bool = False
