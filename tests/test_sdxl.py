"""FaceStudio Apply on SDXL: a small SDXL-architecture UNet the host detects as SDXL (70 cross-attention
positions), the SDXL FaceID kinds and the ViT-H / ViT-bigG image-prompt adapters, in-process and
through the real executor (UNETLoader -> FaceStudio Apply -> KSampler). See facestudio_testing/tiny_sdxl.py."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from facestudio_testing import adapter_files as af
from facestudio_testing import face_models as fm
from facestudio_testing import graphs
from facestudio_testing import tiny_sdxl
from facestudio_testing.meta_models import diffusers_unet
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

IDENTITY_KINDS = ("faceid", "faceid-plus-v2", "faceid-portrait", "faceid-portrait-unnorm")


# ---- fixtures ----


@pytest.fixture(scope="module")
def model(booted):
    """The tiny SDXL UNet as the host's UNETLoader loads it."""
    return tiny_sdxl.load_unet()


@pytest.fixture(scope="module")
def adapters(booted):
    return booted.pack_module("attention.adapters")


@pytest.fixture(scope="module")
def patch(booted):
    return booted.pack_module("attention.patch")


@pytest.fixture(scope="module")
def projection(booted):
    return booted.pack_module("attention.projection")


@pytest.fixture(scope="module")
def clips(booted, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_clip")
    return {"vit-h": tiny_sdxl.clip_vision(folder, tiny_sdxl.VIT_H_WIDTHS, seed=1),
            "vit-bigg": tiny_sdxl.clip_vision(folder, tiny_sdxl.VIT_BIGG_WIDTHS, seed=2)}


@pytest.fixture(scope="module")
def people(booted, clips):
    """Two identities from the tiny face pack, with ViT-H-wide CLIP features of their face crops."""
    faces, ident = booted.pack_module("encoders.faces"), identity_modules(booted)
    analyzer = faces.load_face_analyzer(fm.tiny_pack(), providers="cpu")
    return [ident.multishot.encode_identity(analyzer, [fm.tiny_face_image(cells).astype(np.float32) / 255.0], cache=None,
                                  clip_vision=clips["vit-h"])
            for cells in (((6, 6, "white"),), ((8, 5, "green"),))]


def sdxl_adapter(adapters, kind: str, **sizes):
    """An SDXL adapter for the tiny UNet, recognised under its release file name (which tells v2/unnorm)."""
    nested = tiny_sdxl.adapter_state_dict(kind, **sizes)
    return adapters.recognise(nested["image_proj"], nested["ip_adapter"], af.release_file_name(kind, af.SDXL,
                                                                                                ".safetensors"))


def sample(model, seed: int = 0, steps: int = 1) -> torch.Tensor:
    """The latent after `steps` Euler steps with CFG 5 (one step: one UNet call on cond + uncond rows)."""
    import comfy.sample

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", tiny_sdxl.conditioning(1),
                               tiny_sdxl.conditioning(2), torch.zeros(1, 4, 8, 8), disable_pbar=True, seed=seed)


@pytest.fixture(scope="module")
def plain(model):
    return sample(model)


# The random UNet's latents reach several hundred after a CFG step, so differences are judged
# relative to their scale: "changed" is far above rounding, "nearly equal" is rounding only.
def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 0.01 * b.abs().max())


def assert_nearly_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def replacements(patched) -> dict:
    return patched.model_options["transformer_options"]["patches_replace"]["attn2"]


# ---- the tiny SDXL UNet ----


