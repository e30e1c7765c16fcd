"""The face analyzer and identity nodes in the host's real executor, photos through its LoadImage."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from facestudio_testing import clip_models
from facestudio_testing import face_models as fm
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def installed_pack(comfy_host, booted):
    """The tiny pack linked into the host's models/insightface/models/."""
    folder = booted.models / "insightface" / "models"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / fm.TINY_PACK
    if not link.exists():
        link.symlink_to(fm.tiny_pack(), target_is_directory=True)
    return fm.TINY_PACK


@pytest.fixture(scope="module")
def photos(booted):
    """PNG files in the host's input folder: three shots of one tiny 'face' (three sizes), another face, a
    faceless photo."""
    folder = booted.base / "input"
    folder.mkdir(exist_ok=True)
    images = {
        "fs_a.png": fm.tiny_face_image(),
        "fs_b.png": np.ascontiguousarray(fm.tiny_face_image(((3, 9, "white"),))[:480]),  # 640x480
        "fs_c.png": np.ascontiguousarray(fm.tiny_face_image(((4, 7, "white"),))[:, :544]),  # 544x640
        "fs_other.png": fm.tiny_face_image(((6, 6, "green"),)),
        "fs_black.png": np.zeros((64, 64, 3), np.uint8),
    }
    for name, rgb in images.items():
        Image.fromarray(rgb).save(folder / name)
    return images


@pytest.fixture
def identities_dir(comfy_host, booted):
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "facestudio", "identities")


def analyzer_node(pack):
    return {"class_type": "FaceStudioFaceAnalyzerLoader", "inputs": {"pack": pack, "provider": "CPU", "det_size": 640}}


def encode_node(image_node, identity=None, on_missing="error"):
    inputs = {"face_analyzer": ["1", 0], "image": [image_node, 0], "face": "largest", "index": 0,
              "on_missing": on_missing, "outlier_threshold": 0.4}
    if identity:
        inputs["identity"] = identity
    return {"class_type": "FaceStudioIdentityEncode", "inputs": inputs}


def load_image(name):
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def preview(source):
    return {"class_type": "PreviewAny", "inputs": {"source": source}}


def test_schemas(comfy_host):
    import nodes

    expected = {
        "FaceStudioFaceAnalyzerLoader": ("FaceStudio/loaders", ["FACESTUDIO_FACE_ANALYZER"]),
        "FaceStudioIdentityEncode": ("FaceStudio/identity", ["FACESTUDIO_IDENTITY", "STRING"]),
        "FaceStudioIdentityMix": ("FaceStudio/identity", ["FACESTUDIO_IDENTITY"]),
        "FaceStudioIdentitySave": ("FaceStudio/identity", []),
        "FaceStudioIdentityLoad": ("FaceStudio/identity", ["FACESTUDIO_IDENTITY"]),
    }
    for node_id, (category, outputs) in expected.items():
        info = nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        assert info["category"] == category and info["output"] == outputs, node_id
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in inputs.values()), node_id
    assert nodes.NODE_CLASS_MAPPINGS["FaceStudioIdentitySave"].GET_NODE_INFO_V1()["output_node"]
    provider = nodes.NODE_CLASS_MAPPINGS["FaceStudioFaceAnalyzerLoader"].GET_NODE_INFO_V1()["input"]["required"]["provider"]
    assert provider[1]["options"] == ["auto", "CPU", "CUDA", "ROCm", "CoreML", "DirectML"]


def test_pack_list_and_missing_pack(comfy_host, installed_pack, booted):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["FaceStudioFaceAnalyzerLoader"]
    assert installed_pack in cls.GET_NODE_INFO_V1()["input"]["required"]["pack"][1]["options"]
    error = comfy_host.refusal({"1": analyzer_node("buffalo_l"), "2": preview(["1", 0])}, "1")
    assert str(booted.models / "insightface" / "models") in error and "buffalo_l" in error


