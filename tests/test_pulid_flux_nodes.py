"""The PuLID-FLUX nodes' execute paths, in-process, on the tiny FLUX model and the seeded PuLID-FLUX files.

A photo (scikit-image's astronaut at 256 px, where both the tiny insightface pack and the seeded
RetinaFace find a face) -> Encode Identity PuLID-FLUX -> Person PuLID-FLUX -> Apply PuLID-FLUX on
the tiny FLUX.1 model: sampling changes. Files: facestudio_testing/tiny_flux.py (PuLID-FLUX scaled down
to the tiny model), pulid_files.py (EVA-CLIP, facexlib), face_models.py (the insightface pack).
The Loader node is run on its refusals and on those files in the models folders.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from facestudio_testing import face_models, pulid_files, tiny_flux

LATENT = (1, 16, 16, 16)


@pytest.fixture(scope="module")
def nodes(booted):
    booted.pack_module("startup.model_folders").register_model_folders()
    return booted.pack_module("nodes.pulid_flux")


@pytest.fixture(scope="module")
def pulid(booted):
    """The PuLID-FLUX models as the Loader makes them, from the tiny-layout file."""
    fx = pulid_files.facexlib_folder()
    return booted.pack_module("encoders.pulid_flux_identity").load_pulid_flux_models(
        tiny_flux.pulid_flux_file(), pulid_files.eva_clip_file(), fx / pulid_files.DETECTOR_FILE,
        fx / pulid_files.BISENET_FILE)


@pytest.fixture(scope="module")
def analyzer(faces):
    return faces.load_face_analyzer(face_models.tiny_pack(), providers="cpu")


@pytest.fixture(scope="module")
def photo():
    rgb = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]  # a ComfyUI IMAGE [1, H, W, 3]


@pytest.fixture(scope="module")
def flux(booted):
    return tiny_flux.load_tiny_flux()


def sample(model, seed=0):
    import comfy.sample

    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, 2, 1.0, "euler", "simple", tiny_flux.conditioning(1),
                               tiny_flux.conditioning(2), torch.zeros(LATENT), disable_pbar=True, seed=seed)


def test_encode_person_apply_changes_the_output(nodes, pulid, analyzer, photo, flux):
    identity, report = nodes.FaceStudioPuLIDFluxIdentityEncode.execute(pulid, analyzer, photo).args
    assert identity.id_tokens.shape == (1, tiny_flux.ID_TOKENS, tiny_flux.TINY_CA["kv_dim"])
    assert torch.isfinite(identity.id_tokens).all() and "1 photo(s)" in report
    assert (identity.id_tokens - identity.uncond_tokens).abs().max() > 1e-2  # a face, not the zero inputs

    mask = torch.zeros(2, 16, 16)
    mask[1, :, :8] = 1.0
    (persons,) = nodes.FaceStudioPuLIDFluxPerson.execute(identity, 1.0, 0.0, 1.0, mask=mask, mask_index=1).args
    (persons,) = nodes.FaceStudioPuLIDFluxPerson.execute(identity, 0.7, 0.0, 1.0, persons=persons).args
    assert len(persons) == 2 and persons[0].mask.shape == (1, 16, 16) and persons[1].mask is None

    (patched,) = nodes.FaceStudioPuLIDFluxApply.execute(flux, pulid, persons).args
    assert patched is not flux
    assert not torch.allclose(sample(patched), sample(flux), atol=1e-4)


def test_bad_inputs_are_named(nodes, pulid, booted, real, photo):
    from facestudio_testing import meta_models

    # An SD1.5 model: not FLUX.1.
    (persons,) = nodes.FaceStudioPuLIDFluxPerson.execute(_identity(booted, pulid), 1.0, 0.0, 1.0).args
    with pytest.raises(nodes.PuLIDFluxError, match="PuLID for FLUX.1.*FLUX.1 model") as e:
        nodes.FaceStudioPuLIDFluxApply.execute(meta_models.comfy_model("tiny-sd15"), pulid, persons)
    print(e.value)
    # An SD identity, and an SD person list (FaceStudio Person's), on the FLUX nodes.
    sd_identity = _sd_identity(booted)
    with pytest.raises(nodes.PuLIDFluxError, match="FaceIdentity.*IP-Adapter.*Encode Identity PuLID-FLUX") as e:
        nodes.FaceStudioPuLIDFluxPerson.execute(sd_identity, 1.0, 0.0, 1.0)
    print(e.value)
    sd_persons = booted.pack_module("attention.persons").add_person(None, sd_identity)
    with pytest.raises(nodes.PuLIDFluxError, match="person 0 comes from FaceStudio Person.*FaceIdentity") as e:
        nodes.FaceStudioPuLIDFluxApply.execute(None, pulid, sd_persons)
    print(e.value)
    # A recognizer of another width (SFace, 128) than antelopev2's.
    with pytest.raises(booted.pack_module("encoders.faces").FaceError, match="128-wide.*antelopev2") as e:
        nodes.FaceStudioPuLIDFluxIdentityEncode.execute(pulid, real, photo)
    print(e.value)
    # The Loader: a missing file names the folder and the download; a scaled-down file is refused by name.
    with pytest.raises(nodes.PuLIDFluxError, match="pulid_flux_v0.9.1.safetensors.*huggingface.co/guozinan") as e:
        nodes.FaceStudioPuLIDFluxLoader.execute("pulid_flux_v0.9.1.safetensors", pulid_files.EVA_FILE)
    print(e.value)
    folder = booted.models / "pulid"
    folder.mkdir(exist_ok=True)
    link = folder / "tiny_pulid_flux.safetensors"
    link.unlink(missing_ok=True)
    link.symlink_to(tiny_flux.pulid_flux_file())
    for name, target in ((pulid_files.EVA_FILE, pulid_files.eva_clip_file()),):
        (booted.models / "clip_vision" / name).unlink(missing_ok=True)
        (booted.models / "clip_vision" / name).symlink_to(target)
    (booted.models / "facexlib").mkdir(exist_ok=True)
    for name in (pulid_files.DETECTOR_FILE, pulid_files.BISENET_FILE):
        (booted.models / "facexlib" / name).unlink(missing_ok=True)
        (booted.models / "facexlib" / name).symlink_to(pulid_files.facexlib_folder() / name)
    import folder_paths

    for key in ("pulid", "clip_vision", "facexlib"):
        folder_paths.filename_list_cache.pop(key, None)
    (loaded,) = nodes.FaceStudioPuLIDFluxLoader.execute(link.name, pulid_files.EVA_FILE).args
    assert loaded.source == link.name and len(loaded.weights.ca) == tiny_flux.TINY_CA_MODULES



def test_missing_files_are_all_named_at_validation(comfy_host, booted):
    """The host validates Load PuLID-FLUX through its validate_inputs: with none of its files there, one queue
    names all four, each with its folder and download, before anything runs."""
    import folder_paths

    for key in ("pulid", "clip_vision", "facexlib"):
        folder_paths.filename_list_cache.pop(key, None)
    analyzer = {"class_type": "FaceStudioFaceAnalyzerLoader",
                "inputs": {"pack": face_models.TINY_PACK, "provider": "CPU", "det_size": 640}}
    prompt = {"1": {"class_type": "FaceStudioPuLIDFluxLoader",
                    "inputs": {"pulid_file": "pulid_flux_v0.9.1.safetensors", "eva_clip": "EVA02_CLIP_L_336_missing.pt"}},
              "2": analyzer, "3": {"class_type": "LoadImage", "inputs": {"image": "none.png"}},
              "4": {"class_type": "FaceStudioPuLIDFluxIdentityEncode",
                    "inputs": {"pulid_flux": ["1", 0], "face_analyzer": ["2", 0], "image": ["3", 0]}},
              "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}}
    present = {name for name in (pulid_files.DETECTOR_FILE, pulid_files.BISENET_FILE)
               if (booted.models / "facexlib" / name).exists()}
    result = comfy_host.run(prompt)
    assert not result.success and result.error_type == "validation"
    print(result.error)
    for name, folder in (("pulid_flux_v0.9.1.safetensors", "models/pulid"), ("EVA02_CLIP_L_336_missing.pt",
                                                                              "models/clip_vision")):
        assert f"'{name}' in {folder}" in result.error
    assert "huggingface.co/guozinan/PuLID" in result.error  # the release's download
    for name in {pulid_files.DETECTOR_FILE, pulid_files.BISENET_FILE} - present:
        assert f"'{name}' in models/facexlib" in result.error and "github.com/xinntao/facexlib" in result.error
    # '..' cannot reach a file outside the folder, even one that exists.
    problem = booted.pack_module("nodes.pulid_flux").pulid_flux_files_problem("../clip_vision/x.pt", "y.pt")
    assert "'../clip_vision/x.pt' in models/pulid" in problem

# ---- the encoders are a model the host manages ----


@pytest.fixture
def on_host(booted, monkeypatch):
    """The models as the Loader loads them (encoders/pulid_flux_host.py), for a GPU-like load device, with
    CoreModelPatcher rebound to a dynamic patcher as main.py does under dynamic VRAM."""
    import comfy.model_management
    import comfy.model_patcher
    from facestudio_testing.host_devices import CPU, GPU_LIKE, DynamicPatcher

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", DynamicPatcher, raising=False)
    fx = pulid_files.facexlib_folder()
    models = booted.pack_module("encoders.pulid_flux_host").load_pulid_flux_on_host(
        tiny_flux.pulid_flux_file(), pulid_files.eva_clip_file(), fx / pulid_files.DETECTOR_FILE,
        fx / pulid_files.BISENET_FILE, load_device=GPU_LIKE, offload_device=CPU)
    yield models
    comfy.model_management.free_memory(1e30, GPU_LIKE)  # nothing of these tests stays resident


def test_the_encoders_load_and_offload_as_a_host_model(nodes, pulid, on_host, analyzer, photo, monkeypatch):
    """Encode Identity PuLID-FLUX has the host load the IDFormer, EVA-CLIP and facexlib's networks (one
    patcher of the host's own class, so the load makes room the dynamic way), runs them there, and the
    host offloads them when it needs the room; the ID tokens equal those of the host-free path."""
    import comfy.model_management
    from facestudio_testing.host_devices import GPU_LIKE, DynamicPatcher

    patcher = on_host.patcher
    assert type(patcher) is DynamicPatcher and patcher.load_device == GPU_LIKE
    networks = (on_host.idformer, on_host.eva.model, on_host.face_parser.detector, on_host.face_parser.parser)
    managed = {id(p) for p in patcher.model.parameters()}
    assert managed == {id(p) for m in networks for p in m.parameters()}  # every network, nothing else
    assert patcher.model_size() >= sum(p.numel() * p.element_size() for m in networks for p in m.parameters())

    frees, seen = [], []
    real_free = comfy.model_management.free_memory

    def free_memory(memory_required, device, *args, **kwargs):
        if device == GPU_LIKE:
            frees.append(kwargs.get("for_dynamic"))
        return real_free(memory_required, device, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "free_memory", free_memory)
    runs = networks[:1] + (on_host.eva.model.patch_embed,) + networks[2:]  # EVA runs forward_intermediates
    for module in runs:  # where the host says the networks are while each runs
        module.register_forward_pre_hook(lambda m, a: seen.append(
            (patcher.model.device, patcher.loaded_size(), patcher in comfy.model_management.loaded_models())))
    try:
        (identity, _) = nodes.FaceStudioPuLIDFluxIdentityEncode.execute(on_host, analyzer, photo).args
    finally:
        for module in runs:
            module._forward_pre_hooks.clear()
    assert len(seen) == 4 and set(seen) == {(GPU_LIKE, patcher.model_size(), True)}
    assert frees and set(frees) == {True}  # room made the dynamic way: other models are not all evicted
    (expected, _) = nodes.FaceStudioPuLIDFluxIdentityEncode.execute(pulid, analyzer, photo).args
    torch.testing.assert_close(identity.id_tokens, expected.id_tokens, rtol=0, atol=0)

    real_free(1e30, GPU_LIKE)  # a model that needs the room offloads them
    assert patcher.loaded_size() == 0 and patcher not in comfy.model_management.loaded_models()
    assert patcher.model.device == patcher.offload_device


def _identity(booted, pulid):
    m = booted.pack_module("encoders.pulid_flux_identity")
    return m.PuLIDFluxIdentity(tiny_flux.id_tokens(0), pulid.uncond_tokens, pulid.source, None, 1)


def _sd_identity(booted):
    """A FaceStudio Encode Identity (IP-Adapter) identity: one shot of a 512-wide embedding."""
    identity = booted.pack_module("encoders.identity")
    faces = booted.pack_module("encoders.faces")
    emb = np.ones((1, 512), np.float32)
    return identity.FaceIdentity(emb * 20, emb / np.sqrt(512), emb[0] / np.sqrt(512),
                                 faces.RecognizerIdentity("w600k_r50.onnx", "0" * 16, 512),
                                 np.zeros((1, 224, 224, 3), np.uint8), np.ones(1, np.float32),
                                 np.zeros((1, 4), np.float32), np.zeros((1, 5, 2), np.float32), (0,), photo_count=1)
