"""Bad inputs through the real host: each fails its node with a message that says what was wrong, where,
and how to fix it, and the same host then runs a good prompt.

The in-process executor runs the table below (and the inputs that must be accepted, not refused:
grayscale, RGBA, 16-bit and huge photos, a batch with on_missing = skip, a mask of another size); the
HTTP server runs a sequence of bad prompts and then a good one, so a crash of the server process would
show. Photos go through the host's LoadImage; models are the tiny and trained (YuNet/SFace) face packs,
small IP-Adapter files of every kind and the tiny SD1.5 checkpoint the tests build.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from facestudio_testing import adapter_files as af
from facestudio_testing import clip_models
from facestudio_testing import face_models as fm
from facestudio_testing import face_photos
from facestudio_testing import graphs
from facestudio_testing.server import execution_error
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

FACEID = "fs_bad_faceid_sd15.safetensors"
FACEID_SDXL = "fs_bad_faceid_sdxl.safetensors"
STYLE = "fs_bad_image_prompt_sd15.safetensors"
PLUS = "fs_bad_" + af.release_file_name("faceid-plus", af.SD15, ".safetensors")
TRUNCATED = "fs_bad_truncated_faceid_sd15.safetensors"
LORA = "fs_bad_faceid_sd15_lora.safetensors"
IDENTITY_FOLDER = "fs_bad"
GOOD_IDENTITY = f"{IDENTITY_FOLDER}/good_00001.safetensors"
CUT_IDENTITY = f"{IDENTITY_FOLDER}/cut_00001.safetensors"
NOT_IDENTITY = f"{IDENTITY_FOLDER}/adapter_00001.safetensors"
SMALL_FACE_CANVAS = 2048
SMALL_FACE_SIZE = 48  # the astronaut's whole 512-px photo shrunk to this: a face of about 12 px


# --- the host's inputs ------------------------------------------------------------------------------

def _photos() -> dict[str, Image.Image]:
    from skimage import data

    face = fm.tiny_face_image()
    astronaut = data.astronaut()
    small = np.zeros((SMALL_FACE_CANVAS, SMALL_FACE_CANVAS, 3), np.uint8)
    small[1000:1000 + SMALL_FACE_SIZE, 1000:1000 + SMALL_FACE_SIZE] = np.asarray(
        Image.fromarray(astronaut).resize((SMALL_FACE_SIZE, SMALL_FACE_SIZE), Image.LANCZOS))
    rgba = np.concatenate([face, np.zeros((*face.shape[:2], 1), np.uint8)], axis=2)
    rgba[:, 320:, 3] = 255  # the face cell (x 192..224) lies under alpha 0: dropped, not composited, it stays
    gray = Image.fromarray(face).convert("L")
    gray16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    huge = np.asarray(Image.fromarray(face).resize((4096, 4096), Image.NEAREST))
    return {
        "fs_bad_face.png": Image.fromarray(face),
        "fs_bad_black.png": Image.fromarray(np.zeros_like(face)),
        "fs_bad_gradient.png": Image.fromarray(face_photos.faceless()),
        "fs_bad_astronaut.png": Image.fromarray(astronaut),
        "fs_bad_small_face.png": Image.fromarray(small),
        "fs_bad_8x8.png": Image.fromarray(astronaut).resize((8, 8), Image.LANCZOS),
        "fs_bad_8x8_black.png": Image.fromarray(np.zeros((8, 8, 3), np.uint8)),
        "fs_bad_gray.png": gray,
        "fs_bad_gray16.png": gray16,
        "fs_bad_rgba.png": Image.fromarray(rgba, "RGBA"),
        "fs_bad_huge.png": Image.fromarray(huge),
        "fs_bad_left_mask.png": Image.fromarray(np.repeat(np.arange(40)[None, :] < 20, 24, 0).astype(np.uint8) * 255),
    }


@pytest.fixture(scope="module")
def env(comfy_host, booted, tiny_sd15):
    """Face packs, photos, adapters and identity files in the in-process host's folders; removed after."""
    import folder_paths

    face_photos.install_packs(booted.models)
    clip_models.install_vitl(booted.models)
    inputs = booted.base / "input"
    inputs.mkdir(exist_ok=True)
    for name, image in _photos().items():
        image.save(inputs / name)
    adapters = booted.models / "ipadapter"
    written = [af.write_adapter(adapters / FACEID, af.shared_state_dict("faceid", af.SD15)),
               af.write_adapter(adapters / FACEID_SDXL, af.shared_state_dict("faceid", af.SDXL)),
               af.write_adapter(adapters / STYLE, af.shared_state_dict("image-prompt", af.SD15)),
               af.write_adapter(adapters / PLUS, af.shared_state_dict("faceid-plus", af.SD15)),
               af.write_adapter(adapters / TRUNCATED, af.shared_state_dict("faceid", af.SD15))]
    written[-1].write_bytes(written[-1].read_bytes()[:5000])
    from safetensors.torch import save_file

    save_file(af.lora_like_state_dict(), str(adapters / LORA))
    written.append(adapters / LORA)
    folder_paths.filename_list_cache.pop("ipadapter", None)

    ident, faces = identity_modules(booted), booted.pack_module("encoders.faces")
    identities = os.path.join(folder_paths.get_output_directory(), "facestudio", "identities")
    analyzer = faces.load_face_analyzer(fm.tiny_pack(), providers="cpu")
    identity = ident.multishot.encode_identity(analyzer, [fm.tiny_face_image()], cache=None)
    good = ident.files.save_identity(identity, os.path.join(identities, GOOD_IDENTITY))
    cut = ident.files.save_identity(identity, os.path.join(identities, CUT_IDENTITY))
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])
    not_identity = af.write_adapter(os.path.join(identities, NOT_IDENTITY), af.adapter_state_dict(
        "faceid", af.SD15, layer_widths=(320,), lora_rank=None))
    written += [good, cut, not_identity]
    yield {"checkpoint": tiny_sd15, "identity": identity}
    for path in written:
        path.unlink(missing_ok=True)
    folder_paths.filename_list_cache.pop("ipadapter", None)


