"""attention/adapters.py: reading and recognising IP-Adapter files, and refusing everything else."""
from __future__ import annotations

import os
import shutil

import pytest
import safetensors.torch
import torch

from facestudio_testing import adapter_files as af
from facestudio_testing import reference_projection
from facestudio_testing.meta_models import diffusers_unet

SUFFIXES = (".bin", ".safetensors")
# Kinds whose image projection goes through a distinct diffusers class (the others share tensors).
PROJECTION_KINDS = ("faceid", "faceid-plus", "faceid-portrait", "faceid-portrait-unnorm", "image-prompt",
                    "image-prompt-plus")


@pytest.fixture(scope="module")
def adapters(booted):
    return booted.pack_module("attention.adapters")


@pytest.fixture
def files(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # adapter files are tens of MB each; pytest keeps tmp dirs


def write_release(directory, kind, base, suffix):
    return af.write_adapter(directory / af.release_file_name(kind, base, suffix), af.shared_state_dict(kind, base))


def load_sections(adapters, path):
    """The file's two sections as the pack reads them from disk."""
    return adapters.split_sections(adapters.read_state_dict(str(path)), path.name)


# --- every kind, base and layout --------------------------------------------------------------------

@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("base", af.BASES)
@pytest.mark.parametrize("kind", af.KINDS)
def test_recognises_every_kind_base_and_layout(adapters, files, kind, base, suffix):
    path = write_release(files, kind, base, suffix)
    w = adapters.load_adapter(str(path))
    nested = af.shared_state_dict(kind, base)
    identity = kind.startswith("faceid")

    assert w.kind is adapters.AdapterKind(kind)
    assert (w.base_model, w.context_dim) == (base, af.CONTEXT[base])
    assert w.num_tokens == af.TOKENS[kind]
    assert w.id_embedding_width == (af.ARCFACE_WIDTH if identity else None)
    expected_clip = {"image-prompt": af.IMAGE_EMBEDS[base], "image-prompt-plus": af.VIT_H_HIDDEN,
                     "faceid-plus": af.VIT_H_HIDDEN, "faceid-plus-v2": af.VIT_H_HIDDEN}.get(kind)
    assert w.clip_width == expected_clip
    assert (w.is_identity, w.is_style) == (identity, not identity)
    assert w.layer_count == {af.SD15: 16, af.SDXL: 70}[base]
    assert w.inner_widths == af.DEFAULT_LAYER_WIDTHS[base]
    # The LoRA keys of every attention processor (attn1 and attn2), 8 each, are noted, not refused.
    assert w.lora_key_count == (8 * 2 * w.layer_count if kind in af.LORA_KINDS else 0)
    assert w.source == path.name
    # Layers come in key order 1, 3, 5, ...
    for n in (0, w.layer_count // 2, w.layer_count - 1):
        assert torch.equal(w.layers[n][0], nested["ip_adapter"][f"{2 * n + 1}.to_k_ip.weight"])
        assert torch.equal(w.layers[n][1], nested["ip_adapter"][f"{2 * n + 1}.to_v_ip.weight"])
    assert set(w.image_proj) == set(nested["image_proj"])
    with pytest.raises(TypeError):
        w.image_proj["norm.weight"] = torch.zeros(1)  # read-only: nodes downstream share it


def test_flat_keys_in_a_bin_are_read_too(adapters, files):
    path = af.write_adapter(files / "flat-faceid.bin", af.shared_state_dict("faceid", af.SD15), flat=True)
    w = adapters.load_adapter(str(path))
    assert (w.kind, w.layer_count) == (adapters.AdapterKind.FACEID, 16)


def test_describe_names_the_essentials(adapters, files):
    w = adapters.load_adapter(str(write_release(files, "faceid-plus-v2", af.SD15, ".safetensors")))
    text = w.describe()
    assert "FaceID Plus v2" in text and "SD1.5" in text and "16 layers" in text and "CLIP width 1280" in text


# --- the same files through diffusers' own converters --------------------------------------------

@pytest.fixture(scope="module")
def diffusers_unets():
    """diffusers UNets on the meta device: the tiny SD1.5 structure, and SDXL's at the generator's reduced width."""
    d = af.SDXL_WIDTH_DIVISOR
    return {af.SD15: diffusers_unet("tiny-sd15"),
            af.SDXL: diffusers_unet("sdxl", block_out_channels=(320 // d, 640 // d, 1280 // d), norm_num_groups=2)}


@pytest.mark.parametrize("base", af.BASES)
@pytest.mark.parametrize("kind", PROJECTION_KINDS)
def test_image_projection_loads_strictly_into_diffusers(adapters, files, diffusers_unets, kind, base):
    from diffusers.models import embeddings

    path = write_release(files, kind, base, ".safetensors")
    image_proj, _ = load_sections(adapters, path)
    unet = diffusers_unets[base]
    # The converter picks the class from the keys and load_state_dict(strict=True)s the renamed tensors.
    module = type(unet)._convert_ip_adapter_image_proj_to_diffusers(unet, image_proj, low_cpu_mem_usage=False)
    expected = {"faceid": embeddings.IPAdapterFaceIDImageProjection,
                "faceid-portrait": embeddings.IPAdapterFaceIDImageProjection,
                "faceid-plus": embeddings.IPAdapterFaceIDPlusImageProjection,
                # diffusers reads unnorm as what it is, a Plus resampler (over 512-wide inputs)
                "faceid-portrait-unnorm": embeddings.IPAdapterPlusImageProjection,
                "image-prompt": embeddings.ImageProjection,
                "image-prompt-plus": embeddings.IPAdapterPlusImageProjection}[kind]
    assert type(module) is expected
    w = adapters.load_adapter(str(path))
    ctx = af.CONTEXT[base]
    if kind in ("faceid", "faceid-portrait"):
        assert (module.num_tokens, module.cross_attention_dim) == (w.num_tokens, ctx)
    elif kind == "faceid-plus":
        assert module.proj_out.out_features == ctx and module.proj_in.in_features == w.clip_width
    elif kind == "image-prompt":
        assert module.image_embeds.in_features == w.clip_width and module.norm.normalized_shape == (ctx,)
    elif kind == "faceid-portrait-unnorm":
        assert module.latents.shape[1] == w.num_tokens and module.proj_in.in_features == w.id_embedding_width
        assert w.clip_width is None and module.norm_out.normalized_shape == (ctx,)
    else:
        assert module.latents.shape[1] == w.num_tokens and module.proj_in.in_features == w.clip_width
        assert module.norm_out.normalized_shape == (ctx,)


# Every kind writes its layers with the same code: FaceID (with LoRA) and Plus (16 tokens) cover it, and SDXL
# once (diffusers walks the whole UNet per processor there, which takes seconds).
@pytest.mark.parametrize("kind, base", [("faceid", af.SD15), ("image-prompt-plus", af.SD15), ("faceid", af.SDXL)])
def test_attention_layers_load_into_diffusers_processors(adapters, files, diffusers_unets, kind, base):
    path = write_release(files, kind, base, ".bin")
    image_proj, ip_adapter = load_sections(adapters, path)
    unet = diffusers_unets[base]
    procs = unet._convert_ip_adapter_attn_to_diffusers([{"image_proj": image_proj, "ip_adapter": ip_adapter}],
                                                        low_cpu_mem_usage=False)
    ip_names = [name for name, p in procs.items() if hasattr(p, "to_k_ip")]
    w = adapters.load_adapter(str(path))
    # diffusers gives key 2n+1 to its n-th cross-attention processor (load_state_dict strict on the widths);
    # our layer n must be that same tensor, and no file layer may be left over.
    assert len(ip_names) == w.layer_count
    for n, name in enumerate(ip_names):
        assert torch.equal(procs[name].to_k_ip[0].weight, w.layers[n][0].float())
        assert torch.equal(procs[name].to_v_ip[0].weight, w.layers[n][1].float())
        if not kind.startswith("faceid-portrait"):  # diffusers counts every FaceID MLP as 4 tokens
            assert procs[name].num_tokens == [w.num_tokens]
    if kind in af.LORA_KINDS:
        loras = unet._load_ip_adapter_loras([{"image_proj": image_proj, "ip_adapter": ip_adapter}])
        assert len(loras[0]) == w.lora_key_count


# --- files that are not (whole) adapters -------------------------------------------------------------

@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_file(adapters, files, suffix):
    whole = write_release(files, "faceid", af.SD15, suffix)
    cut = files / f"cut-{whole.name}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(adapters.AdapterError, match="truncated or corrupt") as e:
        adapters.load_adapter(str(cut))
    assert cut.name in str(e.value) and "Download it again" in str(e.value)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_file(adapters, files, suffix):
    empty = files / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(adapters.AdapterError, match=r"is empty \(0 bytes\)"):
        adapters.load_adapter(str(empty))


def test_file_without_tensors(adapters, files):
    path = files / "no-tensors.safetensors"
    safetensors.torch.save_file({}, str(path))
    with pytest.raises(adapters.AdapterError, match="contains no tensors"):
        adapters.load_adapter(str(path))


def _save(path, state_dict):
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)
    return path


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("family, make, says", [
    ("checkpoint", af.checkpoint_like_state_dict, ("Stable Diffusion checkpoint", "models/checkpoints")),
    ("lora", af.lora_like_state_dict, ("a LoRA", "models/loras")),
])
def test_other_model_families_are_named(adapters, files, suffix, family, make, says):
    path = _save(files / f"{family}{suffix}", make())
    with pytest.raises(adapters.AdapterError) as e:
        adapters.load_adapter(str(path))
    message = str(e.value)
    assert f"{path.name} is not an IP-Adapter" in message
    assert all(s in message for s in says), message
    assert "models/ipadapter" in message


def test_unrelated_tensors_list_their_keys(adapters, files):
    path = _save(files / "mystery.safetensors", {"weird.layer.weight": torch.zeros(2, 2)})
    with pytest.raises(adapters.AdapterError, match="no 'image_proj' / 'ip_adapter' sections.*weird.layer.weight"):
        adapters.load_adapter(str(path))


def test_malicious_pickle_is_refused_without_running(adapters, files, tmp_path):
    marker = tmp_path / "pwned"
    path = af.write_malicious_bin(files / "ip-adapter-faceid_sd15-evil.bin", marker)
    with pytest.raises(adapters.AdapterError) as e:
        adapters.load_adapter(str(path))
    assert "Refused to load" in str(e.value) and "(io.open)" in str(e.value)  # builtins.open pickles as io.open
    assert "weights_only" not in str(e.value)  # never tell users to switch the protection off
    assert not marker.exists()
    # The payload is live: an unrestricted unpickle of the same file does create its marker.
    control = tmp_path / "control"
    af.write_malicious_bin(tmp_path / "control.bin", control)
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()


def _faceid(widths=(320,) * 16):
    return af.adapter_state_dict("faceid", af.SD15, layer_widths=widths, lora_rank=None)


def _drop(section, key):
    def change(sd):
        del sd[section][key]
    return change


def _set(section, key, tensor):
    def change(sd):
        sd[section][key] = tensor
    return change


@pytest.mark.parametrize("change, says", [
    (_set("ip_adapter", "5.to_k_ip.weight", torch.zeros(320, 2048)),
     "layer 5 has to_k_ip \\[320, 2048\\] and to_v_ip \\[320, 768\\]"),
    (lambda sd: sd["ip_adapter"].update({"5.to_k_ip.weight": torch.zeros(320, 2048), "5.to_v_ip.weight": torch.zeros(320, 2048)}),
     "inconsistent layer widths.*768 \\(from layer 1\\), 2048 \\(from layer 5\\)"),
    (_set("ip_adapter", "5.to_v_ip.weight", torch.zeros(640, 768, dtype=torch.float16)),
     "layer 5 has to_k_ip \\[320, 768\\] and to_v_ip \\[640, 768\\]"),
    (lambda sd: [sd["ip_adapter"].pop(f"5.to_{x}_ip.weight") for x in "kv"], "with none left out; missing \\[5\\]"),
    (_drop("ip_adapter", "5.to_k_ip.weight"), "layer 5 has no '5.to_k_ip.weight'"),
    (_drop("ip_adapter", "7.to_v_ip.weight"), "layer 7 has no '7.to_v_ip.weight'"),
    (_set("ip_adapter", "1.to_k_ip.bias", torch.zeros(320)), "unexpected keys in ip_adapter \\('1.to_k_ip.bias'\\)"),
    (_set("ip_adapter", "4.to_k_ip.weight", torch.zeros(320, 768)), "even keys \\[4\\]; those number self-attention"),
    (_drop("image_proj", "norm.weight"), "unknown image projection layout"),
    (_drop("image_proj", "proj.2.bias"), None),  # biases are not read: still a FaceID file
    (_set("image_proj", "proj.3.weight", torch.zeros(768)), "full-face.*not support"),
    (_set("image_proj", "proj.2.weight", torch.zeros(768 * 5, 1024)), "5 tokens per embedding matches no known"),
    (_set("image_proj", "proj.2.weight", torch.zeros(1000, 1024)), "not a whole number of 768-wide tokens"),
    (_set("image_proj", "proj.2.weight", torch.zeros(768 * 4, 512)), "proj.2 reads 512 features but proj.0 makes 1024"),
    (lambda sd: sd.update(image_proj=af.shared_state_dict("faceid", af.SDXL)["image_proj"]),
     "makes 2048-wide tokens but its attention layers read 768-wide context; the file mixes two adapters"),
])
def test_damaged_adapters_say_what_is_wrong(adapters, files, change, says):
    nested = _faceid()
    change(nested)
    path = af.write_adapter(files / "damaged.safetensors", nested)
    if says is None:
        assert adapters.load_adapter(str(path)).kind is adapters.AdapterKind.FACEID
        return
    with pytest.raises(adapters.AdapterError, match=says) as e:
        adapters.load_adapter(str(path))
    assert "damaged.safetensors" in str(e.value)


def test_missing_section(adapters, files):
    nested = _faceid()
    path = _save(files / "proj-only.bin", {"image_proj": nested["image_proj"]})
    with pytest.raises(adapters.AdapterError, match="'image_proj' section but no 'ip_adapter' section"):
        adapters.load_adapter(str(path))


def test_other_context_widths(adapters, files):
    nested = af.adapter_state_dict("image-prompt", af.SD15, layer_widths=(320,) * 16)
    nested["image_proj"] = {"proj.weight": torch.zeros(4 * 1024, 1024), "norm.weight": torch.zeros(1024)}
    nested["ip_adapter"] = {k: torch.zeros(320, 1024) for k in nested["ip_adapter"]}
    with pytest.raises(adapters.AdapterError, match="1024-wide text context \\(SD2.x\\)"):
        adapters.load_adapter(str(af.write_adapter(files / "sd2.safetensors", nested)))


# --- kind override and file-name variants ----------------------------------------------------------

def test_kind_override_for_renamed_files(adapters, files):
    K = adapters.AdapterKind
    plus = af.write_adapter(files / "my-face-adapter.safetensors", af.shared_state_dict("faceid-plus-v2", af.SD15))
    assert adapters.load_adapter(str(plus)).kind is K.FACEID_PLUS  # nothing in the name says v2
    assert adapters.load_adapter(str(plus), "faceid-plus-v2").kind is K.FACEID_PLUS_V2
    assert adapters.load_adapter(str(plus), "auto").kind is K.FACEID_PLUS

    portrait = af.write_adapter(files / "portrait.safetensors", af.shared_state_dict("faceid-portrait", af.SDXL))
    assert adapters.load_adapter(str(portrait)).kind is K.FACEID_PORTRAIT
    # Portrait unnorm needs no name: its layout (a resampler over 512-wide inputs) says what it is.
    unnorm = af.write_adapter(files / "portrait-2.bin", af.shared_state_dict("faceid-portrait-unnorm", af.SDXL))
    assert adapters.load_adapter(str(unnorm)).kind is K.FACEID_PORTRAIT_UNNORM

    # An explicit kind wins over a name hint that agrees with the keys.
    v2_named = write_release(files, "faceid-plus-v2", af.SD15, ".bin")
    assert adapters.load_adapter(str(v2_named), "faceid-plus").kind is K.FACEID_PLUS


@pytest.mark.parametrize("kind, base, override, says", [
    ("faceid-plus", af.SD15, "faceid", "its keys say IP-Adapter FaceID Plus .*choose faceid-plus, faceid-plus-v2 or 'auto'"),
    ("faceid-portrait", af.SDXL, "faceid", "choose faceid-portrait or 'auto'"),
    ("faceid-portrait", af.SDXL, "faceid-portrait-unnorm", "choose faceid-portrait or 'auto'"),
    ("faceid-portrait-unnorm", af.SDXL, "image-prompt-plus",
     r"its keys say IP-Adapter FaceID Portrait \(unnormalised embedding\) .*choose faceid-portrait-unnorm or 'auto'"),
    ("image-prompt-plus", af.SDXL, "faceid-portrait-unnorm", "choose image-prompt-plus or 'auto'"),
    ("faceid", af.SD15, "faceid-portrait", "its keys say IP-Adapter FaceID \\(.*4 tokens\\): choose faceid or 'auto'"),
    ("image-prompt", af.SD15, "image-prompt-plus", "choose image-prompt or 'auto'"),
    ("image-prompt-plus", af.SDXL, "faceid-plus-v2", "choose image-prompt-plus or 'auto'"),
])
def test_contradicting_override_is_an_error(adapters, files, kind, base, override, says):
    path = write_release(files, kind, base, ".safetensors")
    with pytest.raises(adapters.AdapterError, match=says) as e:
        adapters.load_adapter(str(path), override)
    assert f"set to kind '{override}'" in str(e.value)


# --- FaceID Portrait unnorm: a resampler over the raw face embedding -----------------------------------

def test_portrait_unnorm_fixture_has_the_release_layout():
    """The generator's unnorm at the release's width has exactly the keys and shapes of the reference
    Resampler built as cubiq builds it for ip-adapter-faceid-portrait_sdxl_unnorm.bin (independent of
    the generator and of the pack); adapter_files' docstring gives the file-size check as well."""
    release = reference_projection.release_unnorm_resampler_shapes()
    assert release["latents"] == (1, 16, 1280) and release["proj_in.weight"] == (1280, 512)
    assert release["proj_out.weight"] == (2048, 1280) and release["norm_out.weight"] == (2048,)
    generated = af.image_projection("faceid-portrait-unnorm", af.SDXL, af._Random(0, torch.float16))
    assert {k: tuple(v.shape) for k, v in generated.items()} == release
    assert all(v.dtype == torch.float32 for v in generated.values())  # the release stores it in fp32


def test_portrait_unnorm_at_release_width_is_recognised(adapters):
    image_proj = af.image_projection("faceid-portrait-unnorm", af.SDXL, af._Random(0, torch.float16))
    ip_adapter = af.shared_state_dict("faceid", af.SDXL)["ip_adapter"]
    ip_adapter = {k: v for k, v in ip_adapter.items() if "_ip." in k}  # Portrait has no LoRA
    w = adapters.recognise(image_proj, ip_adapter, "ip-adapter-faceid-portrait_sdxl_unnorm.bin")
    assert w.kind is adapters.AdapterKind.FACEID_PORTRAIT_UNNORM
    assert (w.base_model, w.num_tokens, w.id_embedding_width, w.clip_width, w.lora_key_count) == ("SDXL", 16, 512,
                                                                                                 None, 0)
    assert w.kind.clip_input is None and w.is_identity
    assert "Portrait (unnormalised embedding) for SDXL" in w.describe() and "face embedding 512" in w.describe()


@pytest.mark.parametrize("input_width, kind", [(512, "faceid-portrait-unnorm"), (1280, "image-prompt-plus"),
                                               (1664, "image-prompt-plus"), (1024, "image-prompt-plus")])
def test_a_resampler_is_unnorm_exactly_when_it_reads_face_embeddings(adapters, input_width, kind):
    """The rule: same keys, and proj_in's input width decides: 512 is ArcFace, CLIP hidden states are
    1024 (ViT-L), 1280 (ViT-H), 1664 (ViT-bigG) wide. The file name plays no part."""
    nested = af.adapter_state_dict("image-prompt-plus", af.SD15, layer_widths=(320,) * 16, resampler_dim=128,
                                   clip_hidden=input_width, resampler_depth=1)
    w = adapters.recognise(nested["image_proj"], nested["ip_adapter"], "ip-adapter-plus_sd15.bin")
    assert w.kind is adapters.AdapterKind(kind)
    assert (w.clip_width, w.id_embedding_width) == ((None, 512) if input_width == 512 else (input_width, None))


def test_unknown_kind_name(adapters, files):
    path = write_release(files, "faceid", af.SD15, ".safetensors")
    with pytest.raises(adapters.AdapterError, match="Unknown adapter kind 'faceid-v3'"):
        adapters.load_adapter(str(path), "faceid-v3")


# --- the ipadapter folder -------------------------------------------------------------------------

@pytest.fixture
def ipadapter_folder(booted):
    """The session host's models/ipadapter (registered as the host would); what a test adds is removed after it."""
    import folder_paths

    booted.pack_module("startup.model_folders").register_model_folders()
    folder = booted.models / "ipadapter"
    before = set(folder.iterdir())
    yield folder
    for path in set(folder.iterdir()) - before:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    folder_paths.filename_list_cache.pop("ipadapter", None)


def test_resolves_names_inside_the_ipadapter_folder(adapters, ipadapter_folder):
    path = write_release(ipadapter_folder / "faces", "faceid", af.SD15, ".safetensors")
    assert adapters.resolve_adapter_path(f"faces/{path.name}") == str(path)
    assert os.path.join("faces", path.name) in adapters.adapter_file_names()


@pytest.mark.parametrize("name", ["../x.safetensors", "faces/../../x.bin", "..\\x.bin", "/etc/passwd", "\\x.bin",
                                  "C:\\models\\x.bin", ""])
def test_path_traversal_is_refused(adapters, ipadapter_folder, name):
    # A file where "../x.safetensors" points, so refusing is not just "not found".
    outside = ipadapter_folder.parent / "x.safetensors"
    outside.write_bytes(b"not an adapter")
    try:
        with pytest.raises(adapters.AdapterError, match="is not a file name inside models/ipadapter"):
            adapters.resolve_adapter_path(name)
    finally:
        outside.unlink()


def test_missing_file_names_the_folders(adapters, ipadapter_folder):
    with pytest.raises(adapters.AdapterError, match="No adapter file 'nope.bin' in the ipadapter model folders"):
        adapters.resolve_adapter_path("nope.bin")
