"""training/dataset.py and FaceStudio Prepare Dataset, on real parts: the trained YuNet/SFace pack through
insightface, the tiny checkpoint's CLIP text encoder and TAESD VAE, a tiny seeded CLIP vision model (the
host's own class) and, for the node, the host's executor with its loaders.

The folder: the astronaut without a caption and mirrored (off-centre in a wider JPEG) with a caption longer
than 77 tokens, which are kept; insightface's group photo (4 faces left in its centre square), a faceless
gradient, a face too small to recognise, a file that is not an image and a truncated JPEG, which are skipped.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facestudio_testing import clip_models, face_photos
from facestudio_testing import face_models as fm

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

RES = 192  # the smallest size at which YuNet still finds the four faces left in t1's centre square
LONG_CAPTION = "a photo of an astronaut in a white space suit, smiling, " * 8  # about 100 tokens
KEPT = ("a_astronaut.png", "b_mirrored.jpg")
SKIPPED = {  # file: what its reason says
    "c_group.jpg": "4 faces found",
    "d_faceless.png": "No face found",
    "e_small.png": "too small to recognise",
    "f_not_an_image.png": "not an image",
    "g_truncated.jpg": "truncated",
}
MIRRORED_OFFSET = 96  # the mirrored astronaut sits at x 96..608 of a 704 x 512 JPEG: its centre square


def _encoded(image: Image.Image, format: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **({"quality": 95} if format == "JPEG" else {}))
    return out.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    from skimage import data

    astronaut = data.astronaut()
    wide = np.full((512, 704, 3), 90, np.uint8)
    wide[:, MIRRORED_OFFSET:MIRRORED_OFFSET + 512] = astronaut[:, ::-1]
    small = np.full((RES, RES, 3), 40, np.uint8)
    small[96:126, 96:126] = np.asarray(Image.fromarray(astronaut).resize((30, 30), Image.LANCZOS))
    jpeg = _encoded(Image.fromarray(astronaut), "JPEG")
    return {
        "a_astronaut.png": _encoded(Image.fromarray(astronaut), "PNG"),
        "b_mirrored.jpg": _encoded(Image.fromarray(wide), "JPEG"),
        "b_mirrored.txt": LONG_CAPTION.encode(),
        "c_group.jpg": _encoded(Image.fromarray(face_photos.t1()), "JPEG"),
        "d_faceless.png": _encoded(Image.fromarray(face_photos.faceless(256, 256)), "PNG"),
        "e_small.png": _encoded(Image.fromarray(small), "PNG"),
        "f_not_an_image.png": b"this is a text file with an image's name",
        "g_truncated.jpg": jpeg[:len(jpeg) // 2],
        ".hidden.png": _encoded(Image.fromarray(astronaut), "PNG"),  # hidden: never read
        "notes.txt": b"a caption file without an image: ignored",
    }


def write_folder(folder: Path, files: dict[str, bytes], names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if names is None or name in names:
            (folder / name).write_bytes(content)
    return folder


@pytest.fixture(scope="module")
def ds(booted):
    return booted.pack_module("training.dataset")


@pytest.fixture(scope="module")
def text_and_vae(booted, tiny_sd15_file):
    """The tiny checkpoint's CLIP (full-size CLIP-L) and TAESD VAE, as CheckpointLoaderSimple gives them."""
    import comfy.sd

    _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_model=False)
    return clip, vae


@pytest.fixture(scope="module")
def prepared(ds, real, tiny_clip, text_and_vae, files, tmp_path_factory):
    """The mixed folder, prepared once: (folder, EncodedDataset)."""
    clip, vae = text_and_vae
    folder = write_folder(tmp_path_factory.mktemp("dataset") / "photos", files)
    return folder, ds.prepare_dataset(folder, real, tiny_clip, vae, clip, resolution=RES)