# --- graph pieces -----------------------------------------------------------------------------------

def analyzer(g: graphs.Graph, pack: str = fm.TINY_PACK, name: str = "analyzer") -> list:
    g.add("FaceStudioFaceAnalyzerLoader", {"pack": pack, "provider": "CPU", "det_size": 640}, name)
    return g.link(name)


def photo(g: graphs.Graph, file: str, name: str | None = None) -> list:
    return [g.add("LoadImage", {"image": file}, name), 0]


def encode(g: graphs.Graph, image: list, pack: str = fm.TINY_PACK, on_missing: str = "error", face: str = "largest",
           index: int = 0, threshold: float = 0.4, name: str = "encode", clip_vision: str | None = None) -> list:
    inputs = {"face_analyzer": analyzer(g, pack, f"{name}_analyzer"), "image": image, "face": face, "index": index,
              "on_missing": on_missing, "outlier_threshold": threshold}
    if clip_vision is not None:
        inputs["clip_vision"] = [g.add("CLIPVisionLoader", {"clip_name": clip_vision}), 0]
    g.add("FaceStudioIdentityEncode", inputs, name)
    return g.link(name)


def show(g: graphs.Graph, source: list) -> str:
    return g.add("PreviewAny", {"source": source})


def person(g: graphs.Graph, identity: list, persons: list | None = None, mask: list | None = None,
           mask_index: int = 0, name: str = "person") -> list:
    inputs = {"identity": identity, "weight": 1.0, "start": 0.0, "end": 1.0, "mask_index": mask_index}
    if persons is not None:
        inputs["persons"] = persons
    if mask is not None:
        inputs["mask"] = mask
    g.add("FaceStudioPerson", inputs, name)
    return g.link(name)


def apply(g: graphs.Graph, persons: list, adapter: str = FACEID, style_adapter: str | None = None) -> str:
    loader = g.add("FaceStudioAdapterLoader", {"adapter_name": adapter, "kind": "auto"}, "adapter")
    inputs = {"adapter": [loader, 0], "persons": persons, "alpha": 0.5, "style_weight": 1.0}
    if style_adapter is not None:
        inputs["style_adapter"] = [g.add("FaceStudioAdapterLoader", {"adapter_name": style_adapter, "kind": "auto"},
                                         "style_adapter"), 0]
    return g.insert_model_node("FaceStudioApply", inputs, name="apply")


def txt2img(env, seed: int = 0) -> graphs.Graph:
    return graphs.txt2img(env["checkpoint"], output="latent", seed=seed, steps=1)


def masks(g: graphs.Graph, *values: float, width: int = 64, height: int = 64) -> list:
    """A MASK batch of solid masks (SolidMask -> MaskToImage -> ImageBatch -> ImageToMask)."""
    images = [[g.add("MaskToImage", {"mask": [g.add("SolidMask", {"value": v, "width": width, "height": height}), 0]}),
               0] for v in values]
    batch = images[0]
    for image in images[1:]:
        batch = [g.add("ImageBatch", {"image1": batch, "image2": image}), 0]
    return [g.add("ImageToMask", {"image": batch, "channel": "red"}), 0]