def test_the_host_detects_the_tiny_unet_as_sdxl(model):
    import comfy.model_base
    import comfy.supported_models

    assert type(model.model) is comfy.model_base.SDXL
    assert type(model.model.model_config) is comfy.supported_models.SDXL
    config = model.model.model_config.unet_config
    assert (config["context_dim"], config["adm_in_channels"], config["channel_mult"]) == (2048, 2816, [1, 1, 1])
    unet = model.model.diffusion_model
    assert 260e6 < sum(p.numel() for p in unet.parameters()) < 300e6
    norms = [m for m in unet.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


@torch.no_grad()
def test_the_unet_output_depends_on_its_input_context_and_pooled_output(model):
    base = model.model
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    (context, extra), = tiny_sdxl.conditioning(4)
    t = torch.tensor([5.0])

    def out(x=x, context=context, pooled=extra["pooled_output"]):
        y = base.encode_adm(pooled_output=pooled, width=64, height=64)
        return base.apply_model(x, t, c_crossattn=context, y=y)

    reference = out()
    assert torch.isfinite(reference).all() and reference.std() > 0
    assert not torch.equal(reference[..., :4, :], reference[..., 4:, :])  # varies over the image
    assert changed(out(x=x + 0.5), reference)
    assert changed(out(context=tiny_sdxl.conditioning(5)[0][0]), reference)  # cross-attention matters
    assert changed(out(pooled=-extra["pooled_output"]), reference)  # so does the ADM input


def test_the_tiny_sdxl_checkpoint_loads_whole_as_sdxl(booted, caplog):
    """The checkpoint the bundled SDXL workflows run on (CheckpointLoaderSimple's loader): detected as
    SDXL, no text-encoder key missing (the host would leave those layers uninitialised), and both text
    encoders give finite conditioning that depends on the text."""
    import logging

    import comfy.model_base
    import comfy.sd

    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sdxl.checkpoint_file()))
    assert type(model.model) is comfy.model_base.SDXL
    assert clip is not None and vae is not None
    assert not [r.message for r in caplog.records if r.message.startswith(("clip missing", "no CLIP"))]
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight.float().cpu(),
                       tiny_sdxl.unet_state_dict()["input_blocks.0.0.weight"].float())
    encoded = {}
    for text in ("a photo of a person", "a painting of a cat"):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        assert cond.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
        assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
        encoded[text] = cond
    assert changed(encoded["a photo of a person"], encoded["a painting of a cat"])


# ---- positions ----

# SDXL's cross-attention in diffusers' attn_processors order: down (input 4, 5: 2 deep; 7, 8: 10 deep),
# up (output 0-2: 10 deep; 3-5: 2 deep), then the 10-deep middle block.
EXPECTED_KEYS = ([("input", b, t) for b, d in ((4, 2), (5, 2), (7, 10), (8, 10)) for t in range(d)]
                 + [("output", b, t) for b, d in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)) for t in range(d)]
                 + [("middle", 0, t) for t in range(10)])


def test_70_positions_in_diffusers_order_with_their_patch_keys(booted, model):
    import comfy.utils

    layers = booted.pack_module("attention.layers")
    positions = layers.cross_attention_positions(model)
    assert [p.patch_key for p in positions] == EXPECTED_KEYS and len(positions) == 70
    assert {(p.inner_width, p.context_width, p.heads) for p in positions} == {(320, 2048, 5)}

    reference = diffusers_unet("sdxl", block_out_channels=(320, 320, 320), attention_head_dim=(5, 5, 5))
    attn2 = [n[: -len(".processor")] for n in reference.attn_processors if n.endswith("attn2.processor")]
    to_comfy = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    assert [p.module_path for p in positions] == [to_comfy[f"{n}.to_k.weight"][: -len(".to_k.weight")]
                                                  for n in attn2]


def test_every_patch_key_is_called_by_the_host_sampler(booted, model):
    """attn2 replacements at the 70 keys on the loaded model: the sampler calls each one, equally often."""
    from comfy.ldm.modules import attention

    layers = booted.pack_module("attention.layers")
    calls = collections.Counter()

    def record(key):
        def replacement(q, k, v, extra_options):
            calls[key] += 1
            return attention.optimized_attention(q, k, v, extra_options["n_heads"])
        return replacement

    patched = model.clone()
    for p in layers.cross_attention_positions(model):
        patched.set_model_attn2_replace(record(p.patch_key), *p.patch_key)
    sample(patched)
    assert sorted(calls) == sorted(EXPECTED_KEYS)
    assert len(set(calls.values())) == 1


# ---- identity kinds ----


@pytest.mark.parametrize("kind", IDENTITY_KINDS)
def test_each_sdxl_kind_changes_the_output_and_weight_zero_is_bit_identical(adapters, patch, model, people,
                                                                             plain, kind):
    adapter = sdxl_adapter(adapters, kind)
    assert (adapter.kind.value, adapter.base_model, adapter.layer_count) == (kind, "SDXL", 70)
    latents = {}
    for weight in (0.0, 1.0):
        latents[weight] = sample(patch.apply_facestudio(model, adapter, patch.add_person(None, people[0],
                                                                                         weight=weight)))
    assert torch.equal(latents[0.0], plain)
    assert torch.isfinite(latents[1.0]).all()
    assert changed(latents[1.0], plain)
    assert "patches_replace" not in model.model_options["transformer_options"]  # the input MODEL is untouched


