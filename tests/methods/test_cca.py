"""CCA (shared/specs/cca.md): ring table, positions and concentric mask against a direct implementation of the
spec (24×24 and non-square grids, LLaVA-NeXT newlines), end to end through tiny models of every 1-D RoPE image
family; KV-cache decode = recompute, left-padded batch = single runs, neutral and unwrap bit-identical; the core's
`mask` capability with a toy method on SDPA and eager; the errors."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from tiny_models import IMAGE_ID, Prompt, build_model, make_inputs
from transformers.integrations.sdpa_attention import repeat_kv

import interventions as iv
from interventions.core import attention, fused
from interventions.methods.base import METHODS, Method, ModelInfo
from interventions.core.geometry import Grid, place_grids
from interventions.families import resolve
from interventions.methods.cca.geometry import (
    build_layout,
    concentric_allowed,
    concentric_positions,
)
from interventions.core.params import MethodConfig, number, param

FAMILIES = ("llava", "llava_next", "gemma3", "idefics3", "smolvlm")
PROMPTS = [Prompt(3, 4, seed=1), Prompt(6, 2, seed=2)]


@functools.cache
def _model(family: str, implementation: str = "sdpa"):
    model = build_model(family)
    if implementation != "sdpa":
        model.set_attn_implementation(implementation)
    return model


# ---- a direct implementation of the spec, token by token -------------------------------------------------------
@dataclass(frozen=True)
class RefGrid:
    start: int
    rows: int
    cols: int
    newline: bool = False

    @property
    def length(self) -> int:
        return self.rows * (self.cols + self.newline)


def _ref_ring(grid: RefGrid, offset: int) -> int:
    width = grid.cols + grid.newline
    r, c = divmod(offset, width)
    if c == grid.cols:  # a newline token at the right edge
        return 0
    return min(r, c, grid.rows - 1 - r, grid.cols - 1 - c)


def reference(valid: list[bool], grids: list[RefGrid], length: int) -> tuple[list[int], list[list[bool]]]:
    """Positions and allowed mask of one sample (`length` >= prompt: later tokens are generated text)."""
    where = {}
    for g, grid in enumerate(grids):
        for o in range(grid.length):
            where[grid.start + o] = (g, _ref_ring(grid, o))
    pos, counter, i = [0] * length, 0, 0
    while i < length:
        if i in where:
            grid = grids[where[i][0]]
            for j in range(grid.start, grid.start + grid.length):
                pos[j] = counter + where[j][1]
            counter += max(where[j][1] for j in range(grid.start, grid.start + grid.length)) + 1
            i = grid.start + grid.length
            continue
        if valid[i]:
            pos[i] = counter
            counter += 1
        i += 1
    allowed = [[False] * length for _ in range(length)]
    for q in range(length):
        for k in range(length):
            if q in where and k in where and where[q][0] == where[k][0]:
                allowed[q][k] = where[k][1] <= where[q][1]
            else:
                allowed[q][k] = valid[k] and k <= q
        allowed[q][q] |= not valid[q]  # padding rows see themselves (no empty softmax row)
    return pos, allowed


def _ours(valid: torch.Tensor, grids: list[list[RefGrid]], length: int):
    placed = [[(g.start, Grid(g.rows, g.cols, g.newline)) for g in sample] for sample in grids]
    layout = build_layout(valid, placed)
    full_valid = torch.cat([valid, torch.ones(valid.shape[0], length - valid.shape[1], dtype=torch.bool)], 1)
    pos = concentric_positions(layout, full_valid)
    causal = torch.ones(length, length, dtype=torch.bool).tril() & full_valid[:, None, :]
    causal |= torch.eye(length, dtype=torch.bool) & ~full_valid[:, :, None]
    mask = concentric_allowed(layout, causal[:, None], torch.arange(length))
    return pos, mask[:, 0]


# ---- unit level ------------------------------------------------------------------------------------------------
def test_ring_table_24x24():
    rings = Grid(24, 24).rings().view(24, 24)
    expected = torch.tensor([[min(r, c, 23 - r, 23 - c) for c in range(24)] for r in range(24)])
    assert torch.equal(rings, expected)
    assert rings[0, 0] == 0 and rings[11, 11] == rings[12, 12] == 11 and Grid(24, 24).num_rings == 12
    assert torch.bincount(rings.flatten()).tolist() == list(range(92, 0, -8))


def test_llava_positions_and_mask_follow_the_spec():
    s, v, after = 35, 576, 20
    length = s + v + after
    valid = torch.ones(1, length, dtype=torch.bool)
    pos, mask = _ours(valid, [[RefGrid(s, 24, 24)]], length + 1)  # + one decode step
    pos = pos[0].tolist()
    assert pos[:s] == list(range(s))
    assert set(pos[s:s + v]) == set(range(s, s + 12))
    assert pos[s + v] == s + 12 and pos[length - 1] == length - 1 - 564 and pos[length] == length - 564
    image = mask[0, s:s + v, s:s + v]
    assert round(image.float().mean().item(), 3) == 0.555  # vs 0.501 raster causal
    ring = Grid(24, 24).rings()
    assert torch.equal(image, ring[None, :] <= ring[:, None])
    causal = torch.ones(length + 1, length + 1, dtype=torch.bool).tril()
    assert torch.equal(mask[0, :s], causal[:s]) and torch.equal(mask[0, s + v:], causal[s + v:])
    assert torch.equal(mask[0, s:s + v, :s], causal[s:s + v, :s])  # image rows still see the text before


@pytest.mark.parametrize("grids", [
    [RefGrid(3, 3, 5), RefGrid(20, 6, 4)],  # two non-square grids, text between
    [RefGrid(2, 5, 5), RefGrid(27, 2, 2), RefGrid(31, 1, 7)],  # odd, even, one row
    [RefGrid(4, 2, 2), RefGrid(8, 4, 6, newline=True)],  # LLaVA-NeXT: base, then grid + newline per row
])
def test_non_square_grids_match_direct_spec(grids):
    end = grids[-1].start + grids[-1].length
    prompt, pad, length = end + 3, 2, end + 3 + 2 + 4  # batch: sample 1 left-padded by 2, 4 decode steps
    valid = torch.ones(2, prompt + pad, dtype=torch.bool)
    valid[1, :pad] = False  # sample 0: the same prompt unpadded, with `pad` more text tokens at its end
    alone = grids
    shifted = [RefGrid(g.start + pad, g.rows, g.cols, g.newline) for g in grids]
    pos, mask = _ours(valid, [alone, shifted], length)
    for b, (sample_grids, sample_valid) in enumerate([(alone, valid[0]), (shifted, valid[1])]):
        ref_pos, ref_mask = reference(sample_valid.tolist() + [True] * (length - prompt - pad), sample_grids, length)
        keep = torch.tensor(sample_valid.tolist() + [True] * (length - prompt - pad))
        assert pos[b][keep].tolist() == torch.tensor(ref_pos)[keep].tolist()
        assert torch.equal(mask[b], torch.tensor(ref_mask))
    assert pos[0, :prompt].tolist() == pos[1, pad:pad + prompt].tolist()  # left padding changes nothing


def test_runs_split_into_grids():
    grid = Grid(2, 2)
    placed = place_grids("llava", grid, None, [[(1, 9)], [(0, 4), (6, 10)]])  # two adjacent images in one run
    assert placed == [[(1, grid), (5, grid)], [(0, grid), (6, grid)]]
    with pytest.raises(ValueError, match=r"run \[1, 7\) that does not split into llava grids \(4 tokens"):
        place_grids("llava", grid, None, [[(1, 7)]])
    with pytest.raises(ValueError, match="more image tokens than the inputs have images"):
        place_grids("llava_next", None, iter([[grid]]), [[(0, 4), (5, 9)]])


# ---- the core's `mask` capability (toy method) -------------------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    NAME = "toy"
    STRENGTH = "strength"
    NEUTRAL = 0.0
    strength: float = param(1.0, "1 = prefix block bidirectional, 2 = return None", "test", number(0.0))


PREFIX = 5


class PrefixBidirectional(Method):
    """The first `PREFIX` positions attend to each other bidirectionally (a prefix-LM mask)."""

    config_class = ToyConfig
    needs = frozenset({"mask"})

    def bind(self, model: ModelInfo) -> None:
        self.touched_layers = frozenset() if self.config.is_neutral else frozenset({0, 2})

    def edit_mask(self, call, allowed):
        if self.config.strength == 2:
            return None
        q = call.query_positions[:, None] < PREFIX
        k = torch.arange(allowed.shape[-1])[None, :] < PREFIX
        return allowed | (q & k & call.roles.keys(allowed.shape[-1]).valid[:, None, None, :])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_mask_capability(monkeypatch, implementation):
    monkeypatch.setitem(METHODS._items, "toy", PrefixBidirectional)
    model = _model("llama", implementation)
    inputs = make_inputs(model, "llama", [Prompt(7, 0, seed=1, image=False), Prompt(9, 0, seed=2, image=False)])
    valid = inputs["attention_mask"].bool()
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
    prefix = (torch.arange(length) < PREFIX)
    wanted = causal | (prefix[:, None] & prefix[None, :] & valid[:, None, :])
    wanted |= torch.eye(length, dtype=torch.bool) & ~valid[:, :, None]
    # layers 0 and 2 get the prefix mask, layer 1 the plain one: run the hand-made reference with a layer hook
    plain = causal | (torch.eye(length, dtype=torch.bool) & ~valid[:, :, None])
    masks = {0: wanted, 1: plain, 2: wanted}

    def as_given(m):
        m = m[:, None]
        return m if implementation == "sdpa" else torch.where(m, 0.0, torch.finfo(torch.float32).min)

    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, a, kw, i=i: (a, {**kw, "attention_mask": as_given(masks[i])}), with_kwargs=True)
        for i, layer in enumerate(model.get_decoder().layers)]
    try:
        expected = model(**inputs).logits
    finally:
        for hook in hooks:
            hook.remove()
    with iv.apply(model, "toy"):
        got = model(**inputs).logits
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got[valid], model(**inputs).logits[valid], atol=1e-4)
    plain_logits = model(**inputs).logits
    with iv.apply(model, "toy", strength=2.0):  # no edit: the base backend gets the model's own mask object
        before = attention.DISPATCH_COUNTS["edited"]
        unchanged = model(**inputs).logits
        assert attention.DISPATCH_COUNTS["edited"] == before
    assert torch.equal(unchanged, plain_logits)


# ---- end to end ------------------------------------------------------------------------------------------------
def _ref_grids(model, family: str, inputs) -> list[list[RefGrid]]:
    """The grids of each sample, found without the library: square runs, or for LLaVA-NeXT the newline slots of
    the model's own `pack_image_features` (newline embedding 1, features 0)."""
    grids = []
    sizes = iter(inputs.get("image_sizes", []))
    for row in (inputs["input_ids"] == IMAGE_ID).tolist():
        starts = [i for i, f in enumerate(row) if f and (i == 0 or not row[i - 1])]
        sample = []
        for start in starts:
            end = next((i for i in range(start, len(row)) if not row[i]), len(row))
            if family != "llava_next":
                n = round((end - start) ** 0.5)
                assert n * n == end - start
                sample.append(RefGrid(start, n, n))
                continue
            vision = model.config.vision_config
            n = vision.image_size // vision.patch_size
            patches = inputs["pixel_values"].shape[1]
            packed, _ = model.model.pack_image_features([torch.zeros(patches, n * n, 1)], next(sizes)[None],
                                                        "default", torch.ones(1))
            newline = packed[0][n * n:, 0].nonzero().flatten()
            rows, width = len(newline), int(newline[0]) + 1
            assert packed[0].shape[0] == end - start == n * n + rows * width
            sample += [RefGrid(start, n, n), RefGrid(start + n * n, rows, width - 1, newline=True)]
        grids.append(sample)
    return grids


