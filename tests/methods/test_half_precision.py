"""Every (method, family) pair in float16 and bfloat16 on CPU: never NaN, and within a stated tolerance of the float32
run. Tolerance: the wrapped model's logits differ from float32 by at most `SLACK` times the unwrapped model's own
half-precision drift plus `ATOL[dtype]` (the edits are computed in float32; only inputs and outputs are rounded).

Discrete choices may flip where a statistic sits at its boundary, and are then compared, not the logits: ACT's sink
set (a threshold on column means) in at most `FLIPS` of its entries, VHR's heads (a median) in at most `VHR_FLIPS`; guidance's −inf
cut-off (PAG, PAI's text-only branch), on at most `FLIPS` of the vocabulary; SGRS's chosen tokens (then only the first
step's logits, which precede any choice)."""

from __future__ import annotations

import functools

import pytest
import torch
from method_cases import STACKS, cases
from tiny_models import LLM_FAMILIES, Prompt, build_model, make_inputs

import interventions as iv

ATOL = {torch.float16: 0.05, torch.bfloat16: 0.25}
SLACK = 3.0
FLIPS = 0.05
#: VHR picks the heads above the median VHD of each layer: on the tiny models' 4 heads, close VHDs swap in bfloat16
VHR_FLIPS = 0.25


@functools.cache
def _model(family: str, dtype: torch.dtype):
    return build_model(family, dtype=dtype)


def _prompts(family: str) -> list[Prompt]:
    image = family not in LLM_FAMILIES
    return [Prompt(3, 4, seed=1, image=image), Prompt(6, 2, seed=2, image=image)]


@torch.no_grad()
def _run(family: str, dtype: torch.dtype, stack=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`(logits, discrete choices or None, generated tokens or None)`."""
    model = _model(family, dtype)
    inputs = make_inputs(model, family, _prompts(family))
    if stack is None:
        return model(**inputs).logits.float(), None, None
    with iv.apply(model, stack) as handle:
        if "sgrs" in {name for name, _ in stack}:  # its edit is its decoding loop
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            return torch.stack(out.logits, 1).float(), None, out.sequences
        logits = model(**inputs).logits.float()
        return logits, _choices(handle.methods), None


def _choices(methods) -> torch.Tensor | None:
    """ACT's detected sinks and VHR's heads of the last forward, flattened; None for other methods."""
    picked = [t for m in methods if m.name in ("act", "vhr")
              for t in (m.sinks(calibrated=False) if m.name == "act" else m.selected_heads()).values()]
    return torch.cat([t.flatten() for t in picked]) if picked else None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family, case", cases(("mistral", "llava")))
def test_half_precision_is_close_to_float32_and_never_nan(family, case, dtype):
    drift = float((_run(family, dtype)[0] - _run(family, torch.float32)[0]).abs().max())
    edited, choices, tokens = _run(family, dtype, STACKS[case])
    reference, choices32, tokens32 = _run(family, torch.float32, STACKS[case])
    assert not bool(edited.isnan().any())
    cut, cut32 = torch.isinf(edited), torch.isinf(reference)  # guidance's cut-off
    assert float((cut != cut32).float().mean()) <= FLIPS
    if choices is not None and not torch.equal(choices, choices32):
        assert float((choices != choices32).float().mean()) <= (VHR_FLIPS if case == "vhr" else FLIPS)
        return  # a flipped choice changes the edit itself: compared above, not the logits
    finite = ~(cut | cut32)
    if tokens is not None and not torch.equal(tokens, tokens32):
        edited, reference, finite = edited[:, :1], reference[:, :1], finite[:, :1]  # before the first choice
    gap = float((edited[finite] - reference[finite]).abs().max())
    assert gap <= SLACK * drift + ATOL[dtype]