def test_two_persons_in_two_regions_on_sdxl(adapters, patch, model, people, plain):
    adapter = sdxl_adapter(adapters, "faceid")
    left = torch.zeros(1, 64, 64)
    left[..., :32] = 1.0
    persons = patch.add_person(None, people[0], left)
    persons = patch.add_person(persons, people[1], 1.0 - left)
    both = sample(patch.apply_facestudio(model, adapter, persons))
    swapped = sample(patch.apply_facestudio(model, adapter, patch.add_person(
        patch.add_person(None, people[1], left), people[0], 1.0 - left)))
    assert changed(both, plain)
    assert changed(both, swapped)  # who goes where matters


def test_portrait_unnorm_projects_the_raw_embeddings(adapters, patch, projection, model, people, plain):
    person = people[0]
    raw, normed = (torch.from_numpy(np.array(e, np.float32)) for e in (person.embeddings, person.normed_embeddings))
    assert (raw.norm(dim=-1) - 1).abs().max() > 0.1  # the tiny recognizer's raw output is not unit length
    latents = {}
    for kind, expected_input in (("faceid-portrait-unnorm", raw), ("faceid-portrait", normed)):
        adapter = sdxl_adapter(adapters, kind)
        patched = patch.apply_facestudio(model, adapter, patch.add_person(None, person))
        expected = projection.layer_kv(adapter, projection.identity_tokens(adapter, expected_input))
        for n, layer in enumerate(replacements(patched).values()):
            cond = layer.layers()[0][0].cond  # read back from the token store
            torch.testing.assert_close(cond[0], expected[n][0])
            torch.testing.assert_close(cond[1], expected[n][1])
        latents[kind] = sample(patched)
    # A Resampler over the raw embeddings vs the Portrait MLP over unit ones, and it shows.
    assert changed(latents["faceid-portrait-unnorm"], latents["faceid-portrait"])


def test_sdxl_plus_v2_uses_its_full_width_shortcut(adapters, projection, people):
    """SDXL v2 adds the 2048-wide ID tokens to the resampler's output (the generator's default 256-wide
    SDXL resampler cannot: see test_projection); the scale weights the resampler's part."""
    v2 = sdxl_adapter(adapters, "faceid-plus-v2")
    v1 = sdxl_adapter(adapters, "faceid-plus")  # same tensors, the name without "v2"
    assert (v2.kind.value, v1.kind.value) == ("faceid-plus-v2", "faceid-plus")
    emb = torch.from_numpy(np.array(people[0].embedding, np.float32))[None]
    clip = torch.from_numpy(np.array(people[0].combined_clip_features, np.float32))[None]
    module = projection.projection_for(v2)
    ids = module.id_tokens(emb)
    plus = projection.identity_tokens(v1, emb, clip)
    assert ids.shape == plus.shape == (1, 4, 2048)
    for scale in (1.0, 0.5):
        torch.testing.assert_close(projection.identity_tokens(v2, emb, clip, shortcut_scale=scale), ids + scale * plus)


# ---- style (image-prompt) adapters: ViT-H and ViT-bigG ----

STYLES = {  # name: (kind, CLIP vision model, generator sizes)
    "ip-adapter_sdxl (ViT-bigG)": ("image-prompt", "vit-bigg", {}),
    "ip-adapter_sdxl_vit-h": ("image-prompt", "vit-h", {"image_embeds": 1024}),
    # The release's 1280-wide resampler, with one block and ff x1 (about 70M parameters less; no loader reads them).
    "ip-adapter-plus_sdxl_vit-h": ("image-prompt-plus", "vit-h", {"resampler_depth": 1, "ff_mult": 1}),
}