@torch.no_grad()
def test_llava_next_grids_from_sizes_and_from_encoded_features():
    model = _model("llava_next")
    inputs = make_inputs(model, "llava_next", PROMPTS)
    encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    layout = resolve(model)
    from_sizes = list(layout.image_grids(model.config, {"image_sizes": inputs["image_sizes"]}, "cca"))
    from_features = list(layout.image_grids(model.config, {"mm_encoder_outputs": {"image": encoded}}, "cca"))
    expected = [[Grid(g.rows, g.cols, g.newline) for g in sample] for sample in _ref_grids(model, "llava_next", inputs)]
    assert from_sizes == from_features == expected
    assert expected[0][1].rows != expected[0][1].cols  # the tiny image gives a non-square any-resolution grid


def _reference_run(model, family, inputs, positions: bool, mask: bool):
    valid = inputs["attention_mask"].bool()
    length = valid.shape[1]
    refs = [reference(v, g, length) for v, g in zip(valid.tolist(), _ref_grids(model, family, inputs))]
    kwargs = dict(inputs)
    if positions:
        kwargs["position_ids"] = torch.tensor([p for p, _ in refs])
    if mask:
        kwargs["attention_mask"] = torch.tensor([m for _, m in refs])[:, None]
    return model(**kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_end_to_end_equals_direct_spec(family):
    model = _model(family)
    inputs = make_inputs(model, family, PROMPTS)
    valid = inputs["attention_mask"].bool()
    with iv.apply(model, "cca"):
        got = model(**inputs).logits
    expected = _reference_run(model, family, inputs, positions=True, mask=True)
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[valid], model(**inputs).logits[valid], atol=1e-3)


