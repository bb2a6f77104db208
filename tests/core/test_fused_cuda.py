"""The fused paths on CUDA (`fused._cuda_kernel`, the memory-efficient kernel with log-sum-exp).

Without a GPU, two things are checked here: dispatch (which kernel a device type and dtype get), and the CUDA
wrapper's own work (zero-padding head dims, aligned bias rows, cropping the output and the padded log-sum-exp),
by running it over a stand-in for the CUDA op that computes the same contract with dense math and asserts the
alignment the real kernel requires. The tests marked `cuda` run the real kernel (`benchmarks/device_check.sh`):
fused = explicit through whole models, the primitives against dense formulas in float32, and cached decoding equal
to recomputation; they skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import Prompt, build_model, make_inputs
from transformers.integrations.sdpa_attention import repeat_kv

import interventions as iv
from interventions.core import attention, fused

cuda = pytest.mark.cuda
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_dispatch_by_device_type_and_dtype():
    assert fused.kernel_for("cpu", torch.float32) is fused._cpu_kernel
    assert fused.kernel_for("cpu", torch.float16) is None  # the CPU flash kernel was not checked in half precision
    assert fused.kernel_for("cuda", torch.bfloat16) is fused._cuda_kernel
    assert fused.kernel_for("cuda", torch.float32) is fused._cuda_kernel
    assert fused.kernel_for("cuda", torch.float64) is None  # no float64 memory-efficient kernel: explicit path
    assert fused.kernel_for("mps", torch.float32) is None
    assert not fused.available(torch.zeros(1, 1, 2, 4, dtype=torch.float16), None)


def _dense_efficient_op(query, key, value, bias, compute_log_sumexp, dropout_p, is_causal, *, scale):
    """The memory-efficient op's contract in dense math, with the alignment checks the real kernel makes."""
    assert compute_log_sumexp and dropout_p == 0.0
    assert query.shape[-1] % 8 == 0 and value.shape[-1] % 8 == 0, "head dims must be 16-byte aligned"
    logits = query @ key.transpose(-1, -2) * scale
    if bias is not None:
        assert bias.shape == logits.shape and bias.dtype == query.dtype
        assert bias.stride(-2) % 16 == 0, "bias rows must be aligned"
        logits = logits + bias
    if is_causal:  # top-left aligned, as SDPA's is_causal
        logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
    lse = logits.logsumexp(-1)
    out = torch.softmax(logits, -1) @ value
    padded = torch.full((*lse.shape[:-1], -lse.shape[-1] % 32 + lse.shape[-1]), float("nan"), dtype=lse.dtype)
    padded[..., : lse.shape[-1]] = lse
    return out, padded, torch.empty(()), torch.empty(())


@pytest.fixture
def cuda_wrapper_on_cpu(monkeypatch):
    """CPU tensors routed through `_cuda_kernel` over the dense stand-in of the CUDA op."""
    monkeypatch.setattr(fused, "_CUDA_OP", _dense_efficient_op)
    monkeypatch.setitem(fused._KERNELS, "cpu", (fused._cuda_kernel, (torch.float32, torch.float64)))


def _qkv(dim: int, length: int = 13, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(2, h, length, dim, generator=generator, dtype=dtype) for h in (4, 2, 2)]


