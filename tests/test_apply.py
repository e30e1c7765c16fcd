"""FaceStudio Person + Apply: the attn2 replacement on its own, then in the host's real executor."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from facestudio_testing import adapter_files as af
from facestudio_testing import clip_models
from facestudio_testing.reference_attention import attend
from facestudio_testing.sd15_apply import NARROW_PACK, PLUS, STYLE, apply, base, identity, person, replacements, run_latent

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


# ---- the replacement object alone ----


def test_hard_left_right_masks_give_each_region_its_person_alone(booted):
    patch_mod = booted.pack_module("attention.patch")
    from comfy.ldm.modules import attention

    heads, c, hw = 4, 32, (8, 8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, c, generator=gen) for _ in range(3))
    left = torch.zeros(1, *hw)
    left[..., :4] = 1.0
    people = []
    for mask in (left, 1.0 - left):
        cond = (torch.randn(1, 4, c, generator=gen), torch.randn(1, 4, c, generator=gen))
        uncond = (torch.randn(1, 4, c, generator=gen), torch.randn(1, 4, c, generator=gen))
        people.append(patch_mod.PersonLayer(cond, uncond, 1.0, 10.0, 1.0, mask))
    patch = patch_mod.FaceStudioAttention(people, None, 0.5)
    extra = {"n_heads": heads, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([5.0, 5.0]),
             "original_shape": [2, 4, *hw], "attn_precision": None}
    out = patch(q, k, v, extra)
    a_text = attention.optimized_attention(q, k, v, heads)
    cols = torch.arange(64) % 8
    for i, rows in enumerate((cols < 4, cols >= 4)):
        for chunk, side in ((0, "cond"), (1, "uncond")):
            kk, vv = getattr(people[i], side)
            alone = a_text[chunk:chunk + 1, rows] + attend(q[chunk:chunk + 1, rows], kk, vv, heads).float()
            torch.testing.assert_close(out[chunk:chunk + 1, rows], alone, atol=1e-5, rtol=0)

    # Outside [end, start] sigma: nobody is active and the output is exactly A_text.
    assert torch.equal(patch(q, k, v, {**extra, "sigmas": torch.tensor([20.0, 20.0])}), a_text)
    # Shared, never copied, between model clones.
    import copy
    assert copy.deepcopy({"p": patch})["p"] is patch


def test_a_foreign_replacement_is_wrapped_for_a_text_and_ours_are_merged(booted):
    patch_mod = booted.pack_module("attention.patch")
    heads, c = 2, 16
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 16, c, generator=gen) for _ in range(3))
    kv = (torch.randn(1, 4, c, generator=gen), torch.randn(1, 4, c, generator=gen))
    calls = []

    def foreign(q, k, v, extra):
        calls.append(extra)
        return torch.full_like(q, 0.25)

    layer = patch_mod.PersonLayer(kv, kv, 1.0, 10.0, 0.0, None)
    ours = patch_mod.FaceStudioAttention([layer], None, 0.5).wrapping(foreign)
    extra = {"n_heads": heads, "cond_or_uncond": [0], "sigmas": torch.tensor([1.0]), "original_shape": [1, 4, 4, 4]}
    out = ours(q, k, v, extra)
    assert len(calls) == 1
    torch.testing.assert_close(out, 0.25 + attend(q, *kv, heads).float(), atol=1e-5, rtol=0)
    merged = ours.merged_with(patch_mod.FaceStudioAttention([layer], None, 0.5))
    assert merged.wrapped is foreign and len(merged.persons) == 2
    with pytest.raises(ValueError, match="same alpha"):
        ours.merged_with(patch_mod.FaceStudioAttention([layer], None, 0.7))


def test_alpha_never_scales_a_wrapped_replacement_and_without_a_style_changes_nothing(booted, monkeypatch):
    """A wrapped foreign replacement (text + its own contribution, here a constant 0.25) keeps its
    contribution at full strength at every alpha; only the plain text attention is scaled, by
    t(alpha) = min(1, 2(1 - alpha)), and only where a style acts. Before, the whole wrapped output was
    scaled (0.2 x 0.25 at alpha 0.9), and without a style alpha weakened the text too."""
    patch_mod = booted.pack_module("attention.patch")
    from comfy.ldm.modules import attention

    heads, c = 2, 16
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(2, 16, c, generator=gen)
    k, v = torch.randn(2, 6, c, generator=gen), torch.randn(2, 6, c, generator=gen)

    def kv(tokens):
        return torch.randn(1, tokens, c, generator=gen), torch.randn(1, tokens, c, generator=gen)

    layer = patch_mod.PersonLayer(kv(4), kv(4), 1.0, 10.0, 0.0, None)
    style = patch_mod.StyleLayer(kv(3), kv(3), 0.8)
    extra = {"n_heads": heads, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([1.0]),
             "original_shape": [2, 4, 4, 4]}

    def foreign(q, k, v, extra):
        return attention.optimized_attention(q, k, v, extra["n_heads"]) + 0.25

    host_calls = []
    replacement = booted.pack_module("attention.replacement")
    real_host = replacement._host_attention
    monkeypatch.setattr(replacement, "_host_attention", lambda *a: host_calls.append(1) or real_host(*a))
    text = attend(q, k, v, heads)
    for alpha in (0.5, 0.9, 1.0):
        host_calls.clear()
        out = patch_mod.FaceStudioAttention([layer], style, alpha).wrapping(foreign)(q, k, v, extra)
        t, g = min(1.0, 2 * (1 - alpha)), min(1.0, 2 * alpha)
        assert len(host_calls) == (t != 1.0)  # the plain text, only when alpha scales it
        for row, side in ((0, "cond"), (1, "uncond")):
            rows = slice(row, row + 1)
            expected = (0.25 + t * text[rows] + attend(q[rows], *getattr(layer, side), heads)
                        + g * 0.8 * attend(q[rows], *getattr(style, side), heads))
            torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=0)

    # No style: alpha changes nothing (bit-identical), wrapped or not, and no extra attention call.
    for wrapped in (None, foreign):
        outs = []
        for alpha in (0.0, 0.5, 0.9, 1.0):
            patch = patch_mod.FaceStudioAttention([layer], None, alpha)
            outs.append((patch if wrapped is None else patch.wrapping(wrapped))(q, k, v, extra))
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
    host_calls.clear()
    patch_mod.FaceStudioAttention([layer], None, 0.9).wrapping(foreign)(q, k, v, extra)
    assert host_calls == []


CHUNK_ORDERS = ([0], [1], [0, 1], [1, 0], [0, 0, 1])


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), latent=st.tuples(st.integers(1, 17), st.integers(1, 17)),
       downscale=st.sampled_from([1, 2, 4]), persons=st.integers(0, 5), chunks=st.sampled_from(CHUNK_ORDERS),
       with_style=st.booleans(), shared_sigma=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_random_calls_are_finite_and_exact_where_nobody_acts(booted, batch, latent, downscale, persons, chunks,
                                                             with_style, shared_sigma, seed):
    patch_mod, routing = booted.pack_module("attention.patch"), booted.pack_module("attention.routing")
    from comfy.ldm.modules import attention

    heads, c = 2, 16
    gen = torch.Generator().manual_seed(seed)
    grid = routing.token_grid(latent, downscale)
    n = grid[0] * grid[1]

    def kv(tokens):
        return torch.randn(1, tokens, c, generator=gen), torch.randn(1, tokens, c, generator=gen)

    people, reach = [], []
    for _ in range(persons):
        low, high = sorted((torch.rand(2, generator=gen) * 10).tolist())
        kind = int(torch.randint(0, 3, (), generator=gen))
        mask = [None, torch.zeros(1, 9, 7), torch.rand(1, 9, 7, generator=gen).round()][kind]
        weight = [0.0, 1.0, 1.7][int(torch.randint(0, 3, (), generator=gen))]
        t = int(torch.randint(1, 6, (), generator=gen))
        people.append(patch_mod.PersonLayer(kv(t), kv(t + 1), weight, high, low, mask))
        tokens = torch.ones(batch, n) if mask is None else routing.masks_to_tokens(mask, latent, downscale, batch)
        reach.append((low, high, weight, tokens))
    style = patch_mod.StyleLayer(kv(3), kv(3), 0.8) if with_style else None
    patch = patch_mod.FaceStudioAttention(people, style, 0.5)
    sigmas = torch.full((batch,), 5.0) if shared_sigma else torch.rand(batch, generator=gen) * 10
    rows = len(chunks) * batch
    q = torch.randn(rows, n, c, generator=gen) * 10
    k, v = torch.randn(rows, 5, c, generator=gen), torch.randn(rows, 5, c, generator=gen)
    extra = {"n_heads": heads, "cond_or_uncond": chunks, "sigmas": sigmas, "original_shape": [rows, 4, *latent]}
    out = patch(q, k, v, extra)
    a_text = attention.optimized_attention(q, k, v, heads)
    assert out.shape == q.shape and torch.isfinite(out).all()

    idle = torch.ones(batch, n, dtype=torch.bool)  # no active person reaches (row, token)
    for low, high, weight, tokens in reach:
        active = ((low <= sigmas) & (sigmas <= high))[:, None]
        idle &= ~(active & (tokens > 0) & (weight != 0))
    for chunk, side in enumerate(chunks):
        part = slice(chunk * batch, (chunk + 1) * batch)
        expected = a_text[part]
        if style is not None:
            kk, vv = getattr(style, "uncond" if side == 1 else "cond")
            expected = (expected.double() + 0.8 * attend(q[part], kk, vv, heads)).float()
            torch.testing.assert_close(out[part][idle], expected[idle], atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(out[part][idle], expected[idle])


def test_each_row_follows_its_own_sigma(booted):
    patch_mod = booted.pack_module("attention.patch")
    from comfy.ldm.modules import attention

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(4, 16, 8, generator=gen) for _ in range(3))
    kv = (torch.randn(1, 4, 8, generator=gen), torch.randn(1, 4, 8, generator=gen))
    patch = patch_mod.FaceStudioAttention([patch_mod.PersonLayer(kv, kv, 1.0, 6.0, 2.0, None)], None, 0.5)
    extra = {"n_heads": 2, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([4.0, 9.0]),
             "original_shape": [4, 4, 4, 4]}
    out, a_text = patch(q, k, v, extra), attention.optimized_attention(q, k, v, 2)
    for row, acts in ((0, True), (1, False), (2, True), (3, False)):
        assert torch.equal(out[row], a_text[row]) != acts


def test_person_node_returns_a_new_list(booted):
    patch_mod = booted.pack_module("attention.patch")
    one = patch_mod.add_person(None, "a")
    two = patch_mod.add_person(one, "b", torch.ones(2, 4, 4), mask_index=1, weight=0.5)
    assert len(one) == 1 and len(two) == 2 and two[0] is one[0]
    assert two[1].mask.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="mask_index 2 is out of range"):
        patch_mod.add_person(one, "b", torch.ones(2, 4, 4), mask_index=2)


# ---- in the executor ----


@pytest.mark.smoke
def test_weight_zero_is_bit_identical_and_weight_one_changes_the_latent(comfy_host, setup):
    plain = run_latent(comfy_host, base(setup))
    latents = {}
    for weight in (0.0, 1.0):
        g = base(setup)
        node = apply(g, person(g, identity(g, "fs_apply_a.png", "a"), weight))
        g.prompt[node]["inputs"]["lora_strength"] = 0.0  # weight 0 is about the identity; the LoRA now defaults to 1
        latents[weight] = run_latent(comfy_host, g)
    assert torch.equal(latents[0.0], plain)
    assert (latents[1.0] - plain).abs().max() > 1e-3


def test_the_original_model_in_the_same_prompt_is_untouched(comfy_host, setup):
    g = base(setup, seed=11)
    apply(g, person(g, identity(g, "fs_apply_a.png", "a")))
    g.add("KSampler", {**g.prompt[g["sampler"]]["inputs"], "model": g.link("checkpoint", 0)}, "original")
    g.add("SaveLatent", {"samples": g.link("original"), "filename_prefix": "facestudio_test"})
    comfy_host.executor.reset()  # both computed here, neither taken from an earlier run's cache
    result = comfy_host.run(g.prompt)
    assert result.success, result.error
    original = comfy_host.output(result, g["original"])["samples"]
    patched = comfy_host.output(result, g["sampler"])["samples"]
    comfy_host.executor.reset()
    plain = run_latent(comfy_host, base(setup, seed=11))
    assert torch.equal(original, plain)
    assert not torch.equal(patched, plain)


def test_two_applies_equal_one_apply_with_both_persons(comfy_host, setup):
    chained = base(setup)
    apply(chained, person(chained, identity(chained, "fs_apply_a.png", "a")))
    apply(chained, person(chained, identity(chained, "fs_apply_b.png", "b"), 0.8))
    joint = base(setup)
    first = person(joint, identity(joint, "fs_apply_a.png", "a"))
    apply(joint, person(joint, identity(joint, "fs_apply_b.png", "b"), 0.8, persons=first))
    a, b = run_latent(comfy_host, chained), run_latent(comfy_host, joint)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.equal(a, run_latent(comfy_host, base(setup)))


@pytest.mark.parametrize("case, message", [
    ("narrow", "128-wide face recognizer"),
    ("style", "style (image-prompt) adapter"),
    ("plus", "connect a CLIP vision model (ViT-H) to FaceStudio Encode Identity"),
])
def test_wrong_identity_or_adapter_is_a_clear_error(comfy_host, setup, case, message):
    g = base(setup)
    if case == "narrow":
        node = apply(g, person(g, identity(g, "fs_apply_a.png", "n", pack=NARROW_PACK)))
    else:
        node = apply(g, person(g, identity(g, "fs_apply_a.png", "a")), adapter=STYLE if case == "style" else PLUS)
    result = comfy_host.run(g.prompt)
    assert not result.success
    assert result.error_node == node
    assert message in result.error


@pytest.mark.smoke
def test_a_masked_person_runs_and_a_missing_mask_index_is_a_clear_error(comfy_host, setup):
    plain = run_latent(comfy_host, base(setup))
    for index, ok in ((0, True), (1, False)):
        g = base(setup)
        mask = g.add("SolidMask", {"value": 1.0, "width": 32, "height": 64})
        node = g.add("FaceStudioPerson", {"identity": identity(g, "fs_apply_a.png", "a"), "weight": 1.0, "start": 0.0,
                                          "end": 1.0, "mask": [mask, 0], "mask_index": index})
        apply(g, [node, 0])
        if ok:
            assert not torch.equal(run_latent(comfy_host, g), plain)
        else:
            result = comfy_host.run(g.prompt)
            assert not result.success and result.error_node == node
            assert "mask_index 1 is out of range" in result.error


@pytest.mark.smoke
def test_alpha_zero_with_a_style_equals_no_style(comfy_host, setup):
    def latent(**style):
        g = base(setup, seed=3)
        apply(g, person(g, identity(g, "fs_apply_a.png", "a")), **style)
        return run_latent(comfy_host, g)

    without = latent()
    torch.testing.assert_close(latent(style=True, alpha=0.0), without, atol=1e-6, rtol=0)
    assert (latent(style=True, alpha=0.5) - without).abs().max() > 1e-3


def test_without_a_style_alpha_changes_nothing(comfy_host, setup):
    """alpha balances text against the style image; with no style it must not weaken the prompt."""
    def latent(**settings):
        g = base(setup, seed=4)
        apply(g, person(g, identity(g, "fs_apply_a.png", "a")), **settings)
        return run_latent(comfy_host, g)

    half = latent(alpha=0.5)
    assert torch.equal(latent(alpha=0.9), half)
    assert torch.equal(latent(alpha=1.0), half)
    # A style at weight 0 acts nowhere: alpha leaves the text alone there too (rounding aside, the
    # zero-weighted style tokens join the same products).
    torch.testing.assert_close(latent(alpha=0.9, style=True, style_weight=0.0), half, atol=1e-6, rtol=0)


def test_changing_only_apply_settings_and_requeuing_equals_a_fresh_run(comfy_host, setup):
    g = base(setup, seed=5)
    node = apply(g, person(g, identity(g, "fs_apply_a.png", "a")), style=True)
    run_latent(comfy_host, g)  # leaves the executor's cache warm with the first settings
    changed = {}
    for settings in ({"alpha": 0.8}, {"style_weight": 0.4}):
        g.prompt[node]["inputs"].update(settings)
        changed[str(settings)] = run_latent(comfy_host, g)
    comfy_host.executor.reset()
    fresh = run_latent(comfy_host, g)
    assert torch.equal(changed[str({"style_weight": 0.4})], fresh)
    g.prompt[node]["inputs"].update(style_weight=1.0)
    comfy_host.executor.reset()
    assert torch.equal(changed[str({"alpha": 0.8})], run_latent(comfy_host, g))


# ---- apply_facestudio on a loaded model ----


def test_token_kv_live_in_one_store_the_host_manages(booted, loaded):
    import comfy.model_management
    import comfy.sample

    patch = booted.pack_module("attention.patch")
    model, adapter, (a, b) = loaded
    one = patch.apply_facestudio(model, adapter, patch.add_person(None, a))
    (holder,) = one.get_additional_models_with_key(patch.STORE_KEY)
    store = holder.model
    assert isinstance(store, patch.TokenStore)
    assert holder.model_size() == sum(t.numel() * t.element_size() for t in store.parameters()) > 0
    assert all(not t.requires_grad and t.dtype == torch.float32 for t in store.parameters())
    assert model.get_additional_models_with_key(patch.STORE_KEY) == []  # the input MODEL is untouched
    assert "patches_replace" not in model.model_options["transformer_options"]

    # Every replacement reads its K/V from the store's own tensors (no private copies).
    for n, layer in enumerate(replacements(one).values()):
        cond, uncond = layer.token_groups(layer.store.groups(layer.index)[0].heads)
        assert layer.store is store and cond.keys.data_ptr() == store.groups(n)[0].keys.data_ptr()

    # A chained Apply replaces the store with one merged store; the first MODEL keeps its own.
    two = patch.apply_facestudio(one, adapter, patch.add_person(None, b, weight=0.5))
    (merged,) = two.get_additional_models_with_key(patch.STORE_KEY)
    assert merged.model is not store and one.get_additional_models_with_key(patch.STORE_KEY)[0].model is store
    assert all(len(layer.persons) == 2 for layer in replacements(two).values())
    assert merged.model_size() > holder.model_size()

    # The sampler loads it through model management along with the UNet.
    latent = torch.zeros(1, 4, 8, 8)
    positive = [[torch.zeros(1, 77, 768), {}]]
    comfy.sample.sample(two, torch.randn(1, 4, 8, 8), 1, 5.0, "euler", "normal", positive, positive, latent,
                        disable_pbar=True)
    assert any(lm.model.model is merged.model for lm in comfy.model_management.current_loaded_models)


def test_negative_style_replaces_the_style_uncond(booted, loaded, tmp_path):
    patch, proj = booted.pack_module("attention.patch"), booted.pack_module("attention.projection")
    encode = booted.pack_module("encoders.style").encode_style
    model, adapter, (a, _) = loaded
    clip = clip_models.tiny_clip_vision(tmp_path)
    style_path = af.write_adapter(tmp_path / "ip-adapter_sd15.safetensors", af.adapter_state_dict(
        "image-prompt", af.SD15, image_embeds=clip_models.TINY_CLIP_CONFIG["projection_dim"]))
    style_adapter = booted.pack_module("attention.adapters").load_adapter(str(style_path))
    style = encode(clip, torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1)))
    negative = encode(clip, torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2)))
    persons = patch.add_person(None, a)
    module = proj.projection_for(style_adapter)
    for neg, expected in ((None, proj.unconditional_style_tokens(style_adapter, None, module)),
                          (negative, proj.style_tokens(style_adapter, negative.image_embeds, module))):
        patched = patch.apply_facestudio(model, adapter, persons, alpha=0.5, style_adapter=style_adapter, style=style,
                                         style_weight=0.7, negative_style=neg)
        kv = proj.layer_kv(style_adapter, expected)
        for n, layer in enumerate(replacements(patched).values()):
            torch.testing.assert_close(layer.layers()[1].uncond[0], kv[n][0])  # read back from the store
            assert layer.style.scale == 0.7
    with pytest.raises(ValueError, match="'negative_style' only acts on a style"):
        patch.apply_facestudio(model, adapter, persons, negative_style=negative)


class IPAdapterStandIn:
    """What cubiq's ComfyUI_IPAdapter_plus installs on attn2 (its Attn2Replace): a callable holding a
    list of attention callbacks that later IPAdapter nodes extend with .add()."""

    def __init__(self, callback):
        self.callbacks = [callback]

    def add(self, callback, **kwargs):
        self.callbacks.append(callback)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        out = optimized_attention(q, k, v, extra_options["n_heads"])
        for callback in self.callbacks:
            out = out + callback(q)
        return out


def ipadapter_node(model, callback, keys):
    """Its set_model_patch_replace at each key: .add() on a replacement already there, else a new one."""
    clone = model.clone()
    to = clone.model_options["transformer_options"].copy()
    attn2 = to.setdefault("patches_replace", {}).setdefault("attn2", {})
    for key in keys:
        if key in attn2:
            attn2[key].add(callback, weight=1.0)
        else:
            attn2[key] = IPAdapterStandIn(callback)
    clone.model_options["transformer_options"] = to
    return clone


def test_ipadapter_first_then_facestudio_is_wrapped_and_the_reverse_is_a_clear_error(booted, loaded):
    patch = booted.pack_module("attention.patch")
    model, adapter, (a, _) = loaded
    keys = [p.patch_key for p in booted.pack_module("attention.layers").cross_attention_positions(model)]
    with_ipadapter = ipadapter_node(model, lambda q: torch.full_like(q, 0.5), keys)
    ours = patch.apply_facestudio(with_ipadapter, adapter, patch.add_person(None, a))
    for layer in replacements(ours).values():
        assert isinstance(layer.wrapped, IPAdapterStandIn)
    latent = torch.zeros(1, 4, 8, 8)
    positive = [[torch.zeros(1, 77, 768), {}]]
    import comfy.sample

    comfy.sample.sample(ours, torch.randn(1, 4, 8, 8), 1, 5.0, "euler", "normal", positive, positive, latent,
                        disable_pbar=True)
    with pytest.raises(patch.PatchOrderError, match="Connect the IPAdapter nodes first and FaceStudio Apply after"):
        ipadapter_node(patch.apply_facestudio(model, adapter, patch.add_person(None, a)), lambda q: q, keys)


def test_a_person_out_of_its_steps_does_not_share_the_region(booted):
    """Overlap normalisation counts only persons acting at this sigma: B asleep leaves A at full weight."""
    patch_mod = booted.pack_module("attention.patch")
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 16, 8, generator=gen) for _ in range(3))
    a, b = ((torch.randn(1, 4, 8, generator=gen), torch.randn(1, 4, 8, generator=gen)) for _ in range(2))
    extra = {"n_heads": 2, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([3.0]), "original_shape": [2, 4, 4, 4]}
    both = patch_mod.FaceStudioAttention([patch_mod.PersonLayer(a, a, 1.0, 10.0, 0.0, None),
                                          patch_mod.PersonLayer(b, b, 1.0, 2.0, 0.0, None)], None, 0.5)
    alone = patch_mod.FaceStudioAttention([patch_mod.PersonLayer(a, a, 1.0, 10.0, 0.0, None)], None, 0.5)
    torch.testing.assert_close(both(q, k, v, extra), alone(q, k, v, extra), atol=1e-6, rtol=0)


def test_token_kv_are_made_once_per_apply_never_while_sampling(booted, loaded, monkeypatch):
    import comfy.sample

    patch, replacement = booted.pack_module("attention.patch"), booted.pack_module("attention.replacement")
    calls = {"layer_kvs": 0, "layer_token_groups": 0}
    # Counted wherever they are called from: Apply (patch.py) and the replacement's fallback layout.
    for module, name in ((patch, "layer_kvs"), (patch, "layer_token_groups"), (replacement, "layer_token_groups")):
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    model, adapter, (a, b) = loaded
    patched = patch.apply_facestudio(model, adapter, patch.add_person(patch.add_person(None, a), b))
    layers = len(replacements(patched))
    assert calls == {"layer_kvs": 1, "layer_token_groups": layers}  # every person's tokens at once; one layout per layer
    positive = [[torch.zeros(1, 77, 768), {}]]
    comfy.sample.sample(patched, torch.randn(1, 4, 8, 8), 3, 5.0, "euler", "normal", positive, positive,
                        torch.zeros(1, 4, 8, 8), disable_pbar=True)
    assert calls == {"layer_kvs": 1, "layer_token_groups": layers}  # sampling only reads the store


def test_sigmas_are_never_read_back_from_the_device(booted):
    """A GPU sampler's sigmas stay on the GPU: reading them back at every layer would stall it. A 'meta'
    tensor stands for one here: copying it to the CPU raises."""
    patch_mod = booted.pack_module("attention.patch")
    kv = (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8))
    sigmas = torch.empty(2, device="meta")
    every_step = patch_mod.FaceStudioAttention([patch_mod.PersonLayer(kv, kv, 1.0, 999999999.9, 0.0, None)], None, 0.5)
    assert every_step._activity(sigmas, 2) is None
    windowed = patch_mod.FaceStudioAttention([patch_mod.PersonLayer(kv, kv, 1.0, 5.0, 1.0, None)], None, 0.5,
                                             unfold_batch=True)
    activity = windowed._activity(sigmas, 2)
    assert activity.device.type == "meta" and activity.shape == (2, 1, 1)
