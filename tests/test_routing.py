"""The Eq. 2 routing kernel against plain per-person attention loops (attention/routing.py)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from facestudio_testing.reference_attention import attend


@pytest.fixture(scope="module")
def routing(booted):
    return booted.pack_module("attention.routing")


# ---- references: the formula written out, one plain attention per person, in float64 ----


def reference(q, a_text, persons, masks, heads, style=None, alpha=0.5):
    """Python loop of separate per-person attentions combined by Eq. 2. alpha scales the text only where
    a style acts (a style with a non-zero scale): it is the text / style-image balance."""
    t, g = min(1.0, 2 * (1 - alpha)), min(1.0, 2 * alpha)
    if style is None or style[2] == 0:
        t = 1.0
    b, n, _ = q.shape
    m = [torch.ones(1, n, dtype=torch.float64) if x is None else x.double() for x in masks]
    total = sum(m) if m else torch.zeros(1, n, dtype=torch.float64)
    denom = total.clamp_min(1.0)
    out = t * a_text.double()
    for (k, v, w), mi in zip(persons, m):
        out = out + (w * mi / denom).unsqueeze(-1) * attend(q, k, v, heads)
    if style is not None:
        ks, vs, s = style
        out = out + g * s * attend(q, ks, vs, heads)
    return out


def make(b=2, n=64, c=32, tokens=(4, 4), seed=0, kb=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, c, generator=gen)
    a_text = torch.randn(b, n, c, generator=gen)
    persons = [
        (torch.randn(kb, t, c, generator=gen), torch.randn(kb, t, c, generator=gen), 1.0 + 0.25 * i)
        for i, t in enumerate(tokens)
    ]
    return q, a_text, persons, gen


def disjoint_masks(count, n):
    """Hard masks on stripes of the token axis; the last stripe is outside every region."""
    stripe = n // (count + 1)
    masks = []
    for i in range(count):
        m = torch.zeros(1, n)
        m[:, i * stripe : (i + 1) * stripe] = 1.0
        masks.append(m)
    return masks, stripe


# ---- Eq. 2 ----


def test_hard_disjoint_masks_route_each_region_to_its_person_alone(routing):
    heads = 4
    q, a_text, persons, gen = make(tokens=(4, 4, 4))
    # Weights 1: inside region i the output is A_text + person i's plain attention.
    persons = [(k, v, 1.0) for k, v, _ in persons]
    masks, stripe = disjoint_masks(3, q.shape[1])
    groups = routing.TokenGroups.build(persons, heads)
    out = routing.route(q, a_text, groups, masks)
    for i, (k, v, _) in enumerate(persons):
        rows = slice(i * stripe, (i + 1) * stripe)
        alone = a_text[:, rows] + attend(q[:, rows], k, v, heads).float()
        torch.testing.assert_close(out[:, rows], alone, atol=1e-5, rtol=0)
    outside = slice(3 * stripe, None)
    assert torch.equal(out[:, outside], a_text[:, outside])

    # With a style: outside every region it is A_text + s*A_style and nothing else.
    ks, vs = torch.randn(1, 8, 32, generator=gen), torch.randn(1, 8, 32, generator=gen)
    styled = routing.TokenGroups.build(persons, heads, style=(ks, vs, 0.7))
    out = routing.route(q, a_text, styled, masks)
    expected = a_text[:, outside] + 0.7 * attend(q[:, outside], ks, vs, heads).float()
    torch.testing.assert_close(out[:, outside], expected, atol=1e-5, rtol=0)


def test_overlapping_soft_masks_match_the_per_person_loop_not_a_joint_softmax(routing):
    heads = 2
    q, a_text, persons, _ = make(tokens=(4, 4), seed=1)
    n = q.shape[1]
    m1 = torch.zeros(1, n)
    m1[:, : 3 * n // 4] = 0.5
    m2 = torch.zeros(1, n)
    m2[:, n // 4 :] = 0.5
    masks = [m1, m2]
    groups = routing.TokenGroups.build(persons, heads)
    out = routing.route(q, a_text, groups, masks)
    expected = reference(q, a_text, persons, masks, heads)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)

    # The naive one-product kernel: one softmax over every person's tokens, then the region weights.
    # It must differ from Eq. 2, or this test would not tell the two apart.
    k_all = torch.cat([k for k, _, _ in persons], 1)
    v_all = torch.cat([v for _, v, _ in persons], 1)
    w_hat = groups.region_weights(masks).double()  # [1, n, 2]
    b, c, d = q.shape[0], q.shape[2], q.shape[2] // heads
    qh = q.double().view(b, n, heads, d).transpose(1, 2)
    p = torch.softmax(qh @ k_all.double().view(1, -1, heads, d).permute(0, 2, 3, 1) / math.sqrt(d), -1)
    p = p * w_hat.repeat_interleave(4, -1).unsqueeze(1)
    joint = a_text.double() + (p @ v_all.double().view(1, -1, heads, d).transpose(1, 2)).transpose(1, 2).reshape(b, n, c)
    assert (joint - expected).abs().max() > 1e-2
    assert not torch.allclose(out.double(), joint, atol=1e-3)


def test_unequal_token_counts_never_leak_padding_across_persons(routing):
    heads = 4
    q, a_text, persons, gen = make(tokens=(4, 16, 32), seed=2)
    groups = routing.TokenGroups.build(persons, heads)
    assert groups.segment_length == 32 and groups.pad_bias is not None
    n = q.shape[1]
    soft = [torch.rand(1, n, generator=gen) for _ in range(3)]
    hard, stripe = disjoint_masks(3, n)
    for masks in (soft, hard, None):
        out = routing.route(q, a_text, groups, masks)
        expected = reference(q, a_text, persons, masks or [None] * 3, heads)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)

    # Region 0 depends on person 0's 4 tokens only: changing the others' tokens cannot move it.
    other = [persons[0]] + [(k * 3 + 1, v - 2, w) for k, v, w in persons[1:]]
    a = routing.route(q, a_text, groups, hard)[:, :stripe]
    b = routing.route(q, a_text, routing.TokenGroups.build(other, heads), hard)[:, :stripe]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_per_row_tokens_and_cfg_chunks(routing):
    heads = 2
    q, a_text, cond, gen = make(b=4, tokens=(4, 4), seed=3)
    uncond = [(torch.zeros_like(k), torch.randn(k.shape, generator=gen), w) for k, _, w in cond]
    masks, _ = disjoint_masks(2, q.shape[1])
    gc, gu = routing.TokenGroups.build(cond, heads), routing.TokenGroups.build(uncond, heads)
    # cond_or_uncond == [1, 0]: the first half of the rows is uncond.
    out = routing.route_chunks(q, a_text, [gu, gc], masks)
    torch.testing.assert_close(out[:2], routing.route(q[:2], a_text[:2], gu, masks))
    torch.testing.assert_close(out[2:], routing.route(q[2:], a_text[2:], gc, masks))
    torch.testing.assert_close(out[2:].double(), reference(q[2:], a_text[2:], cond, masks, heads), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="equal chunks"):
        routing.route_chunks(q[:3], a_text[:3], [gu, gc], masks)

    # Tokens with one row per batch item also work (K batch == B).
    per_row = [(torch.randn(4, 4, 32, generator=gen), torch.randn(4, 4, 32, generator=gen), 1.0)]
    out = routing.route(q, a_text, routing.TokenGroups.build(per_row, heads))
    torch.testing.assert_close(out.double(), reference(q, a_text, per_row, [None], heads), atol=1e-5, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    latent=st.tuples(st.integers(1, 23), st.integers(1, 23)),
    downscale=st.sampled_from([1, 2, 4, 8]),
    persons=st.integers(0, 8),
    with_style=st.booleans(),
    heads=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_layouts_are_finite_and_exact_outside_every_region(
    routing, batch, latent, downscale, persons, with_style, heads, seed
):
    gen = torch.Generator().manual_seed(seed)
    gh, gw = routing.token_grid(latent, downscale)
    n, c = gh * gw, heads * 8
    q = torch.randn(batch, n, c, generator=gen) * 10
    a_text = torch.randn(batch, n, c, generator=gen)
    tokens = torch.randint(1, 7, (persons,), generator=gen).tolist()
    ppl = [
        (torch.randn(1, t, c, generator=gen), torch.randn(1, t, c, generator=gen), float(torch.rand((), generator=gen)) * 2)
        for t in tokens
    ]
    masks = []
    for _ in range(persons):
        kind = int(torch.randint(0, 3, (), generator=gen))
        soft = torch.rand(batch, n, generator=gen) * (torch.rand(batch, n, generator=gen) < 0.5)
        masks.append([torch.zeros(batch, n), soft, soft.clamp(0, 1) ** 0.5][kind])
    style = (torch.randn(1, 3, c, generator=gen), torch.randn(1, 3, c, generator=gen), 0.8) if with_style else None
    groups = routing.TokenGroups.build(ppl, heads, style=style)
    out = routing.route(q, a_text, groups, masks)
    assert out.shape == q.shape and torch.isfinite(out).all()

    outside = torch.stack(masks).eq(0).all(0) if masks else torch.ones(batch, n, dtype=torch.bool)
    if style is None:
        assert torch.equal(out[outside], a_text[outside])
    else:
        expected = (a_text.double() + 0.8 * attend(q, style[0], style[1], heads)).float()
        torch.testing.assert_close(out[outside], expected[outside], atol=1e-5, rtol=1e-5)


# ---- cost ----


class CountOps(TorchDispatchMode):
    COUNTED = {"mm", "matmul", "bmm", "baddbmm", "softmax", "_softmax", "scaled_dot_product_attention"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.COUNTED or name.startswith("_scaled_dot_product"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn):
    with CountOps() as mode:
        fn()
    return mode.count


def test_op_count_does_not_grow_with_persons(routing):
    heads = 4
    counts, loop_counts = [], []
    for p in (1, 2, 4, 8):
        q, a_text, persons, gen = make(tokens=[4] * (p - 1) + [16], seed=p)
        style = (torch.randn(1, 4, 32, generator=gen), torch.randn(1, 4, 32, generator=gen), 1.0)
        groups = routing.TokenGroups.build(persons, heads, style=style)
        masks = [torch.rand(1, q.shape[1], generator=gen) for _ in range(p)]
        regions = groups.region_weights(masks)
        routing.route(q, a_text, groups, regions)  # warm the moved-copy cache
        counts.append(count_ops(lambda: routing.route(q, a_text, groups, regions)))
        loop_counts.append(count_ops(lambda: reference(q, a_text, persons, masks, heads)))
    assert counts[0] > 0
    assert counts == [counts[0]] * 4, counts
    # The counter does see per-person work when there is some.
    assert loop_counts[-1] > loop_counts[0]


# ---- precision ----


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_with_large_queries_stays_finite_and_close(routing, dtype, tol):
    heads = 4
    q, a_text, persons, gen = make(tokens=(4, 16), seed=5)
    q = (q * 100).to(dtype)
    a_text = a_text.to(dtype)
    persons_lo = [(k.to(dtype), v.to(dtype), w) for k, v, w in persons]
    masks = [torch.rand(1, q.shape[1], generator=gen) for _ in persons]
    out = routing.route(q, a_text, routing.TokenGroups.build(persons_lo, heads), masks)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = routing.route(q.float(), a_text.float(), routing.TokenGroups.build(persons_lo, heads), masks)
    scale = ref.abs().max()
    torch.testing.assert_close(out.float(), ref, atol=tol * scale, rtol=tol)


# ---- alpha and weights ----


def test_alpha_blends_text_and_style(routing):
    heads = 2
    q, a_text, persons, gen = make(tokens=(4, 4), seed=6)
    style = (torch.randn(1, 16, 32, generator=gen), torch.randn(1, 16, 32, generator=gen), 0.6)
    masks = [torch.rand(1, q.shape[1], generator=gen) for _ in persons]
    plain = routing.TokenGroups.build(persons, heads)
    styled = routing.TokenGroups.build(persons, heads, style=style)

    # alpha = 0: the style is off entirely.
    torch.testing.assert_close(
        routing.route(q, a_text, styled, masks, alpha=0.0), routing.route(q, a_text, plain, masks, alpha=0.0), atol=1e-6, rtol=0
    )
    # alpha = 0.5: text and style both at full strength; the ends fade one of them out.
    for alpha, t, g in ((0.5, 1.0, 1.0), (0.25, 1.0, 0.5), (0.75, 0.5, 1.0), (1.0, 0.0, 1.0)):
        assert (routing.text_gain(alpha), routing.style_gain(alpha)) == (t, g)
        out = routing.route(q, a_text, styled, masks, alpha=alpha)
        expected = reference(q, a_text, persons, masks, heads, style=style, alpha=alpha)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="alpha"):
        routing.route(q, a_text, styled, masks, alpha=1.5)


def test_zero_weight_persons_leave_text_and_style_alone(routing):
    heads = 2
    q, a_text, persons, gen = make(tokens=(4, 8), seed=7)
    zero = [(k, v, 0.0) for k, v, _ in persons]
    masks = [torch.rand(1, q.shape[1], generator=gen), None]
    assert torch.equal(routing.route(q, a_text, routing.TokenGroups.build(zero, heads), masks), a_text)

    style = (torch.randn(1, 4, 32, generator=gen), torch.randn(1, 4, 32, generator=gen), 1.3)
    out = routing.route(q, a_text, routing.TokenGroups.build(zero, heads, style=style), masks)
    style_only = routing.route(q, a_text, routing.TokenGroups.build([], heads, style=style))
    torch.testing.assert_close(out, style_only, atol=1e-6, rtol=0)
    # No tokens at all: exactly A_text, whatever alpha (no style scales it).
    for alpha in (0.0, 0.5, 0.9, 1.0):
        assert torch.equal(routing.route(q, a_text, routing.TokenGroups.build([], heads), alpha=alpha), a_text)


def test_without_a_style_alpha_changes_nothing(routing):
    """alpha is the text / style-image balance: with no style acting at a layer (none, or a style whose
    scale there is 0: style_weight 0 or a block left out by style_blocks) the text keeps full strength
    and the output is bit-identical for every alpha. (It was scaled by min(1, 2(1 - alpha)) before:
    above 0.5 the prompt just got weaker.)"""
    heads = 2
    q, a_text, persons, gen = make(b=4, tokens=(4, 6), seed=11)
    masks = [torch.rand(1, q.shape[1], generator=gen), None]
    off = (torch.randn(1, 5, 32, generator=gen), torch.randn(1, 5, 32, generator=gen), 0.0)
    for style in (None, off):
        groups = routing.TokenGroups.build(persons, heads, style=style)
        assert not groups.style_acts and routing.layer_text_gain(groups, 0.9) == 1.0
        half = routing.route(q, a_text, groups, masks, alpha=0.5)
        chunked = routing.route_chunks(q, a_text, [groups, groups], masks, alpha=0.5)
        for alpha in (0.0, 0.9, 1.0):
            assert torch.equal(routing.route(q, a_text, groups, masks, alpha=alpha), half)
            assert torch.equal(routing.route_chunks(q, a_text, [groups, groups], masks, alpha=alpha), chunked)
        expected = reference(q, a_text, persons, masks, heads, style=style, alpha=0.9)
        torch.testing.assert_close(half.double(), expected, atol=1e-5, rtol=0)


def test_a_wrapped_output_is_never_scaled_by_alpha(routing):
    """A foreign replacement's output (A_text + its own contribution F) goes through unscaled:
    out = F + t(alpha) A_text + g(alpha) s A_style + R, against the float64 loop."""
    heads = 2
    q, a_text, persons, gen = make(b=4, tokens=(4, 4), seed=12)
    foreign = torch.randn(q.shape, generator=gen)  # F
    wrapped = a_text + foreign
    masks = [torch.rand(1, q.shape[1], generator=gen) for _ in persons]
    style = (torch.randn(1, 6, 32, generator=gen), torch.randn(1, 6, 32, generator=gen), 0.7)
    styled = routing.TokenGroups.build(persons, heads, style=style)
    for alpha in (0.25, 0.5, 0.9, 1.0):
        expected = reference(q, a_text, persons, masks, heads, style=style, alpha=alpha) + foreign.double()
        out = routing.route(q, a_text, styled, masks, alpha=alpha, wrapped=wrapped)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
        chunked = routing.route_chunks(q, a_text, [styled, styled], masks, alpha=alpha, wrapped=wrapped)
        torch.testing.assert_close(chunked.double(), expected, atol=1e-5, rtol=0)
    # Where the text is not scaled the plain text attention is not needed (the patch skips that call).
    plain = routing.TokenGroups.build(persons, heads)
    out = routing.route(q, None, plain, masks, alpha=0.9, wrapped=wrapped)
    torch.testing.assert_close(out.double(), reference(q, wrapped, persons, masks, heads), atol=1e-5, rtol=0)
    assert torch.equal(routing.route(q, None, routing.TokenGroups.build([], heads), alpha=0.9, wrapped=wrapped),
                       wrapped)
    with pytest.raises(ValueError, match="needs a_text"):
        routing.route(q, None, styled, masks, alpha=0.9, wrapped=wrapped)


def test_token_groups_move_once_and_stay_put(routing):
    q, a_text, persons, _ = make(tokens=(4,))
    groups = routing.TokenGroups.build(persons, 2)
    assert groups.to("cpu", torch.float32) is groups
    moved = groups.to("cpu", torch.float64)
    assert moved is groups.to("cpu", torch.float64) and moved.keys.dtype == torch.float64
    assert groups.keys.dtype == torch.float32
    with pytest.raises(Exception):
        groups.heads = 3  # frozen
    with pytest.raises(ValueError, match="batch"):
        routing.TokenGroups.build(persons + [(torch.randn(2, 4, 32),) * 2 + (1.0,), (torch.randn(3, 4, 32),) * 2 + (1.0,)], 2)
    with pytest.raises(ValueError, match="regions"):
        routing.route(q, a_text, groups, torch.ones(1, 7, 1))


# ---- masks onto token grids ----


def test_token_grid_matches_ceil_division_per_level(routing):
    assert [routing.token_grid((13, 21), f) for f in (1, 2, 4, 8)] == [(13, 21), (7, 11), (4, 6), (2, 3)]
    # What the UNet's downsampler (3x3, stride 2, padding 1) actually produces.
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, 13, 21)
    for f in (2, 4, 8):
        x = conv(x)
        assert tuple(x.shape[-2:]) == routing.token_grid((13, 21), f)
    for f in (1, 2, 4, 8):
        gh, gw = routing.token_grid((13, 21), f)
        assert routing.find_downscale((13, 21), gh * gw) == f
    with pytest.raises(ValueError):
        routing.find_downscale((13, 21), 5)
    with pytest.raises(ValueError):
        routing.token_grid((13, 21), 3)


def test_masks_to_tokens_keeps_soft_values_on_odd_grids(routing):
    latent = (13, 21)
    const = torch.full((1, 100, 164), 0.3)
    gen = torch.Generator().manual_seed(8)
    soft = torch.rand(1, 100, 164, generator=gen)
    half = torch.zeros(1, 104, 168)
    half[..., :84] = 1.0  # left half of the image
    for f in (1, 2, 4, 8):
        gh, gw = routing.token_grid(latent, f)
        tokens = routing.masks_to_tokens(const, latent, f, batch=1)
        assert tokens.shape == (1, gh * gw)
        # The odd last row/column averages only real pixels: no darkening at the border.
        torch.testing.assert_close(tokens, torch.full_like(tokens, 0.3), atol=1e-6, rtol=0)
        r = routing.masks_to_tokens(soft, latent, f, batch=1)
        assert r.min() >= 0 and r.max() <= 1 and 0 < r.min() < r.max() < 1
        grid = routing.masks_to_tokens(half, latent, f, batch=1).view(gh, gw)
        assert torch.all(grid[:, 0] == 1) and torch.all(grid[:, -1] == 0)
    # A 2-pixel line in a 1024-wide mask survives as a faint region instead of aliasing away.
    line = torch.zeros(1, 1024, 1024)
    line[..., 500:502] = 1.0
    faint = routing.masks_to_tokens(line, (64, 64), 1, batch=1)
    assert 0 < faint.max() < 1
    # Already at latent size and downscale 1: passed through, and the caller's tensor is untouched.
    exact = torch.rand(1, *latent, generator=gen) * 2 - 0.5
    before = exact.clone()
    out = routing.masks_to_tokens(exact, latent, 1, batch=1)
    assert torch.equal(exact, before) and out.min() >= 0 and out.max() <= 1


def test_masks_to_tokens_batch_broadcasting(routing):
    latent = (9, 11)
    gen = torch.Generator().manual_seed(9)
    one = routing.masks_to_tokens(torch.rand(1, 40, 40, generator=gen), latent, 2, batch=3)
    assert one.shape == (3, 30) and torch.equal(one[0], one[2])
    per = torch.rand(3, 40, 40, generator=gen)
    each = routing.masks_to_tokens(per, latent, 2, batch=3)
    assert each.shape == (3, 30)
    for i in range(3):
        assert torch.equal(each[i], routing.masks_to_tokens(per[i : i + 1], latent, 2, batch=1)[0])
    with pytest.raises(ValueError, match="mask batch 2 must be 1 .* latent batch 3"):
        routing.masks_to_tokens(torch.rand(2, 40, 40), latent, 2, batch=3)
    # And the result feeds the kernel for that batch.
    groups = routing.TokenGroups.build([(torch.randn(1, 4, 16), torch.randn(1, 4, 16), 1.0)], 2)
    q = torch.randn(3, 30, 16)
    assert routing.route(q, q, groups, [each]).shape == q.shape
