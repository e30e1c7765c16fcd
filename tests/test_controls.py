"""The IP-Adapter controls (attention/controls.py): embeds scaling, InstantStyle blocks and per-block
style weights, unfold batch, and image-to-image with FaceStudio Apply."""
from __future__ import annotations

import pytest
import torch

from facestudio_testing.reference_attention import attend

from facestudio_testing.sd15_apply import apply, base, identity, person, replacements, run_latent

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def mods(booted):
    return booted.pack_module("attention.controls"), booted.pack_module("attention.patch")


def reference(mode: str, q, kv, weight: float, heads: int) -> torch.Tensor:
    """The adapter attention of one person under each mode, written from its definition."""
    k, v = (t.double() for t in kv)
    c_weight = weight * k.shape[-1] / 1280.0
    if mode == "V only":
        return weight * attend(q, k, v, heads)
    if mode == "K+V":
        return attend(q, weight * k, weight * v, heads)
    if mode == "K+V w/ C penalty":
        return attend(q, c_weight * k, c_weight * v, heads)
    mean = v.mean(1, keepdim=True)
    return attend(q, c_weight * k, v - mean + c_weight * mean, heads)


@pytest.mark.parametrize("mode", ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"])
def test_embeds_scaling_modes(mods, mode):
    controls, patch_mod = mods
    from comfy.ldm.modules import attention

    gen = torch.Generator().manual_seed(2)
    heads, c = 2, 320
    q, k, v = (torch.randn(2, 16, c, generator=gen) for _ in range(3))
    kv = (torch.randn(1, 4, c, generator=gen), torch.randn(1, 4, c, generator=gen))
    a_text = attention.optimized_attention(q, k, v, heads)
    extra = {"n_heads": heads, "cond_or_uncond": [0, 1], "original_shape": [2, 4, 4, 4]}
    for weight in (0.0, 0.6, 1.7):
        scaled, kernel_weight = controls.scale_kv(kv, weight, mode)
        patch = patch_mod.FaceStudioAttention([patch_mod.PersonLayer(scaled, scaled, kernel_weight, 1e9, 0.0, None)],
                                              None, 0.5)
        out = patch(q, k, v, extra)
        if weight == 0.0:
            assert torch.equal(out, a_text)
        else:
            torch.testing.assert_close(out.double(), a_text.double() + reference(mode, q, kv, weight, heads),
                                       atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="embeds_scaling must be one of"):
        controls.scale_kv(kv, 1.0, "K only")


# cubiq's ComfyUI_IPAdapter_plus (IPAdapterPlus.py:307-320 at 9d076a3): weight_type sets as
# {host transformer_index: multiplier}, written here from those lines, not from the code under test.
CUBIQ_SETS = {
    "SD1.5": {"style": {i: 1.0 for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)},
              "composition": {4: 0.25, 5: 1.0}},
    "SDXL": {"style": {6: 1.0}, "composition": {3: 1.0}},
}
# The host's transformer_index counts SpatialTransformers in execution order (input, middle, output).
SD15_EXECUTION_ORDER = [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
                        ("middle", 0)] + [("output", i) for i in range(3, 12)]