# --- good prompts: the host must still run these after any bad one ----------------------------------

_salt = itertools.count(1)


def good_identity_prompt(env) -> tuple[dict, Callable]:
    g = graphs.Graph()
    # A new threshold each time: the executor runs the node again instead of answering from its cache.
    encode(g, photo(g, "fs_bad_face.png"), threshold=0.4 - next(_salt) * 1e-4)
    show(g, [g["encode"], 1])
    return g.prompt, lambda host, result: "1 shot(s) used of 1 photo(s)" in host.output(result, g["encode"], 1)


def good_real_face_prompt(env) -> tuple[dict, Callable]:
    """The trained detector on the astronaut at full size: it finds the face the small-face case hides."""
    g = graphs.Graph()
    encode(g, photo(g, "fs_bad_astronaut.png"), pack=fm.REAL_PACK, threshold=0.4 - next(_salt) * 1e-4)
    show(g, [g["encode"], 1])
    return g.prompt, lambda host, result: host.output(result, g["encode"]).det_scores[0] > 0.8


def good_apply_prompt(env) -> tuple[dict, Callable]:
    g = txt2img(env, seed=next(_salt))
    apply(g, person(g, encode(g, photo(g, "fs_bad_face.png"))))
    return g.prompt, lambda host, result: torch.isfinite(host.output(result, g["sampler"])["samples"]).all()


def good_identity_file_prompt(env) -> tuple[dict, Callable]:
    g = graphs.Graph()
    show(g, [g.add("FaceStudioIdentityLoad", {"identity_file": GOOD_IDENTITY}, "load"), 0])
    return g.prompt, lambda host, result: (host.output(result, g["load"]).embedding.tobytes()
                                           == env["identity"].embedding.tobytes())


GOOD = {"identity": good_identity_prompt, "real": good_real_face_prompt, "apply": good_apply_prompt,
        "identity file": good_identity_file_prompt}


def assert_still_serving(comfy_host, env, kind: str) -> None:
    prompt, check = GOOD[kind](env)
    result = comfy_host.run(prompt)
    assert result.success, f"the host did not run a good prompt after the bad one: {result.error}"
    assert check(comfy_host, result)


# --- the table of bad inputs ------------------------------------------------------------------------

@dataclass
class Bad:
    """A graph with one bad input, the node that must fail, and what its message must say."""

    build: Callable[[dict], graphs.Graph]  # env -> graph; the failing node is named "bad"
    says: tuple[str, ...]
    good: str = "identity"  # which good prompt follows
    marks: tuple = field(default=())


def _encode_bad(file: str, pack: str = fm.TINY_PACK, **kw) -> Callable:
    def build(env):
        g = graphs.Graph()
        show(g, [encode(g, photo(g, file), pack=pack, name="bad", **kw)[0], 1])
        return g
    return build


def _batch_bad(on_missing: str, second: str = "fs_bad_black.png", first: str = "fs_bad_face.png") -> Callable:
    def build(env):
        g = graphs.Graph()
        batch = [g.add("ImageBatch", {"image1": photo(g, first), "image2": photo(g, second)}), 0]
        show(g, [encode(g, batch, on_missing=on_missing, name="bad")[0], 1])
        return g
    return build


def _loader_bad(name: str, kind: str = "auto") -> Callable:
    def build(env):
        g = graphs.Graph()
        show(g, [g.add("FaceStudioAdapterLoader", {"adapter_name": name, "kind": kind}, "bad"), 0])
        return g
    return build


def _identity_bad(name: str) -> Callable:
    def build(env):
        g = graphs.Graph()
        show(g, [g.add("FaceStudioIdentityLoad", {"identity_file": name}, "bad"), 0])
        return g
    return build


def _analyzer_bad(name: str) -> Callable:
    def build(env):
        g = graphs.Graph()
        show(g, analyzer(g, name, "bad"))
        return g
    return build


def _apply_bad(adapter: str = FACEID, style_adapter: str | None = None, clip_vision: str | None = None) -> Callable:
    def build(env):
        g = txt2img(env)
        apply(g, person(g, encode(g, photo(g, "fs_bad_face.png"), clip_vision=clip_vision)), adapter, style_adapter)
        g.nodes["bad"] = g["apply"]
        return g
    return build