@pytest.mark.parametrize("dim", [8, 5])
def test_cuda_wrapper_pads_crops_and_aligns(cuda_wrapper_on_cpu, dim):
    q, k, v = _qkv(dim)
    mask = torch.ones(2, 1, 13, 13, dtype=torch.bool).tril()
    mask[0, :, :, :3] = False  # left padding of the first prompt
    mask[0, :, :3, 0] = True
    out, lse = fused.attention_with_lse(q, k, v, mask, 0.4)
    logits = (q @ repeat_kv(k, 2).transpose(-1, -2) * 0.4).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, (torch.softmax(logits, -1) @ repeat_kv(v, 2)).transpose(1, 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, logits.logsumexp(-1), atol=1e-12, rtol=0)
    causal_out, causal_lse = fused.attention_with_lse(q, k, v, None, 0.4)
    logits = q @ repeat_kv(k, 2).transpose(-1, -2) * 0.4
    logits = logits.masked_fill(torch.ones(13, 13, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(causal_lse, logits.logsumexp(-1), atol=1e-12, rtol=0)
    expected = (torch.softmax(logits, -1) @ repeat_kv(v, 2)).transpose(1, 2)
    torch.testing.assert_close(causal_out, expected, atol=1e-12, rtol=0)
    heads = torch.tensor([0, 3])
    counted = torch.ones(2, 13, dtype=torch.bool)
    received = fused.received_attention(q, k, causal_lse, heads, 0.4, None, counted)  # the d + 1 transposed call
    torch.testing.assert_close(received, torch.softmax(logits, -1)[:, heads].sum(-2), atol=1e-10, rtol=0)


def test_cuda_wrapper_ranked_attention(cuda_wrapper_on_cpu):
    q, k, v = _qkv(8, 21)
    rank = torch.arange(21).repeat(2, 1)
    rank[0, 4:12] = 4 + torch.tensor([0, 1, 1, 0, 2, 2, 1, 0])
    allowed = rank[:, None, None, :] <= rank[:, None, :, None]
    logits = (q @ repeat_kv(k, 2).transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    expected = (torch.softmax(logits, -1) @ repeat_kv(v, 2)).transpose(1, 2)
    torch.testing.assert_close(fused.ranked_attention(q, k, v, rank, 0.3), expected, atol=1e-12, rtol=0)


# ---- on a GPU -----------------------------------------------------------------------------------------------------

STACKS = {"act": [("act", {"beta": 0.3, "threshold": 0.05, "layers": [0, 1, 2]})], "cca": [("cca", {})]}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _cuda_model(family: str, dtype: torch.dtype):
    model = build_model(family).to("cuda", dtype)
    inputs = make_inputs(model, family, [Prompt(3, 4, seed=1, image=True), Prompt(6, 2, seed=2, image=True)])
    inputs = {k: v.to("cuda") for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, inputs


@cuda
@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(STACKS))
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_cuda_fused_equals_explicit(family, name, dtype, monkeypatch):
    model, inputs = _cuda_model(family, dtype)
    monkeypatch.setattr(attention, "RANKED_MIN_LENGTH", 1)
    calls = []
    for op in ("attention_with_lse", "ranked_attention"):
        original = getattr(fused, op)
        monkeypatch.setattr(fused, op, lambda *a, _o=original: calls.append(1) or _o(*a))
    with torch.no_grad(), iv.apply(model, STACKS[name]):
        got = model(**inputs).logits.float()
        assert calls, "the fused path did not run on CUDA"
        monkeypatch.setattr(attention, "FUSED", False)
        expected = model(**inputs).logits.float()
    torch.testing.assert_close(got, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])



@cuda
@gpu_only
@pytest.mark.parametrize("dim", [64, 65])
def test_cuda_primitives_equal_dense_float32(dim):
    q, k, v = (x.to("cuda", torch.float32) for x in _qkv(dim, 37))
    logits = q @ repeat_kv(k, 2).transpose(-1, -2) * 0.2
    logits = logits.masked_fill(torch.ones(37, 37, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    out, lse = fused.attention_with_lse(q, k, v, None, 0.2)
    torch.testing.assert_close(out, (torch.softmax(logits, -1) @ repeat_kv(v, 2)).transpose(1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, logits.logsumexp(-1), atol=1e-5, rtol=0)
    heads, counted = torch.tensor([1, 2], device="cuda"), torch.ones(2, 37, dtype=torch.bool, device="cuda")
    received = fused.received_attention(q, k, lse, heads, 0.2, None, counted)
    torch.testing.assert_close(received, torch.softmax(logits, -1)[:, heads].sum(-2), atol=1e-4, rtol=0)



@cuda
@gpu_only
@pytest.mark.parametrize("name", sorted(STACKS))
def test_cuda_cached_decode_equals_recompute(name):
    model, inputs = _cuda_model("llava", torch.float32)
    with iv.apply(model, STACKS[name]), torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
        full = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