@pytest.mark.smoke
def test_encode_chain_mix_save_load(comfy_host, installed_pack, photos, booted, identities_dir):
    ident = identity_modules(booted)
    faces = booted.pack_module("encoders.faces")
    prompt = {
        "1": analyzer_node(installed_pack),
        "2": load_image("fs_a.png"),
        "3": encode_node("2"),
        "4": load_image("fs_b.png"),
        "5": encode_node("4", identity=["3", 0]),  # add a shot of another size
        "6": load_image("fs_other.png"),
        "7": encode_node("6"),
        "8": {"class_type": "FaceStudioIdentityMix",
              "inputs": {"identity_a": ["5", 0], "identity_b": ["7", 0], "weight": 0.0, "weight_c": 0.0, "weight_d": 0.0}},
        "9": {"class_type": "FaceStudioIdentityMix",
              "inputs": {"identity_a": ["5", 0], "identity_b": ["7", 0], "weight": 0.5, "weight_c": 0.0, "weight_d": 0.0}},
        "10": preview(["5", 1]),
        "11": preview(["8", 0]),
        "12": preview(["9", 0]),
        "13": {"class_type": "FaceStudioIdentitySave", "inputs": {"identity": ["5", 0], "filename_prefix": "tests/me"}},
    }
    result = comfy_host.run(prompt)
    assert result.success, result.error
    analyzer = comfy_host.output(result, "1")
    assert isinstance(analyzer, faces.FaceAnalyzer) and analyzer.providers == ("CPUExecutionProvider",)
    chained = comfy_host.output(result, "5")
    assert isinstance(chained, ident.value.FaceIdentity)
    assert chained.used == (0, 1) and chained.photo_count == 2 and chained.recognizer.file_name == fm.TINY_RECOGNIZER
    direct = ident.multishot.encode_identity(analyzer, [photos["fs_a.png"], photos["fs_b.png"]], cache=None)
    np.testing.assert_array_equal(chained.embedding, direct.embedding)
    report = comfy_host.output(result, "5", 1)
    assert "2 shot(s) used of 2 photo(s)" in report and "image 1: detection score" in report
    np.testing.assert_array_equal(comfy_host.output(result, "8").embedding, chained.embedding)
    other = comfy_host.output(result, "7")
    mixed = comfy_host.output(result, "9").embedding.astype(np.float64)
    expected = chained.embedding.astype(np.float64) + other.embedding
    np.testing.assert_allclose(mixed, expected / np.linalg.norm(expected), atol=1e-6)

    saved = os.path.join(identities_dir, "tests", "me_00001.safetensors")
    assert os.path.isfile(saved)
    assert "tests/me_00001.safetensors" in result.ui["13"]["text"][0]
    loaded = comfy_host.run({"1": {"class_type": "FaceStudioIdentityLoad",
                                   "inputs": {"identity_file": "tests/me_00001.safetensors"}},
                             "2": preview(["1", 0])})
    assert loaded.success, loaded.error
    assert comfy_host.output(loaded, "1").embedding.tobytes() == chained.embedding.tobytes()
    import nodes

    options = nodes.NODE_CLASS_MAPPINGS["FaceStudioIdentityLoad"].GET_NODE_INFO_V1()["input"]["required"]["identity_file"]
    assert "tests/me_00001.safetensors" in options[1]["options"]


def test_save_refuses_paths_outside_the_output_folder(comfy_host, installed_pack, photos, booted):
    for prefix in ("../escape", "/tmp/escape", "tests/../../escape"):
        prompt = {"1": analyzer_node(installed_pack), "2": load_image("fs_a.png"), "3": encode_node("2"),
                  "4": {"class_type": "FaceStudioIdentitySave", "inputs": {"identity": ["3", 0], "filename_prefix": prefix}}}
        result = comfy_host.run(prompt)
        assert not result.success and result.error_node == "4", prefix
        assert "no absolute paths or '..'" in result.error
    error = comfy_host.refusal({"1": {"class_type": "FaceStudioIdentityLoad",
                                      "inputs": {"identity_file": "../../x.safetensors"}}, "2": preview(["1", 0])}, "1")
    assert "no absolute paths or '..'" in error


def test_photo_without_a_face(comfy_host, installed_pack, photos):
    prompt = {"1": analyzer_node(installed_pack), "2": load_image("fs_black.png"), "3": encode_node("2"),
              "4": preview(["3", 1])}
    result = comfy_host.run(prompt)
    assert not result.success and result.error_node == "3"
    assert "No face found in image 0" in result.error
    prompt["3"] = encode_node("2", on_missing="skip")
    result = comfy_host.run(prompt)
    assert not result.success and "no usable face" in result.error


def test_batch_is_several_shots_with_a_progress_bar(comfy_host, installed_pack, photos):
    import comfy.utils

    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        prompt = {"1": analyzer_node(installed_pack), "2": load_image("fs_a.png"), "3": load_image("fs_other.png"),
                  "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
                  "5": encode_node("4"), "6": preview(["5", 1])}
        result = comfy_host.run(prompt)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert result.success, result.error
    identity = comfy_host.output(result, "5")
    assert identity.used == (0, 1) and identity.photo_count == 2
    assert calls == [(1, 2), (2, 2)]