def _masks_bad(mask_values: tuple[float, ...], persons: int, index_of_last: int) -> Callable:
    """`persons` persons sharing one mask batch; the last one takes mask `index_of_last`."""
    def build(env):
        g = txt2img(env)
        batch = masks(g, *mask_values)
        identity = encode(g, photo(g, "fs_bad_face.png"))
        people = None
        for i in range(persons):
            last = i == persons - 1
            people = person(g, identity, people, batch, index_of_last if last else i, "bad" if last else f"p{i}")
        apply(g, people)
        return g
    return build


def _missing_checkpoint(env):
    g = graphs.txt2img("fs_bad_no_such_checkpoint.safetensors", output="latent")
    g.nodes["bad"] = g["checkpoint"]
    return g


BAD_INPUTS = {
    # photos
    "no face in the photo": Bad(_encode_bad("fs_bad_gradient.png", fm.REAL_PACK),
                                ("No face found in image 0 (1280x886)", "clearly visible"), "real"),
    "face too small to detect": Bad(_encode_bad("fs_bad_small_face.png", fm.REAL_PACK),
                                    ("No face found in image 0 (2048x2048)", "narrower than about 52 px",
                                     "crop the photo closer around the face"), "real"),
    # YuNet "finds" a 6x7 px face in the upscaled thumbnail: refused as too small to recognise.
    "8x8 photo": Bad(_encode_bad("fs_bad_8x8.png", fm.REAL_PACK), (
        "The face found in image 0 is only", "too small to recognise", "at least 20 px wide"), "real"),
    "8x8 photo with the tiny detector": Bad(_encode_bad("fs_bad_8x8_black.png"), (
        "No face found in image 0 (8x8)", "only 8x8 pixels, too small", "at least 20 px wide")),
    "index of a face the photo lacks": Bad(_encode_bad("fs_bad_face.png", face="index", index=5),
                                           ("Image 0 has 1 face(s)", "there is no face 5")),
    "batch, one photo without a face, on_missing error": Bad(_batch_bad("error"), (
        "No face found in image 1 (640x640)", "set on_missing to 'skip'")),
    "batch, no photo with a face, on_missing skip": Bad(_batch_bad("skip", first="fs_bad_black.png"), (
        "no usable face in any of the 2 photo(s)", "image 0: no face", "image 1: no face")),
    # masks
    "more people than masks": Bad(_masks_bad((1.0,), 2, 1), ("mask_index 1 is out of range", "1 mask(s)", "use 0..0"),
                                  "apply"),
    "mask_index past the mask batch": Bad(_masks_bad((1.0, 0.5), 1, 5), (
        "mask_index 5 is out of range", "2 mask(s)", "use 0..1"), "apply"),
    "all-zero mask": Bad(_masks_bad((0.0,), 1, 0), ("mask_index 0", "all zero"), "apply"),
    # adapters
    "SDXL adapter on an SD1.5 model": Bad(_apply_bad(FACEID_SDXL), (
        f"{FACEID_SDXL} is an SDXL adapter (context width 2048)", "cannot be used on an SD1.5 model",
        "load the adapter made for this model's base"), "apply"),
    "style adapter as the FaceID adapter": Bad(_apply_bad(STYLE), (
        f"{STYLE} is IP-Adapter (image prompt), a style (image-prompt) adapter",
        "connect a FaceID adapter as 'adapter'"), "apply"),
    "FaceID adapter as the style adapter": Bad(_apply_bad(FACEID, FACEID), (
        f"{FACEID} is IP-Adapter FaceID, a face-identity adapter",
        "connect an image-prompt (style) adapter as 'style_adapter'"), "apply"),
    "FaceID Plus with an identity lacking CLIP features": Bad(_apply_bad(PLUS), (
        f"{PLUS} is IP-Adapter FaceID Plus", "has none",
        "connect a CLIP vision model (ViT-H) to FaceStudio Encode Identity"), "apply"),
    # The tests' ViT-L (1024 wide) where the FaceID Plus adapter reads ViT-H's 1280.
    "FaceID Plus with CLIP features of another CLIP model": Bad(
        _apply_bad(PLUS, clip_vision=clip_models.VITL_NAME), (PLUS, "1024", "1280", "CLIP vision model"), "apply"),
    "truncated adapter file": Bad(_loader_bad(TRUNCATED), (f"{TRUNCATED} is truncated or corrupt", "Download it again")),
    "a LoRA in the adapter folder": Bad(_loader_bad(LORA), (f"{LORA} is not an IP-Adapter", "looks like a LoRA",
                                                            "models/loras")),
    "adapter kind that contradicts the file": Bad(_loader_bad(FACEID, "image-prompt-plus"), (
        f"{FACEID} was set to kind 'image-prompt-plus'", "choose faceid or 'auto'")),
    # identity files
    "truncated identity file": Bad(_identity_bad(CUT_IDENTITY), (
        "cut_00001.safetensors (in ", "truncated or corrupt", "Save the identity again"), "identity file"),
    "an adapter saved as an identity": Bad(_identity_bad(NOT_IDENTITY), (
        "adapter_00001.safetensors (in ", "is not a FaceStudio identity file",
        "pick a file saved by FaceStudio Save Identity"), "identity file"),
    # names that do not exist
    "adapter name that does not exist": Bad(_loader_bad("fs_bad_no_such_adapter.safetensors"), (
        "No adapter file 'fs_bad_no_such_adapter.safetensors' in models/ipadapter", "Put it there")),
    "face pack name that does not exist": Bad(_analyzer_bad("fs_bad_no_such_pack"), (
        "No insightface model pack 'fs_bad_no_such_pack'", fm.TINY_PACK, "Put a pack")),
    "identity file name that does not exist": Bad(_identity_bad("fs_bad/no_such_00001.safetensors"), (
        "No identity file 'fs_bad/no_such_00001.safetensors'", "Save one with FaceStudio Save Identity"),
        "identity file"),
    "checkpoint name that does not exist": Bad(_missing_checkpoint, (
        "fs_bad_no_such_checkpoint.safetensors", "not in")),
}