@pytest.mark.parametrize("name", list(STYLES))
def test_sdxl_style_adapters_apply_with_their_clip_vision(booted, adapters, patch, model, people, clips, name):
    kind, clip_name, sizes = STYLES[name]
    encode = booted.pack_module("encoders.style").encode_style
    identity = sdxl_adapter(adapters, "faceid")
    style_adapter = sdxl_adapter(adapters, kind, **sizes)
    assert style_adapter.base_model == "SDXL" and style_adapter.is_style
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    style = encode(clips[clip_name], image)
    persons = patch.add_person(None, people[0])
    without = sample(patch.apply_facestudio(model, identity, persons))  # the identity alone
    with_style = sample(patch.apply_facestudio(model, identity, persons, alpha=0.5, style_adapter=style_adapter,
                                                style=style))
    assert torch.isfinite(with_style).all() and changed(with_style, without)
    # alpha 0: no style, full text (equal up to rounding: the style's tokens join the same products)
    assert_nearly_equal(sample(patch.apply_facestudio(model, identity, persons, alpha=0.0, style_adapter=style_adapter,
                                                         style=style)), without)

    other = encode(clips["vit-h" if clip_name == "vit-bigg" else "vit-bigg"], image)
    with pytest.raises(adapters.AdapterError, match="encode it with the CLIP vision model the adapter was trained with"):
        patch.apply_facestudio(model, identity, persons, alpha=0.5, style_adapter=style_adapter, style=other)


@pytest.mark.parametrize("image_embeds", [1024, 1280])
def test_sdxl_image_prompt_matches_diffusers(adapters, projection, image_embeds):
    proj = tiny_sdxl.image_projection("image-prompt", image_embeds=image_embeds)
    adapter = adapters.recognise(proj, tiny_sdxl.shared_layers(), "ip-adapter_sdxl.safetensors")
    unet = diffusers_unet("sdxl", block_out_channels=(10, 20, 40), norm_num_groups=2)
    reference = type(unet)._convert_ip_adapter_image_proj_to_diffusers(unet, proj, low_cpu_mem_usage=False)
    embeds = torch.randn(1, image_embeds, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference.float().eval()(embeds)
    ours = projection.style_tokens(adapter, embeds)
    assert ours.shape == (1, 4, 2048)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


# ---- the wrong base ----


def test_an_sd15_adapter_on_sdxl_is_a_clear_error(booted, adapters, patch, model, people, clips):
    nested = af.shared_state_dict("faceid", af.SD15)
    sd15 = adapters.recognise(nested["image_proj"], nested["ip_adapter"], "ip-adapter-faceid_sd15.safetensors")
    expected = ("ip-adapter-faceid_sd15.safetensors is an SD1.5 adapter (context width 768) and cannot be used on an "
                "SDXL model (context width 2048 at input_blocks.4.1.transformer_blocks.0.attn2): load the adapter "
                "made for this model's base.")
    persons = patch.add_person(None, people[0])
    with pytest.raises(adapters.AdapterError) as e:
        patch.apply_facestudio(model, sd15, persons)
    assert str(e.value) == expected

    # As the style adapter, next to a fitting SDXL identity adapter.
    nested = af.shared_state_dict("image-prompt", af.SD15)
    style = adapters.recognise(nested["image_proj"], nested["ip_adapter"], "ip-adapter_sd15.safetensors")
    encoded = booted.pack_module("encoders.style").encode_style(clips["vit-h"], torch.rand(1, 32, 32, 3))
    with pytest.raises(adapters.AdapterError, match=r"ip-adapter_sd15.safetensors is an SD1.5 adapter .* cannot be "
                                                    r"used on an SDXL model \(context width 2048"):
        patch.apply_facestudio(model, sdxl_adapter(adapters, "faceid"), persons, alpha=0.5, style_adapter=style,
                               style=encoded)


def test_an_sdxl_adapter_on_sd15_is_a_clear_error(adapters, patch, people, tiny_sd15_file):
    import comfy.sd

    sd15_model = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_vae=False, output_clip=False)[0]
    adapter = sdxl_adapter(adapters, "faceid")
    with pytest.raises(adapters.AdapterError) as e:
        patch.apply_facestudio(sd15_model, adapter, patch.add_person(None, people[0]))
    assert str(e.value) == (
        "ip-adapter-faceid_sdxl.safetensors is an SDXL adapter (context width 2048) and cannot be used on an SD1.5 "
        "model (context width 768 at input_blocks.1.1.transformer_blocks.0.attn2): load the adapter made for this "
        "model's base.")


# ---- through the executor ----

ADAPTER_FILE = "fs_sdxl_" + af.release_file_name("faceid", af.SDXL, ".safetensors")
SD15_ADAPTER_FILE = "fs_sdxl_test_" + af.release_file_name("faceid", af.SD15, ".safetensors")