@pytest.mark.parametrize("flags", [(True, False), (False, True)], ids=["positions-only", "mask-only"])
@torch.no_grad()
def test_ablation_flags(flags):
    model = _model("llava_next")
    inputs = make_inputs(model, "llava_next", PROMPTS)
    valid = inputs["attention_mask"].bool()
    with iv.apply(model, "cca", remap_positions=flags[0], concentric_mask=flags[1]):
        got = model(**inputs).logits
    expected = _reference_run(model, "llava_next", inputs, positions=flags[0], mask=flags[1])
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_text_only_sample_keeps_standard_positions():
    model = _model("llava")
    inputs = make_inputs(model, "llava", [PROMPTS[0], Prompt(5, 3, seed=3, image=False)])
    valid = inputs["attention_mask"].bool()
    plain = model(**inputs).logits
    with iv.apply(model, "cca"):
        got = model(**inputs).logits
        single = model(**make_inputs(model, "llava", PROMPTS[:1])).logits
    torch.testing.assert_close(got[1][valid[1]], plain[1][valid[1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], single[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], plain[0], atol=1e-3)


@torch.no_grad()
def test_beam_expansion_llava_next():
    """Beams expand the pre-encoded image features (no `image_sizes` under generate): each beam keeps its grid."""
    model = _model("llava_next")
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with iv.apply(model, "cca"):
        batch = model.generate(**make_inputs(model, "llava_next", PROMPTS), **kwargs)
        width = batch.shape[1]
        for i, prompt in enumerate(PROMPTS):
            single = model.generate(**make_inputs(model, "llava_next", [prompt]), **kwargs)
            assert torch.equal(single, batch[2 * i:2 * i + 2, width - single.shape[1]:])


@pytest.mark.parametrize("family", ["llava", "gemma3"])
@torch.no_grad()
def test_neutral_and_unwrap_are_bit_identical(family):
    model = _model(family)
    inputs = make_inputs(model, family, PROMPTS)
    reference_logits = model(**inputs).logits
    for params in ({"enabled": False}, {"remap_positions": False, "concentric_mask": False}):
        with iv.apply(model, "cca", **params):
            assert torch.equal(model(**inputs).logits, reference_logits)
    with iv.apply(model, "cca"):
        model(**inputs)
    assert torch.equal(model(**inputs).logits, reference_logits)


@torch.no_grad()
def test_eager_equals_sdpa_and_no_packed_sequence_masking():
    inputs = make_inputs(_model("llava"), "llava", PROMPTS[:1])
    with iv.apply(_model("llava"), "cca"):
        sdpa = _model("llava")(**inputs).logits
        # without a 2-D mask, remapped ids must not be read as packed sequences
        bare = {k: v for k, v in inputs.items() if k != "attention_mask"}
        torch.testing.assert_close(_model("llava")(**bare, use_cache=False).logits, sdpa, atol=0, rtol=0)
    with iv.apply(_model("llava", "eager"), "cca"):
        eager = _model("llava", "eager")(**inputs).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_errors():
    for family in ("qwen2_vl", "qwen2_5_vl"):
        with pytest.raises(ValueError, match="M-RoPE"):
            iv.wrap(_model(family), "cca")
        assert iv.wrap(_model(family), "pai").unwrap() is None  # the failed wrap left the model untouched
    with pytest.raises(ValueError, match="cca needs image tokens"):
        iv.wrap(_model("llama"), "cca")
    with pytest.raises(ValueError, match="cca: enabled=1 is invalid; expected True or False"):
        iv.wrap(_model("llava"), "cca", enabled=1)
    model = _model("llava_next")
    inputs = make_inputs(model, "llava_next", PROMPTS[:1])
    with iv.apply(model, "cca"):
        with pytest.raises(ValueError, match="needs image_sizes"):
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="needs input_ids"):
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_ranked_kernel_equals_dense_rank_mask():
    """`fused.ranked_attention` (causal kernel in rank order + ties) against one dense masked softmax, float64."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 37, 8
    q, k, v = (torch.randn(batch, h, length, dim, generator=generator, dtype=torch.float64)
               for h in (heads, kv_heads, kv_heads))
    rank = torch.arange(length).repeat(batch, 1)
    rank[0, 5:17] = 5 + torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 3, 3, 1, 0])  # rings of one grid, out of order
    rank[1, 20:30] = 20 + torch.randint(0, 4, (10,), generator=generator)
    got = fused.ranked_attention(q, k, v, rank, 0.3)
    allowed = rank[:, None, None, :] <= rank[:, None, :, None]
    logits = (q @ repeat_kv(k, 2).transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    expected = (torch.softmax(logits, -1) @ repeat_kv(v, 2)).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3"])
@torch.no_grad()
def test_single_prompt_uses_ranked_kernel_and_equals_dense_mask(family, monkeypatch):
    model = build_model(family, dtype=torch.float64)
    inputs = make_inputs(model, family, PROMPTS[:1])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
    ranked = []
    monkeypatch.setattr(attention, "RANKED_MIN_LENGTH", 1)  # the tiny prompts are far shorter than the default
    original = attention.fused.ranked_attention
    monkeypatch.setattr(attention.fused, "ranked_attention", lambda *a: ranked.append(1) or original(*a))
    with iv.apply(model, "cca"):
        got = model(**inputs).logits
        assert len(ranked) == model.config.get_text_config().num_hidden_layers  # every layer: no dense mask
        monkeypatch.setattr(attention, "FUSED", False)
        expected = model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