@pytest.mark.parametrize("case", [pytest.param(bad, id=name, marks=bad.marks) for name, bad in BAD_INPUTS.items()])
def test_bad_input_fails_its_node_clearly_and_the_host_goes_on(comfy_host, env, case):
    g = case.build(env)
    result = comfy_host.run(g.prompt)
    assert not result.success, "the bad input was accepted"
    error = result.error
    if result.error_type != "validation":
        assert result.error_node == g["bad"], result.error
        # The dialog's type name: the pack's own, not its module's file path ("/.../custom_nodes/...").
        assert "/" not in result.error_type and "_x_" not in result.error_type, result.error_type
    elif g.prompt[g["bad"]]["class_type"].startswith("FaceStudio"):
        # v0.33 refuses a file name outside the combo's list before the node runs; the node's own message
        # (what 0.3.64 shows) is checked on the same value.
        error = comfy_host.refusal(g.prompt, g["bad"])
    for part in case.says:
        assert part in error, f"{part!r} not in the message: {error}"
    assert_still_serving(comfy_host, env, case.good)


# --- inputs that must be accepted -------------------------------------------------------------------

def run_encode(comfy_host, image_graph: Callable[[graphs.Graph], list], **kw):
    g = graphs.Graph()
    encode(g, image_graph(g), threshold=0.4 - next(_salt) * 1e-4, **kw)
    show(g, [g["encode"], 1])
    result = comfy_host.run(g.prompt)
    assert result.success, result.error
    return comfy_host.output(result, g["encode"]), comfy_host.output(result, g["encode"], 1)


def test_grayscale_16_bit_and_rgba_photos_encode_like_the_rgb_one(comfy_host, env):
    rgb, _ = run_encode(comfy_host, lambda g: photo(g, "fs_bad_face.png"))
    # An RGBA file (LoadImage keeps the colour) and an RGBA tensor (JoinImageWithAlpha): the alpha is dropped,
    # not composited, so the face under the transparent part embeds as in the RGB photo.
    rgba_file, _ = run_encode(comfy_host, lambda g: photo(g, "fs_bad_rgba.png"))
    rgba_tensor, _ = run_encode(comfy_host, lambda g: [g.add("JoinImageWithAlpha", {
        "image": photo(g, "fs_bad_face.png"), "alpha": [g.add("SolidMask", {"value": 0.5, "width": 640,
                                                                            "height": 640}), 0]}), 0])
    assert rgba_file.embedding.tobytes() == rgb.embedding.tobytes()
    assert rgba_tensor.embedding.tobytes() == rgb.embedding.tobytes()
    gray, _ = run_encode(comfy_host, lambda g: photo(g, "fs_bad_gray.png"))
    gray16, _ = run_encode(comfy_host, lambda g: photo(g, "fs_bad_gray16.png"))
    for identity in (gray, gray16):
        assert identity.shot_count == 1 and identity.det_scores[0] > 0.99
        np.testing.assert_allclose(identity.bboxes, rgb.bboxes, atol=1.0)
    assert float(gray.embedding @ gray16.embedding) > 0.999  # the same gray values, 8 or 16 bits per pixel