@pytest.fixture(scope="module")
def executor_setup(comfy_host, booted):
    import folder_paths

    unet = tiny_sdxl.install_unet(booted.models)
    folder = booted.models / "insightface" / "models"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / fm.TINY_PACK
    if not link.exists():
        link.symlink_to(fm.tiny_pack(), target_is_directory=True)
    (booted.base / "input").mkdir(exist_ok=True)
    Image.fromarray(fm.tiny_face_image()).save(booted.base / "input" / "fs_sdxl_face.png")
    written = [af.write_adapter(booted.models / "ipadapter" / ADAPTER_FILE, tiny_sdxl.adapter_state_dict("faceid")),
               af.write_adapter(booted.models / "ipadapter" / SD15_ADAPTER_FILE, af.shared_state_dict("faceid", af.SD15))]
    folder_paths.filename_list_cache.pop("ipadapter", None)
    with tiny_sdxl.registered_conditioning_node() as conditioning_node:
        yield unet, conditioning_node
    for path in written:
        path.unlink()
    folder_paths.filename_list_cache.pop("ipadapter", None)


def sdxl_graph(unet: str, conditioning_node: str) -> graphs.Graph:
    """UNETLoader + seeded SDXL conditioning -> KSampler -> SaveLatent."""
    g = graphs.Graph()
    g.add("UNETLoader", {"unet_name": unet, "weight_dtype": "default"}, "checkpoint")
    g.add(conditioning_node, {"seed": 1}, "positive")
    g.add(conditioning_node, {"seed": 2}, "negative")
    g.add("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}, "latent")
    g.add("KSampler", {"model": g.link("checkpoint"), "positive": g.link("positive"), "negative": g.link("negative"),
                       "latent_image": g.link("latent"), "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                       "scheduler": "normal", "denoise": 1.0}, "sampler")
    g.add("SaveLatent", {"samples": g.link("sampler"), "filename_prefix": "facestudio_sdxl_test"}, "save")
    return g


def with_apply(g: graphs.Graph, weight: float, adapter: str = ADAPTER_FILE) -> tuple[str, str]:
    """Face -> identity -> person -> FaceStudio Apply (its adapter loader checking the MODEL) before the
    sampler; returns the ids of the adapter loader and the Apply node."""
    analyzer = g.add("FaceStudioFaceAnalyzerLoader", {"pack": fm.TINY_PACK, "provider": "CPU", "det_size": 640})
    photo = g.add("LoadImage", {"image": "fs_sdxl_face.png"})
    identity = g.add("FaceStudioIdentityEncode", {"face_analyzer": [analyzer, 0], "image": [photo, 0],
                                                  "face": "largest", "index": 0, "on_missing": "error",
                                                  "outlier_threshold": 0.4})
    person = g.add("FaceStudioPerson", {"identity": [identity, 0], "weight": weight, "start": 0.0, "end": 1.0,
                                        "mask_index": 0})
    loader = g.add("FaceStudioAdapterLoader", {"adapter_name": adapter, "kind": "auto", "model": g.model})
    return loader, g.insert_model_node("FaceStudioApply", {"adapter": [loader, 0], "persons": [person, 0],
                                                           "alpha": 0.5, "style_weight": 1.0})


def test_unet_loader_to_apply_to_ksampler_in_the_executor(comfy_host, executor_setup):
    def run(g):
        result = comfy_host.run(g.prompt)
        assert result.success, result.error
        return comfy_host.output(result, g["sampler"])["samples"]

    plain = run(sdxl_graph(*executor_setup))
    latents = {}
    for weight in (0.0, 1.0):
        g = sdxl_graph(*executor_setup)
        with_apply(g, weight)
        latents[weight] = run(g)
    assert plain.shape == (1, 4, 8, 8)
    assert torch.equal(latents[0.0], plain)
    assert changed(latents[1.0], plain)


def test_an_sd15_adapter_file_on_the_sdxl_unet_fails_at_its_loader(comfy_host, executor_setup):
    g = sdxl_graph(*executor_setup)
    loader, _ = with_apply(g, 1.0, adapter=SD15_ADAPTER_FILE)
    result = comfy_host.run(g.prompt)
    assert not result.success and result.error_node == loader
    assert (f"{SD15_ADAPTER_FILE} is an SD1.5 adapter (context width 768) and cannot be used on an SDXL model "
            "(context width 2048") in result.error