SDXL_EXECUTION_ORDER = [("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0)] + [
    ("output", i) for i in range(6)]
SDXL_DEPTH = {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10,
              **{("output", i): 10 for i in range(3)}, **{("output", i): 2 for i in range(3, 6)}}


def cubiq_expected(base: str, blocks: str, order) -> dict[tuple[str, int], float]:
    sets = CUBIQ_SETS[base]
    wanted = {"style only": sets["style"], "composition only": sets["composition"],
              "style and composition": {**sets["style"], **sets["composition"]}}[blocks]
    return {key: wanted.get(t, 0.0) for t, key in enumerate(order)}


def host_transformer_index(model, layers) -> dict[tuple[str, int], int]:
    """Each block's transformer_index as the host's UNet hands it to an attn2 replacement in a real forward."""
    from comfy.ldm.modules.attention import optimized_attention

    unet = model.model.diffusion_model
    seen = {}

    def record(q, k, v, extra):
        seen.setdefault(tuple(extra["block"]), set()).add(extra["transformer_index"])
        return optimized_attention(q, k, v, extra["n_heads"])

    keys = {p.patch_key for p in layers.cross_attention_positions(model)}
    dtype = next(unet.parameters()).dtype
    with torch.no_grad():
        unet(torch.zeros(1, 4, 16, 16, dtype=dtype), torch.tensor([500.0]), torch.zeros(1, 77, 768, dtype=dtype),
             transformer_options={"patches_replace": {"attn2": {key: record for key in keys}}})
    assert all(len(t) == 1 for t in seen.values()), seen
    return {block: t.pop() for block, t in seen.items()}


def test_style_blocks_follow_cubiq_sets_on_sd15(mods, loaded, booted):
    """SD1.5 'style only' / 'composition only' act on cubiq's sets (input 1, 2, 4, 5 + output 5-11; input 7 at
    0.25 + input 8), not one block each."""
    controls, _ = mods
    layers = booted.pack_module("attention.layers")
    model = loaded[0]
    positions = layers.cross_attention_positions(model)
    keys = [p.patch_key[:2] for p in positions]
    assert len(positions) == 16 and set(keys) == set(SD15_EXECUTION_ORDER)
    # The order the expected sets are indexed by is the host's own counter.
    assert host_transformer_index(model, layers) == {key: t for t, key in enumerate(SD15_EXECUTION_ORDER)}
    for blocks in ("style only", "composition only", "style and composition"):
        got = dict(zip(keys, controls.style_layer_scales(positions, "SD1.5", blocks)))
        assert got == cubiq_expected("SD1.5", blocks, SD15_EXECUTION_ORDER), blocks
    got = dict(zip(keys, controls.style_layer_scales(positions, "SD1.5", "composition only")))
    assert got[("input", 7)] == 0.25 and got[("input", 8)] == 1.0 and sum(map(bool, got.values())) == 2


def test_style_blocks_follow_cubiq_sets_on_sdxl(mods, booted):
    """SDXL keeps InstantStyle's single blocks, which are cubiq's {6} and {3}: output 1 and input 8, every
    transformer block in them."""
    controls, _ = mods
    layers = booted.pack_module("attention.layers")
    positions = [layers.AttentionPosition(b, i, t, 640, 2048, f"{b}.{i}.{t}", 10)
                 for (b, i), depth in SDXL_DEPTH.items() for t in range(depth)]
    assert len(positions) == 70
    for blocks in ("style only", "composition only", "style and composition"):
        expected = cubiq_expected("SDXL", blocks, SDXL_EXECUTION_ORDER)
        scales = controls.style_layer_scales(positions, "SDXL", blocks)
        assert scales == [expected[p.patch_key[:2]] for p in positions], blocks
    on = {p.patch_key[:2] for p, s in zip(positions, controls.style_layer_scales(positions, "SDXL", "style only")) if s}
    assert on == {("output", 1)}


def test_style_blocks_help_names_the_layers(mods):
    controls, _ = mods
    text = controls.STYLE_BLOCKS_HELP
    assert "SD1.5: style = input 1, 2, 4, 5 and output 5-11; composition = input 7 (at 0.25), 8." in text
    assert "SDXL: style = output 1; composition = input 8." in text


def test_style_blocks_and_block_weights(mods, loaded, booted):
    controls, _ = mods
    model = loaded[0]
    positions = booted.pack_module("attention.layers").cross_attention_positions(model)
    keys = [p.patch_key[:2] for p in positions]

    assert controls.style_layer_scales(positions, "SD1.5", "all") == [1.0] * len(keys)
    # block_weights override the preset only in the blocks named. (This used to check output 4 on and output 5
    # off, the old single-block SD1.5 style choice; cubiq's SD1.5 style set has output 5-11 and not output 4.)
    scales = dict(zip(keys, controls.style_layer_scales(positions, "SD1.5", "style only", "input 8 = 0.5; middle: 2")))
    assert scales[("input", 8)] == 0.5 and scales[("middle", 0)] == 2.0
    assert scales[("output", 5)] == 1.0 and scales[("output", 4)] == 0.0 and scales[("input", 7)] == 0.0
    with pytest.raises(ValueError, match="no cross-attention in block.* input 3"):
        controls.style_layer_scales(positions, "SD1.5", "all", "input 3=1")
    with pytest.raises(ValueError, match="'output=1' is not understood"):
        controls.parse_block_weights("output=1")


def test_unfold_batch_gives_latent_i_person_i(mods):
    _, patch_mod = mods
    from comfy.ldm.modules import attention

    gen = torch.Generator().manual_seed(6)
    heads, c = 2, 16
    q, k, v = (torch.randn(6, 16, c, generator=gen) for _ in range(3))  # cond/uncond x 3 latents
    people = [patch_mod.PersonLayer(*(2 * [(torch.randn(1, 4, c, generator=gen),
                                            torch.randn(1, 4, c, generator=gen))]), 1.0, 1e9, 0.0, None)
              for _ in range(2)]
    extra = {"n_heads": heads, "cond_or_uncond": [0, 1], "original_shape": [6, 4, 4, 4]}
    out = patch_mod.FaceStudioAttention(people, None, 0.5, unfold_batch=True)(q, k, v, extra)
    a_text = attention.optimized_attention(q, k, v, heads)
    for row in range(6):
        kk, vv = people[(row % 3) % 2].cond
        torch.testing.assert_close(out[row:row + 1].double(), a_text[row:row + 1].double()
                                   + attend(q[row:row + 1], kk, vv, heads), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="agree on unfold_batch"):
        patch_mod.FaceStudioAttention(people, None, 0.5, unfold_batch=True).merged_with(
            patch_mod.FaceStudioAttention(people, None, 0.5))


def test_controls_reach_the_patch_through_apply(mods, loaded):
    _, patch_mod = mods
    model, adapter, (a, b) = loaded
    persons = patch_mod.add_person(patch_mod.add_person(None, a, weight=0.5), b)
    plain = patch_mod.apply_facestudio(model, adapter, persons)
    scaled = patch_mod.apply_facestudio(model, adapter, persons, embeds_scaling="K+V w/ C penalty", unfold_batch=True)
    for first, second in zip(replacements(plain).values(), replacements(scaled).values()):
        mine, theirs = first.layers()[0][0], second.layers()[0][0]  # K/V read back from each store
        width = mine.cond[0].shape[-1]
        factor = 0.5 * width / 1280.0
        torch.testing.assert_close(theirs.cond[0], mine.cond[0] * factor)
        assert first.persons[0].weight == 0.5 and second.persons[0].weight == 1.0 and second.unfold_batch
    with pytest.raises(ValueError, match="style_blocks must be one of"):
        patch_mod.apply_facestudio(model, adapter, persons, style_blocks="layout")


def test_unfold_batch_in_the_executor(comfy_host, setup):
    def latents(unfold: bool, both: bool):
        g = base(setup, seed=4)
        g.prompt[g["latent"]]["inputs"]["batch_size"] = 2
        first = person(g, identity(g, "fs_apply_a.png", "a"))
        persons = person(g, identity(g, "fs_apply_b.png", "b"), persons=first) if both else first
        node = apply(g, persons)
        g.prompt[node]["inputs"]["unfold_batch"] = unfold
        return run_latent(comfy_host, g)

    dealt = latents(True, True)
    only_a = latents(False, False)
    torch.testing.assert_close(dealt[0], only_a[0], atol=1e-4, rtol=0)  # latent 0: person a alone
    assert (dealt[1] - only_a[1]).abs().max() > 1e-3                    # latent 1: person b, not a


def test_image_to_image_keeps_the_layout(comfy_host, setup):
    g = base(setup, seed=8)
    image = g.add("LoadImage", {"image": "fs_apply_style.png"})  # a 96x80 noise picture, far from any sample
    encoded = g.add("VAEEncode", {"pixels": [image, 0], "vae": g.vae})
    g.prompt[g["sampler"]]["inputs"].update(latent_image=[encoded, 0], denoise=0.35)
    apply(g, person(g, identity(g, "fs_apply_a.png", "a")))
    img2img = run_latent(comfy_host, g)
    source = comfy_host.output(comfy_host.run(g.prompt), encoded)["samples"]
    g.prompt[g["sampler"]]["inputs"].update(denoise=1.0)
    txt2img = run_latent(comfy_host, g)
    near, far = (img2img - source).pow(2).mean(), (txt2img - source).pow(2).mean()
    assert near < 0.25 * far, (near, far)