def test_a_4096_px_photo_is_detected_in_its_own_pixels(comfy_host, env):
    small, _ = run_encode(comfy_host, lambda g: photo(g, "fs_bad_face.png"))
    huge, _ = run_encode(comfy_host, lambda g: photo(g, "fs_bad_huge.png"))
    assert huge.shot_count == 1
    np.testing.assert_allclose(huge.bboxes / (4096 / 640), small.bboxes, atol=2.0)
    assert float(huge.embedding @ small.embedding) > 0.9


def test_a_batch_with_a_faceless_photo_and_on_missing_skip_keeps_the_others(comfy_host, env):
    identity, report = run_encode(comfy_host, lambda g: [g.add("ImageBatch", {
        "image1": photo(g, "fs_bad_face.png"), "image2": photo(g, "fs_bad_black.png")}), 0], on_missing="skip")
    assert identity.used == (0,) and identity.photo_count == 2
    assert "image 1 dropped: no face: No face found in image 1" in report


def test_a_mask_of_another_size_is_stretched_to_the_latent(comfy_host, env):
    """A 40x24 mask on a 64x64 image is resized to the latent (documented), not refused; it still confines."""
    def latent(mask_file: str | None):
        g = txt2img(env, seed=7)
        mask = None
        if mask_file:
            mask = [g.add("LoadImageMask", {"image": mask_file, "channel": "red"}), 0]
        apply(g, person(g, encode(g, photo(g, "fs_bad_face.png")), mask=mask))
        result = comfy_host.run(g.prompt)
        assert result.success, result.error
        return comfy_host.output(result, g["sampler"])["samples"]

    g = txt2img(env, seed=7)
    plain = comfy_host.output(comfy_host.run(g.prompt), g["sampler"])["samples"]
    whole, left = latent(None), latent("fs_bad_left_mask.png")
    assert not torch.equal(left, whole) and not torch.equal(left, plain)
    # The right half of the latent is outside the mask: there the person acts less than everywhere.
    assert (left[..., 4:] - plain[..., 4:]).abs().mean() < (whole[..., 4:] - plain[..., 4:]).abs().mean()


# --- the same over HTTP: the server process survives a run of bad prompts ---------------------------

def test_the_server_answers_bad_prompts_with_errors_and_runs_the_next(comfy_server):
    face_photos.install_packs(comfy_server.models)
    inputs = comfy_server.base / "input"
    photos = _photos()
    for name in ("fs_bad_face.png", "fs_bad_8x8.png", "fs_bad_huge.png", "fs_bad_black.png"):
        photos[name].save(inputs / name)
    identities = comfy_server.base / "output" / "facestudio" / "identities"
    identities.mkdir(parents=True, exist_ok=True)
    (identities / "cut_00001.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")

    bad = []
    for file, says in (("fs_bad_8x8.png", "too small to recognise"), ("fs_bad_black.png", "No face found in image 0")):
        g = graphs.Graph()
        show(g, [encode(g, photo(g, file))[0], 1])
        bad.append((g.prompt, says))
    g = graphs.Graph()
    show(g, [g.add("FaceStudioIdentityLoad", {"identity_file": "cut_00001.safetensors"}), 0])
    bad.append((g.prompt, "truncated or corrupt"))
    g = graphs.Graph()
    show(g, [g.add("FaceStudioAdapterLoader", {"adapter_name": "nope.safetensors", "kind": "auto"}), 0])
    bad.append((g.prompt, "No adapter file 'nope.safetensors'"))
    for prompt, says in bad:
        error = comfy_server.refusal(prompt, timeout=120)
        # A name outside the adapter list: v0.33's /prompt refuses it by name before the node runs.
        assert error is not None and (says in error or "nope.safetensors' not in" in error), error
    for file in ("fs_bad_face.png", "fs_bad_huge.png"):
        g = graphs.Graph()
        encode(g, photo(g, file))
        g.add("FaceStudioIdentitySave", {"identity": g.link("encode"), "filename_prefix": f"served/{file[:-4]}"})
        entry = comfy_server.run(g.prompt, timeout=120)
        assert execution_error(entry) is None and entry["status"]["completed"]
        assert (identities / "served" / f"{file[:-4]}_00001.safetensors").is_file()
    assert comfy_server.process.poll() is None