def centre_square(data: bytes) -> np.ndarray:
    """The crop the module documents, made here with PIL directly."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((RES, RES), Image.LANCZOS))


def as_image(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]


def test_good_photos_are_kept_and_every_other_one_is_reported(prepared, real):
    folder, dataset = prepared
    assert dataset.files == KEPT and len(dataset) == 2
    assert [name for name, _ in dataset.skipped] == list(SKIPPED)
    for name, reason in dataset.skipped:
        assert SKIPPED[name] in reason, (name, reason)
    assert dataset.captions == ("", LONG_CAPTION.strip()) and dataset.truncated == ("b_mirrored.jpg",)
    assert dataset.recognizer == real.recognizer_id and dataset.resolution == RES and dataset.from_cache == 0
    assert all(len(value) == 16 for value in vars(dataset.fingerprints).values())
    report = dataset.report()
    assert f"2 of 7 image(s) kept at {RES}x{RES}" in report and str(folder) in report
    for name, reason in dataset.skipped:
        assert f"  - {name}: {reason}" in report
    assert "Captions cut to their first 77 tokens (1):\n  - b_mirrored.jpg" in report
    assert "128-d embeddings" in report  # SFace's: the report says an adapter takes 512-d ones
    # Kept examples, skipped-for-their-face photos: one cache entry each; unreadable files none.
    assert len(list((folder / ".facestudio_cache").glob("*.safetensors"))) == 5


def test_the_examples_are_what_the_pack_and_the_host_encoders_give(prepared, files, booted, faces, real, tiny_clip,
                                                                 text_and_vae):
    _, dataset = prepared
    clip, vae = text_and_vae
    batch = dataset.batch
    assert batch.latents.shape == (2, 4, RES // 8, RES // 8)
    assert batch.context.shape == (2, 77, 768) and batch.text_embeds.shape == (2, 768)
    assert batch.image_embeds.shape == (2, clip_models.TINY_CLIP_CONFIG["projection_dim"])
    assert batch.faces.shape == (2, real.embedding_dim)
    torch.testing.assert_close(batch.faces.norm(dim=-1), torch.ones(2))
    encode_identity = booted.pack_module("encoders.multishot").encode_identity
    style = booted.pack_module("encoders.style")
    for row, name in enumerate(KEPT):
        crop = centre_square(files[name])
        # The face: Encode Identity's embedding of the same crop.
        identity = encode_identity(real, [as_image(crop)])
        np.testing.assert_allclose(batch.faces[row].numpy(), identity.embedding, rtol=1e-5, atol=1e-6)
        # The image embedding: of the crop with its face painted out, not of the crop itself.
        (face,) = faces.detect_and_embed(real, crop)
        masked = style.mask_boxes(as_image(crop), [face.bbox[None]], margin=0.25)
        torch.testing.assert_close(batch.image_embeds[row], tiny_clip.encode_image(masked)["image_embeds"][0].float())
        plain = tiny_clip.encode_image(as_image(crop))["image_embeds"][0].float()
        assert (batch.image_embeds[row] - plain).abs().max() > 1e-3
    torch.testing.assert_close(batch.latents[1], vae.encode(as_image(centre_square(files["b_mirrored.jpg"])))[0].float())
    # The long caption: its first 77-token chunk, through the host's CLIP.
    tokens = {k: v[:1] for k, v in clip.tokenize(LONG_CAPTION.strip()).items()}
    context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    torch.testing.assert_close(batch.context[1], context[0].float())
    torch.testing.assert_close(batch.text_embeds[1], pooled[0].float())
    assert not torch.equal(batch.context[0], batch.context[1])  # the empty prompt is another context


NO_CALLS = {"detect": 0, "clip_vision": [], "vae": [], "text": 0}


class Calls:
    """Counts the calls of the real encoders (and the batch sizes they got), then calls them."""

    def __init__(self, monkeypatch, real, tiny_clip, clip, vae):
        self.counts = {k: (list(v) if isinstance(v, list) else v) for k, v in NO_CALLS.items()}
        spies = ((real.detector, "detect", "detect"), (tiny_clip, "encode_image", "clip_vision"),
                 (vae, "encode", "vae"), (clip, "encode_from_tokens", "text"))
        for owner, attribute, name in spies:
            monkeypatch.setattr(owner, attribute, self._spy(getattr(owner, attribute), name))

    def _spy(self, function, name):
        def call(*args, **kwargs):
            if isinstance(self.counts[name], list):
                self.counts[name].append(int(args[0].shape[0]))
            else:
                self.counts[name] += 1
            return function(*args, **kwargs)
        return call

    def take(self) -> dict:
        counts = self.counts
        self.counts = {k: (list(v) if isinstance(v, list) else v) for k, v in NO_CALLS.items()}
        return counts


def test_the_cache_is_reused_and_only_what_changed_is_encoded(ds, prepared, real, tiny_clip, text_and_vae, tmp_path,
                                                              monkeypatch):
    from safetensors import safe_open

    clip, vae = text_and_vae
    first = prepared[1]
    folder = tmp_path / "photos"
    shutil.copytree(prepared[0], folder)  # photos and cache
    calls = Calls(monkeypatch, real, tiny_clip, clip, vae)

    def prepare():
        return ds.prepare_dataset(folder, real, tiny_clip, vae, clip, resolution=RES)

    again = prepare()
    assert calls.take() == NO_CALLS
    assert again.from_cache == 2 and again.files == first.files and again.skipped == first.skipped
    assert again.truncated == first.truncated
    for name in ("latents", "context", "text_embeds", "image_embeds", "faces"):
        assert torch.equal(getattr(again.batch, name), getattr(first.batch, name)), name
    assert "(2 from the cache, 0 encoded)" in again.report()

    (folder / "a_astronaut.txt").write_text("an astronaut\n")  # a new caption: that photo only
    changed = prepare()
    counts = calls.take()
    assert counts["detect"] >= 1 and counts["clip_vision"] == [1] and counts["vae"] == [1] and counts["text"] == 1
    assert changed.captions[0] == "an astronaut" and changed.from_cache == 1
    assert not torch.equal(changed.batch.context[0], first.batch.context[0])
    torch.testing.assert_close(changed.batch.faces, first.batch.faces)

    photo = Image.open(folder / "b_mirrored.jpg")  # another photo under the same name: that photo only
    Image.eval(photo, lambda v: min(255, v + 30)).save(folder / "b_mirrored.jpg", quality=95)
    brighter = prepare()
    counts = calls.take()
    assert counts["clip_vision"] == [1] and counts["vae"] == [1] and brighter.from_cache == 1
    assert not torch.equal(brighter.batch.latents[1], first.batch.latents[1])
    assert prepare().from_cache == 2 and calls.take() == NO_CALLS

    # A damaged entry (half of its bytes) is not trusted: the photo is encoded again, the entry rewritten.
    # Every entry of the photo is damaged: the one from before its caption changed is still there (entries
    # are never pruned), and which of the two a directory listing gives last depends on the file system.
    for path in (folder / ".facestudio_cache").glob("*.safetensors"):
        with safe_open(str(path), "pt") as stream:
            photo = stream.metadata()["file"]
        if photo == "a_astronaut.png":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    repaired = prepare()
    counts = calls.take()
    assert counts["clip_vision"] == [1] and counts["vae"] == [1] and repaired.from_cache == 1
    torch.testing.assert_close(repaired.batch.latents, brighter.batch.latents)
    torch.testing.assert_close(repaired.batch.image_embeds, brighter.batch.image_embeds)
    assert prepare().from_cache == 2 and calls.take() == NO_CALLS
    assert not list((folder / ".facestudio_cache").glob("*.tmp"))


def test_a_folder_without_a_usable_photo_is_an_error_and_writes_no_cache(ds, real, tiny_clip, text_and_vae, files,
                                                                          tmp_path):
    clip, vae = text_and_vae
    folder = write_folder(tmp_path / "bad", files, {"d_faceless.png", "e_small.png", "f_not_an_image.png"})
    cache = tmp_path / "cache"
    with pytest.raises(ds.DatasetError) as raised:
        ds.prepare_dataset(folder, real, tiny_clip, vae, clip, resolution=RES, cache_dir=cache)
    message = str(raised.value)
    assert f"No usable photo in the dataset folder {folder} (3 image(s))" in message
    for name in ("d_faceless.png", "e_small.png", "f_not_an_image.png"):
        assert f"  - {name}: " in message and SKIPPED[name] in message
    assert not cache.exists() and not (folder / ".facestudio_cache").exists()


def test_folders_and_settings_that_cannot_be_used(ds, real, tiny_clip, text_and_vae, files, tmp_path):
    clip, vae = text_and_vae
    with pytest.raises(ds.DatasetError, match=r"does not exist .*\.jpg, \.jpeg, \.png, \.webp, \.bmp"):
        ds.prepare_dataset(tmp_path / "missing", real, tiny_clip, vae, clip)
    empty = write_folder(tmp_path / "empty", {"notes.txt": b"x", ".hidden.png": files[".hidden.png"]})
    (empty / "sub").mkdir()
    (empty / "sub" / "a.png").write_bytes(files["a_astronaut.png"])  # not recursive
    with pytest.raises(ds.DatasetError, match=rf"{empty} holds no images: put photos \(\.jpg, \.jpeg"):
        ds.prepare_dataset(empty, real, tiny_clip, vae, clip)
    good = write_folder(tmp_path / "good", files, {"a_astronaut.png"})
    with pytest.raises(ds.DatasetError, match="multiple of 64 px .* not 200: use 192 or 256"):
        ds.prepare_dataset(good, real, tiny_clip, vae, clip, resolution=200)
    with pytest.raises(ds.DatasetError, match="expected a CLIP_VISION"):
        ds.prepare_dataset(good, real, vae, vae, clip)
    # The node's folder: an absolute path, or a folder inside the input directory, nothing else.
    inputs = tmp_path / "input"
    (inputs / "people").mkdir(parents=True)
    assert ds.resolve_dataset_folder(str(good), inputs) == good
    assert ds.resolve_dataset_folder(" people ", inputs) == (inputs / "people").resolve()
    for folder, message in (("", "No dataset folder given"), ("../good", "leads outside ComfyUI's input directory"),
                            (".", "is the input directory itself"), ("nobody", "does not exist inside ComfyUI's input")):
        with pytest.raises(ds.DatasetError, match=message):
            ds.resolve_dataset_folder(folder, inputs)


def test_photos_are_turned_upright_and_centre_cropped(ds):
    """EXIF orientation 6 (the camera held rotated): the pixels as shown, not as stored."""
    stored = np.zeros((100, 160, 3), np.uint8)
    stored[:, :, 0] = np.arange(160, dtype=np.uint8)[None, :]
    stored[:, :, 1] = np.arange(100, dtype=np.uint8)[:, None] * 2
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(stored).save(out, format="PNG", exif=exif)
    upright = Image.open(io.BytesIO(out.getvalue())).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (100, 160)
    expected = np.asarray(upright.crop((0, 30, 100, 130)).resize((64, 64), Image.LANCZOS))
    np.testing.assert_array_equal(ds.load_square(out.getvalue(), 64), expected)


def test_the_node_through_the_executor(comfy_host, booted, tiny_sd15, files):
    import nodes

    info = nodes.NODE_CLASS_MAPPINGS["FaceStudioPrepareDataset"].GET_NODE_INFO_V1()
    assert info["category"] == "FaceStudio/training" and info["display_name"] == "FaceStudio Prepare Dataset"
    assert info["output"] == ["FACESTUDIO_DATASET", "STRING"]
    assert info["input"]["required"]["resolution"][1]["step"] == 64
    real_pack, _ = face_photos.install_packs(booted.models)
    clip_vision = clip_models.install_vitl(booted.models)
    write_folder(booted.base / "input" / "fs_dataset", files, {"a_astronaut.png", "f_not_an_image.png"})
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_vision}},
        "3": face_photos.analyzer_node(real_pack),
        "4": {"class_type": "FaceStudioPrepareDataset",
              "inputs": {"folder": "fs_dataset", "face_analyzer": ["3", 0], "clip_vision": ["2", 0], "vae": ["1", 2],
                         "clip": ["1", 1], "resolution": RES}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    }
    result = comfy_host.run(prompt)
    assert result.success, result.error
    dataset, report = comfy_host.output(result, "4"), comfy_host.output(result, "4", 1)
    assert dataset.files == ("a_astronaut.png",) and dataset.batch.image_embeds.shape == (1, 768)
    assert report == dataset.report() and "1 of 2 image(s) kept" in report
    assert "  - f_not_an_image.png: not an image" in report
    prompt["4"]["inputs"]["folder"] = "../outside"
    refused = comfy_host.run(prompt)
    assert not refused.success and refused.error_node == "4"
    assert "leads outside ComfyUI's input directory" in refused.error
