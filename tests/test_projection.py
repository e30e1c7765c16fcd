"""attention/projection.py: embedding -> tokens -> per-layer K/V, checked against diffusers' own classes.

diffusers (a test-only dependency) builds its projections from the same generated `image_proj` through
its own converter (`_convert_ip_adapter_image_proj_to_diffusers`), so the reference maths and the file
layout are both checked independently of the pack.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facestudio_testing import adapter_files as af
from facestudio_testing import reference_projection
from facestudio_testing.meta_models import diffusers_unet

ATOL = 1e-4


@pytest.fixture(scope="module")
def projection(booted):
    return booted.pack_module("attention.projection")


@pytest.fixture(scope="module")
def adapters(booted):
    return booted.pack_module("attention.adapters")


@pytest.fixture(scope="module")
def routing(booted):
    return booted.pack_module("attention.routing")


@pytest.fixture(scope="module")
def diffusers_unets():
    d = af.SDXL_WIDTH_DIVISOR
    return {af.SD15: diffusers_unet("tiny-sd15"),
            af.SDXL: diffusers_unet("sdxl", block_out_channels=(320 // d, 640 // d, 1280 // d), norm_num_groups=2)}


def weights(adapters, kind, base):
    """The generated adapter as the pack types it (kind given explicitly: no file name to hint v2)."""
    nested = af.shared_state_dict(kind, base)
    return adapters.recognise(nested["image_proj"], nested["ip_adapter"], af.release_file_name(kind, base, ".bin"),
                              kind)


def diffusers_projection(diffusers_unets, kind, base):
    unet = diffusers_unets[base]
    image_proj = af.shared_state_dict(kind, base)["image_proj"]
    module = type(unet)._convert_ip_adapter_image_proj_to_diffusers(unet, image_proj, low_cpu_mem_usage=False)
    return module.float().eval()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs difference {err}"


CLIP_TOKENS = 257  # ViT-H/14 at 224 px: 256 patches + CLS


# --- tokens against diffusers ---------------------------------------------------------------------

@pytest.mark.parametrize("base", af.BASES)
@pytest.mark.parametrize("kind", ["faceid", "faceid-portrait"])
def test_faceid_mlp_matches_diffusers(projection, adapters, diffusers_unets, kind, base):
    w = weights(adapters, kind, base)
    emb = randn(1, 512)
    ours = projection.identity_tokens(w, emb)
    ref = diffusers_projection(diffusers_unets, kind, base)
    with torch.no_grad():
        expected = ref(emb)
    assert ours.shape == (1, af.TOKENS[kind], af.CONTEXT[base]) and ours.dtype == torch.float32
    close(ours, expected)


# SDXL: the generator's FaceID Plus resampler is 256 wide (real: 2048), so v2's shortcut (which adds the
# ID tokens to the 2048-wide output) only exists for SD1.5 here; SDXL v2 at real width costs ~200M parameters.
@pytest.mark.parametrize("kind, base, shortcut_scale", [
    ("faceid-plus", af.SD15, None), ("faceid-plus", af.SDXL, None),
    ("faceid-plus-v2", af.SD15, 1.0), ("faceid-plus-v2", af.SD15, 0.6),
])
def test_faceid_plus_matches_diffusers(projection, adapters, diffusers_unets, kind, base, shortcut_scale):
    w = weights(adapters, kind, base)
    emb, clip = randn(1, 512, seed=1), randn(1, CLIP_TOKENS, af.VIT_H_HIDDEN, seed=2)
    if shortcut_scale is None:
        ours = projection.identity_tokens(w, emb, clip)
    else:
        ours = projection.identity_tokens(w, emb, clip, shortcut_scale=shortcut_scale)
    ref = diffusers_projection(diffusers_unets, "faceid-plus", base)
    ref.clip_embeds = clip[:, None]  # diffusers: [batch, images, S, width]
    ref.shortcut = shortcut_scale is not None
    ref.shortcut_scale = shortcut_scale or 1.0
    with torch.no_grad():
        expected = ref(emb)
    assert ours.shape == (1, 4, af.CONTEXT[base])
    close(ours, expected)


def test_faceid_plus_v2_shortcut_scale_changes_the_tokens(projection, adapters):
    w = weights(adapters, "faceid-plus-v2", af.SD15)
    emb, clip = randn(1, 512, seed=1), randn(1, 16, af.VIT_H_HIDDEN, seed=2)
    v1 = projection.identity_tokens(weights(adapters, "faceid-plus", af.SD15), emb, clip)
    module = projection.projection_for(w)
    close(module(emb, clip, shortcut=False), v1, 0)
    ids = module.id_tokens(emb)  # the ID MLP's tokens alone: what the shortcut adds
    for s in (0.0, 2.0):
        close(projection.identity_tokens(w, emb, clip, shortcut_scale=s), ids + s * v1)


def test_faceid_plus_v2_shortcut_needs_equal_widths(projection, adapters):
    w = weights(adapters, "faceid-plus-v2", af.SDXL)  # 256-wide ID tokens, 2048-wide output
    with pytest.raises(adapters.AdapterError, match="shortcut.*load it as kind 'faceid-plus'"):
        projection.identity_tokens(w, randn(1, 512), randn(1, 8, af.VIT_H_HIDDEN))


@pytest.mark.parametrize("base", af.BASES)
def test_image_prompt_matches_diffusers(projection, adapters, diffusers_unets, base):
    w = weights(adapters, "image-prompt", base)
    embeds = randn(1, af.IMAGE_EMBEDS[base], seed=3)
    ours = projection.style_tokens(w, embeds)
    with torch.no_grad():
        expected = diffusers_projection(diffusers_unets, "image-prompt", base)(embeds)
    assert ours.shape == (1, 4, af.CONTEXT[base])
    close(ours, expected)


@pytest.mark.parametrize("base", af.BASES)
def test_image_prompt_plus_matches_diffusers(projection, adapters, diffusers_unets, base):
    w = weights(adapters, "image-prompt-plus", base)
    hidden = randn(1, CLIP_TOKENS, af.VIT_H_HIDDEN, seed=4)
    ours = projection.style_tokens(w, hidden)
    with torch.no_grad():
        expected = diffusers_projection(diffusers_unets, "image-prompt-plus", base)(hidden)
    assert ours.shape == (1, 16, af.CONTEXT[base])
    close(ours, expected)


def test_modules_hold_fp32_copies_loaded_strictly(projection, adapters):
    for kind in ("faceid", "faceid-plus", "faceid-portrait-unnorm", "image-prompt", "image-prompt-plus"):
        w = weights(adapters, kind, af.SD15)
        module = projection.projection_for(w)
        state = module.state_dict()
        assert set(state) == set(w.image_proj)
        for key, value in state.items():
            assert value.dtype == torch.float32 and torch.equal(value, w.image_proj[key].float())
        assert not any(p.requires_grad for p in module.parameters())


def test_incomplete_projection_is_an_adapter_error(projection, adapters):
    nested = af.copy_state_dict(af.shared_state_dict("faceid", af.SD15))
    del nested["image_proj"]["proj.2.bias"]  # recognised (biases are not read there) but cannot project
    w = adapters.recognise(nested["image_proj"], nested["ip_adapter"], "no-bias.bin")
    with pytest.raises(adapters.AdapterError, match="no-bias.bin.*proj.2.bias"):
        projection.projection_for(w)


# --- Portrait, unconditional tokens, input checks -------------------------------------------------

def test_portrait_shots_become_tokens_in_order(projection, adapters):
    w = weights(adapters, "faceid-portrait", af.SD15)
    shots = randn(3, 512, seed=5)
    tokens = projection.identity_tokens(w, shots)
    assert tokens.shape == (1, 3 * 16, 768)
    each = torch.cat([projection.identity_tokens(w, shot[None]) for shot in shots], dim=1)
    close(tokens, each, atol=1e-5)  # batched vs one-row matmuls: rounding only
    assert not torch.allclose(tokens[:, :16], tokens[:, 16:32])


def raw_embeddings(shots, seed):
    """Rows about 25 long, as raw ArcFace embeddings (insightface's face.embedding) are, not unit length."""
    return randn(shots, 512, seed=seed) * 1.1


@pytest.mark.parametrize("base", af.BASES)
@pytest.mark.parametrize("shots", [1, 3])
def test_portrait_unnorm_matches_the_reference_resampler(projection, adapters, diffusers_unets, base, shots):
    """The shots' raw embeddings are the reference Resampler's input sequence [1, shots, 512] -> 16 tokens,
    checked against IP-Adapter's Resampler (from cubiq's pinned checkout) and diffusers' converter on the
    same random weights. (cubiq's pack runs each shot as its own sequence: the same for one shot.)"""
    w = weights(adapters, "faceid-portrait-unnorm", base)
    emb = raw_embeddings(shots, seed=20 + shots)
    ours = projection.identity_tokens(w, emb)
    reference = reference_projection.portrait_unnorm_resampler(dict(w.image_proj), w.context_dim)
    with torch.no_grad():
        expected = reference(emb[None])
        via_diffusers = diffusers_projection(diffusers_unets, "faceid-portrait-unnorm", base)(emb[None])
    assert ours.shape == (1, 16, af.CONTEXT[base]) and ours.dtype == torch.float32
    close(ours, expected)
    close(ours, via_diffusers)
    if shots > 1:  # the later shots change all 16 tokens: one sequence, not the first shot plus extras
        assert not torch.allclose(ours, projection.identity_tokens(w, emb[:1]), atol=1e-3)


def test_portrait_unnorm_reads_the_raw_scale(projection, adapters):
    """Unlike Portrait, unnorm was trained on the unnormalised embedding: its length changes the tokens."""
    w = weights(adapters, "faceid-portrait-unnorm", af.SDXL)
    emb = raw_embeddings(2, seed=30)
    unit = emb / emb.norm(dim=-1, keepdim=True)
    assert not torch.allclose(projection.identity_tokens(w, emb), projection.identity_tokens(w, unit), atol=1e-3)


def test_unconditional_portrait_unnorm_resamples_zero_shots(projection, adapters):
    """The reference's negative side: the Resampler of torch.zeros_like(face_embeds), one zero row per shot."""
    w = weights(adapters, "faceid-portrait-unnorm", af.SDXL)
    reference = reference_projection.portrait_unnorm_resampler(dict(w.image_proj), w.context_dim)
    with torch.no_grad():
        expected = reference(torch.zeros(1, 3, 512))
    close(projection.unconditional_identity_tokens(w, shots=3), expected)


def test_unconditional_identity_tokens_project_zeros(projection, adapters):
    w = weights(adapters, "faceid", af.SD15)
    close(projection.unconditional_identity_tokens(w), projection.identity_tokens(w, torch.zeros(1, 512)), 0)
    p = weights(adapters, "faceid-portrait", af.SD15)
    uncond = projection.unconditional_identity_tokens(p, shots=3)
    assert uncond.shape == (1, 48, 768)
    close(uncond, projection.identity_tokens(p, torch.zeros(3, 512)), 0)


@pytest.mark.parametrize("kind", ["faceid-plus", "faceid-plus-v2"])
def test_unconditional_faceid_plus_uses_zero_image_features(projection, adapters, kind):
    w = weights(adapters, kind, af.SD15)
    zero_clip = randn(1, 16, af.VIT_H_HIDDEN, seed=6)  # what CLIP makes of an all-zero image: caller's
    got = projection.unconditional_identity_tokens(w, zero_clip, shortcut_scale=0.7)
    close(got, projection.identity_tokens(w, torch.zeros(1, 512), zero_clip, shortcut_scale=0.7), 0)
    with pytest.raises(ValueError, match="needs CLIP vision features"):
        projection.unconditional_identity_tokens(w)


def test_unconditional_style_tokens(projection, adapters):
    w = weights(adapters, "image-prompt", af.SD15)
    close(projection.unconditional_style_tokens(w), projection.style_tokens(w, torch.zeros(1, 1024)), 0)
    plus = weights(adapters, "image-prompt-plus", af.SD15)
    zero_clip = randn(1, 16, af.VIT_H_HIDDEN, seed=7)
    close(projection.unconditional_style_tokens(plus, zero_clip), projection.style_tokens(plus, zero_clip), 0)


def test_inputs_are_checked(projection, adapters):
    faceid = weights(adapters, "faceid", af.SD15)
    with pytest.raises(ValueError, match="combine the shots"):
        projection.identity_tokens(faceid, randn(2, 512))
    with pytest.raises(ValueError, match="are 256 wide; this adapter reads 512"):
        projection.identity_tokens(faceid, randn(1, 256))
    assert projection.identity_tokens(faceid, randn(512)).shape == (1, 4, 768)  # a single vector is one row
    with pytest.raises(ValueError, match="not an image-prompt"):
        projection.style_tokens(faceid, randn(1, 1024))
    style = weights(adapters, "image-prompt", af.SD15)
    with pytest.raises(ValueError, match="not a face-identity adapter"):
        projection.identity_tokens(style, randn(1, 512))
    with pytest.raises(ValueError, match="one image"):
        projection.style_tokens(style, randn(2, 1024))


def test_half_precision_inputs_give_fp32_tokens(projection, adapters):
    w = weights(adapters, "faceid", af.SD15)
    emb = randn(1, 512)
    tokens = projection.identity_tokens(w, emb.half())
    assert tokens.dtype == torch.float32
    close(tokens, projection.identity_tokens(w, emb.half().float()), 0)


# --- per-layer K/V and routed attention -----------------------------------------------------------

@pytest.mark.parametrize("base", af.BASES)
def test_layer_kv_is_the_layer_projection(projection, adapters, base):
    w = weights(adapters, "faceid", base)
    tokens = projection.identity_tokens(w, randn(1, 512))
    kv = projection.layer_kv(w, tokens)
    assert len(kv) == w.layer_count
    for (k, v), (wk, wv) in zip(kv, w.layers):
        assert k.dtype == v.dtype == torch.float32 and k.shape == (1, 4, wk.shape[0])
        close(k, F.linear(tokens, wk.float()), 1e-6)
        close(v, F.linear(tokens, wv.float()), 1e-6)
    with pytest.raises(ValueError, match=r"tokens must be \[1 or B, T, "):
        projection.layer_kv(w, tokens[0])
    # Several token sets of different batch and length in one call give each set's own projection.
    sets = [tokens, randn(2, 7, w.context_dim), randn(1, 16, w.context_dim)]
    for together, one in zip(projection.layer_kvs(w, sets), sets):
        for (k, v), (k1, v1) in zip(together, projection.layer_kv(w, one)):
            assert k.shape == k1.shape and v.shape == v1.shape
            close(k, k1, 1e-5)
            close(v, v1, 1e-5)


def _diffusers_attention(inner, context, heads, seed):
    """An SD attn2 (no q/k/v bias, biased to_out) with seeded weights."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    attn = Attention(query_dim=inner, cross_attention_dim=context, heads=heads, dim_head=inner // heads)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=inner ** -0.5)
    return attn.eval()


def _ours_before_to_out(routing, attn, hidden, text, groups, masks=None):
    q = attn.to_q(hidden)
    b, n, inner = q.shape
    h, d = attn.heads, inner // attn.heads
    split = lambda t: t.view(b, -1, h, d).transpose(1, 2)  # noqa: E731
    a_text = F.scaled_dot_product_attention(split(q), split(attn.to_k(text)), split(attn.to_v(text)))
    a_text = a_text.transpose(1, 2).reshape(b, n, inner)
    return attn.to_out[0](routing.route(q, a_text, groups, masks, alpha=0.5))


@torch.no_grad()
def test_routed_single_person_equals_diffusers_processor(projection, adapters, routing):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    w = weights(adapters, "faceid", af.SD15)
    layer, scale = 3, 0.8
    wk, wv = w.layers[layer]
    inner, heads = wk.shape[0], wk.shape[0] // 64
    attn = _diffusers_attention(inner, w.context_dim, heads, seed=0)
    proc = IPAdapterAttnProcessor2_0(inner, w.context_dim, num_tokens=(4,), scale=scale)
    proc.to_k_ip[0].weight.copy_(wk.float())
    proc.to_v_ip[0].weight.copy_(wv.float())

    tokens = projection.identity_tokens(w, randn(1, 512, seed=8))
    hidden, text = randn(1, 64, inner, seed=9), randn(1, 77, w.context_dim, seed=10)
    expected = proc(attn, hidden, encoder_hidden_states=(text, [tokens]))

    k, v = projection.layer_kv(w, tokens)[layer]
    groups = routing.TokenGroups.build([(k, v, scale)], heads=heads)
    close(_ours_before_to_out(routing, attn, hidden, text, groups), expected)


@torch.no_grad()
def test_routed_two_persons_with_masks_equal_diffusers_masked_processor(projection, adapters, routing):
    from diffusers.image_processor import IPAdapterMaskProcessor
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    w = weights(adapters, "faceid", af.SD15)
    layer, scales = 5, [0.9, 0.6]
    wk, wv = w.layers[layer]
    inner, heads = wk.shape[0], wk.shape[0] // 64
    attn = _diffusers_attention(inner, w.context_dim, heads, seed=1)
    proc = IPAdapterAttnProcessor2_0(inner, w.context_dim, num_tokens=(4,), scale=[scales])
    proc.to_k_ip[0].weight.copy_(wk.float())
    proc.to_v_ip[0].weight.copy_(wv.float())

    persons = [projection.identity_tokens(w, randn(1, 512, seed=s)) for s in (11, 12)]
    gh, gw = 8, 12
    hidden, text = randn(1, gh * gw, inner, seed=13), randn(1, 77, w.context_dim, seed=14)
    left = torch.zeros(1, 1, gh, gw)
    left[..., : gw // 2] = 1.0
    masks = torch.cat([left, 1.0 - left], dim=1)  # [1, persons, h, w]: hard left / right halves
    ip_states = torch.stack([t[0] for t in persons])[None]  # [1, persons, T, ctx]
    expected = proc(attn, hidden, encoder_hidden_states=(text, [ip_states]), ip_adapter_masks=[masks])

    # diffusers' per-query mask ([1, Nq, inner], the same value across the width)
    token_masks = [IPAdapterMaskProcessor.downsample(masks[:, i], 1, gh * gw, inner)[..., 0] for i in range(2)]
    assert all(torch.equal(m, m.round()) for m in token_masks)  # still hard at the token grid
    kv = [projection.layer_kv(w, t)[layer] for t in persons]
    groups = routing.TokenGroups.build([(k, v, s) for (k, v), s in zip(kv, scales)], heads=heads)
    ours = _ours_before_to_out(routing, attn, hidden, text, groups, token_masks)
    close(ours, expected)
    # and the pack's own mask resize gives the same token masks for a grid-aligned split
    ours_masks = [routing.masks_to_tokens(masks[0, i], (gh, gw), 1, 1) for i in range(2)]
    for a, b in zip(ours_masks, token_masks):
        close(a, b, 1e-6)


# --- memory at Apply ------------------------------------------------------------------------------

class NewStorageBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes of every new CPU storage the ops inside the mode create (views and in-place ops
    make none)."""

    def __init__(self):
        super().__init__()
        self.bytes, self._seen = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type == "cpu"}
        out = func(*args, **kwargs)
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                ptr = o.untyped_storage().data_ptr()
                if ptr not in inputs and ptr not in self._seen:
                    self._seen.add(ptr)
                    self.bytes += o.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_projection_holds_one_fp32_copy_of_an_fp16_file_and_none_of_an_fp32_one(projection, adapters, tmp_path,
                                                                                    dtype):
    """projection_for allocates at most the fp32 size of the projection once (fp16 file), nothing for an
    fp32 file (its tensors become the parameters): no initialised parameters to copy into."""
    state = af.shared_state_dict("faceid-plus-v2", af.SD15)
    state["image_proj"] = {k: v.to(dtype) for k, v in state["image_proj"].items()}
    adapter = adapters.load_adapter(str(af.write_adapter(tmp_path / f"plus-v2-{dtype}.safetensors", state)))
    fp32_bytes = sum(v.numel() * 4 for v in adapter.image_proj.values())
    with NewStorageBytes() as counted:
        module = projection.projection_for(adapter)
    expected = fp32_bytes if dtype == torch.float16 else 0
    assert expected <= counted.bytes <= expected + 64 * 1024, (counted.bytes, fp32_bytes)
    if dtype == torch.float32:
        ptrs = {v.data_ptr() for v in adapter.image_proj.values()}
        assert all(p.data_ptr() in ptrs for p in module.parameters())
    emb = torch.randn(1, 512)
    clip = torch.randn(1, 257, adapter.clip_width)
    assert torch.isfinite(projection.identity_tokens(adapter, emb, clip, module=module)).all()