@pytest.mark.smoke
def test_photos_of_different_sizes_into_one_encode_node(comfy_host, installed_pack, photos, booted):
    """image, image_2 and image_3 of one Encode Identity (640x640, 640x480, 544x640: no Image Batch, no
    resizing) give exactly the identity encode_identity makes of the three photos as a list, in that order."""
    import comfy.utils

    ident = identity_modules(booted)
    names = ("fs_a.png", "fs_b.png", "fs_c.png")
    assert len({photos[n].shape for n in names}) == 3
    encode = encode_node("2", on_missing="error")
    encode["inputs"].update(image_2=["3", 0], image_3=["4", 0], outlier_threshold=-1.0)
    prompt = {"1": analyzer_node(installed_pack), "2": load_image(names[0]), "3": load_image(names[1]),
              "4": load_image(names[2]), "5": encode, "6": preview(["5", 1])}
    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    try:
        result = comfy_host.run(prompt)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert result.success, result.error
    identity = comfy_host.output(result, "5")
    direct = ident.multishot.encode_identity(comfy_host.output(result, "1"), [photos[n] for n in names],
                                             outlier_threshold=-1.0, cache=None)
    assert identity.used == direct.used == (0, 1, 2) and identity.photo_count == 3
    for field in ("embedding", "embeddings", "bboxes", "crops", "det_scores"):  # bboxes: each photo's own pixels
        np.testing.assert_array_equal(getattr(identity, field), getattr(direct, field), err_msg=field)
    assert "3 shot(s) used of 3 photo(s)" in comfy_host.output(result, "5", 1)
    assert calls[0] == (1, 3) and calls[-1] == (3, 3)  # the bar counts all three (the host throttles between)


@pytest.mark.smoke
def test_encode_with_clip_vision_through_the_executor(comfy_host, installed_pack, photos, booted):
    """Encode Identity fed by the host's CLIPVisionLoader (a seeded random ViT-L file, see clip_models)."""
    import comfy.clip_vision

    ident = identity_modules(booted)
    name = clip_models.install_vitl(booted.models)
    encode = encode_node("2")
    encode["inputs"]["clip_vision"] = ["3", 0]
    prompt = {
        "1": analyzer_node(installed_pack),
        "2": load_image("fs_a.png"),
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": name}},
        "4": encode,
        "5": preview(["4", 1]),
    }
    result = comfy_host.run(prompt)
    assert result.success, result.error
    identity = comfy_host.output(result, "4")
    assert isinstance(identity, ident.value.FaceIdentity) and identity.clip_width == 1024
    assert identity.clip_features.shape == (1, 257, 1024) and np.isfinite(identity.clip_features).all()
    assert "CLIP vision features" in comfy_host.output(result, "4", 1)
    clip = comfy.clip_vision.load(str(booted.models / "clip_vision" / name))
    direct = ident.multishot.encode_clip_crops(clip, identity.crops)
    np.testing.assert_allclose(identity.combined_clip_features, direct[0], rtol=1e-4, atol=1e-4)


def test_style_encode_through_the_executor(comfy_host, installed_pack, photos, booted):
    """Encode Style fed by LoadImage and the host's CLIPVisionLoader, faces painted out by the analyzer."""
    import comfy.clip_vision

    style = booted.pack_module("encoders.style")
    name = clip_models.install_vitl(booted.models)
    prompt = {
        "1": analyzer_node(installed_pack),
        "2": load_image("fs_a.png"),
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": name}},
        "4": {"class_type": "FaceStudioStyleEncode",
              "inputs": {"image": ["2", 0], "clip_vision": ["3", 0], "mask_margin": 0.25, "face_analyzer": ["1", 0]}},
        "5": preview(["4", 0]),
    }
    result = comfy_host.run(prompt)
    assert result.success, result.error
    encoded = comfy_host.output(result, "4")
    assert isinstance(encoded, style.StyleEncoding) and encoded.clip_width == 1024
    assert encoded.penultimate_hidden_states.shape == (1, 257, 1024) and encoded.masked_faces == (1,)
    assert torch.isfinite(encoded.image_embeds).all()
    # The same image encoded outside the graph, faces unmasked, differs: the mask reached the encoder.
    clip = comfy.clip_vision.load(str(booted.models / "clip_vision" / name))
    image = comfy_host.output(comfy_host.run({"2": load_image("fs_a.png"), "5": preview(["2", 0])}), "2")
    unmasked = style.encode_style(clip, image)
    assert unmasked.masked_faces == (0,)
    assert not torch.allclose(unmasked.image_embeds, encoded.image_embeds)
