"""A folder of photos -> an `EncodedDataset`: every example encoded once into a TrainingBatch, cached on disk.

Per photo (with an optional same-stem .txt caption; none or empty is the empty prompt): read with PIL
(EXIF orientation applied, RGB), centre-cropped to a square and resized to `resolution`; on that crop the
pack's insightface path finds exactly one face (encoders/faces.py) and gives its L2-normed embedding
(e_f); the face is painted out as FaceStudio Encode Style paints faces (encoders/style.py mask_boxes)
and the result encoded by the host's CLIP vision model (e_h); the unmasked crop goes through the VAE
(the latent, in the VAE's format); the caption through the host's CLIP (its context and pooled e_T),
truncated to its first 77-token chunk so every example has the same context length. Photos that cannot
be used are skipped with their reason, never silently.

The cache (`<folder>/.facestudio_cache/` by default) holds one .safetensors file per photo, named by a
hash of everything its encoding depends on (see `_entry_key`): a second run with the same inputs runs no
encoder, and a changed photo, caption, setting or model is encoded again. Files are written whole or not
at all (a temporary file, then os.replace); one that does not read back as expected is encoded again.

No node code here: the host's objects (CLIP_VISION, VAE, CLIP) and the pack's FaceAnalyzer are passed in.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..attention.facestudio_fusion import ARCFACE_WIDTH
from ..encoders.faces import (FaceAnalyzer, FaceNotFound, RecognizerIdentity, _file_sha256_16,
                              detect_and_embed, too_small_message)
from ..encoders.style import mask_boxes
from .objective import TrainingBatch

__all__ = ["IMAGE_EXTENSIONS", "CACHE_FOLDER", "DatasetError", "Fingerprints", "EncodedDataset", "prepare_dataset",
           "dataset_images", "load_square", "resolve_dataset_folder", "folder_signature", "encoder_fingerprints"]

logger = logging.getLogger("FaceStudio.training")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_FOLDER = ".facestudio_cache"
# Bump when what an entry holds, or how it is computed, changes: older entries then miss and are re-encoded.
CACHE_VERSION = "1"
# Photos per CLIP vision / VAE call: one call per few photos, at a memory cost of a few images.
ENCODE_BATCH = 8
# SD and SDXL VAEs make one latent cell of 8 px and the UNet halves it three times: 64 px divides evenly.
RESOLUTION_STEP = 64
# Elements read from every state-dict tensor for a model's fingerprint (see `_model_fingerprint`).
SAMPLES_PER_TENSOR = 16
_KEPT_TENSORS = {"latent": 3, "context": 2, "text_embeds": 1, "image_embeds": 1, "face": 1}  # name: ndim


class DatasetError(ValueError):
    """A dataset folder, setting or encoder that cannot be used; the message says which and how to fix it."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


@dataclass(frozen=True)
class Fingerprints:
    """Short hashes of the encoders an EncodedDataset was made with (part of every cache entry's key)."""

    faces: str          # recognizer file sha256 + detector file sha256 + detection size and threshold
    clip_vision: str
    vae: str
    text_encoder: str


@dataclass(frozen=True, eq=False)
class EncodedDataset:
    """The kept examples of a folder, encoded, in file-name order; the skipped ones with their reasons."""

    batch: TrainingBatch                      # float32, CPU; faces [B, D]: D is the recognizer's width (512 for ArcFace)
    files: tuple[str, ...]                    # per example: the photo's file name
    captions: tuple[str, ...]                 # per example: the caption text (its .txt file; "" when none)
    skipped: tuple[tuple[str, str], ...]      # (file name, reason)
    truncated: tuple[str, ...]                # files whose caption was cut to its first 77-token chunk
    recognizer: RecognizerIdentity
    resolution: int
    mask_margin: float
    fingerprints: Fingerprints
    folder: Path
    cache_dir: Path
    from_cache: int = 0                       # examples read from the cache rather than encoded
    cache_problem: str | None = None          # why the cache could not be written, when it could not

    def __len__(self) -> int:
        return len(self.files)

    def report(self) -> str:
        encoded = len(self.files) - self.from_cache
        lines = [f"Dataset {self.folder}: {len(self.files)} of {len(self.files) + len(self.skipped)} image(s) kept at "
                 f"{self.resolution}x{self.resolution} ({self.from_cache} from the cache, {encoded} encoded).",
                 f"Face recognizer: {self.recognizer}."]
        if self.recognizer.embedding_dim != ARCFACE_WIDTH:
            lines.append(f"Note: this recognizer gives {self.recognizer.embedding_dim}-d embeddings; a FaceStudio adapter "
                         f"takes {ARCFACE_WIDTH}-d ArcFace ones (buffalo_l or antelopev2).")
        if self.skipped:
            lines.append(f"Skipped ({len(self.skipped)}):")
            lines += [f"  - {name}: {reason}" for name, reason in self.skipped]
        if self.truncated:
            lines.append(f"Captions cut to their first 77 tokens ({len(self.truncated)}):")
            lines += [f"  - {name}" for name in self.truncated]
        lines.append(f"Cache: {self.cache_dir}" + (f" (not written: {self.cache_problem})" if self.cache_problem else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------------
def resolve_dataset_folder(folder: str, input_dir: str | os.PathLike) -> Path:
    """`folder` as the node takes it: an absolute path, or a folder inside ComfyUI's input directory."""
    text = (folder or "").strip()
    if not text:
        raise DatasetError(f"No dataset folder given: type an absolute path, or the name of a folder inside "
                           f"ComfyUI's input directory ({input_dir}).")
    path = Path(text)
    if path.is_absolute():
        resolved = path
    else:
        root = Path(input_dir).resolve()
        resolved = (root / path).resolve()
        if resolved != root and root not in resolved.parents:
            raise DatasetError(f"The dataset folder {text!r} leads outside ComfyUI's input directory ({root}): give "
                               "an absolute path, or the name of a folder inside the input directory.")
        if resolved == root:
            raise DatasetError(f"{text!r} is the input directory itself ({root}): put the photos in a folder of "
                               "their own inside it and give that folder's name.")
    if not resolved.is_dir():
        where = "" if path.is_absolute() else f" inside ComfyUI's input directory ({Path(input_dir).resolve()})"
        raise DatasetError(f"The dataset folder {resolved} does not exist{where}: give an absolute path to a "
                           f"folder of photos ({', '.join(IMAGE_EXTENSIONS)}), or the name of one in the input "
                           "directory.")
    return resolved


def dataset_images(folder: str | os.PathLike) -> list[Path]:
    """The folder's photos (IMAGE_EXTENSIONS, any case), sorted by name; hidden files and subfolders left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"The dataset folder {folder} does not exist (or is not a folder): give a folder of "
                           f"photos ({', '.join(IMAGE_EXTENSIONS)}).")
    images = sorted(p for p in folder.iterdir()
                    if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise DatasetError(f"The dataset folder {folder} holds no images: put photos ({', '.join(IMAGE_EXTENSIONS)}) "
                           "in it, each with an optional caption in a .txt file of the same name.")
    return images


def folder_signature(folder: str | os.PathLike) -> str:
    """A hash of the names, sizes and times of the folder's photos and captions: changes when one does (the
    node's fingerprint, so the host runs it again after the folder changed)."""
    digest = hashlib.sha256()
    for path in dataset_images(folder):
        for file in (path, path.with_suffix(".txt")):
            if file.is_file():
                stat = file.stat()
                digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def load_square(data: bytes, resolution: int) -> np.ndarray:
    """An image file's bytes -> RGB uint8 [resolution, resolution, 3]: EXIF orientation applied, the
    centred square of the short side cropped, then resized (Lanczos). Raises PIL's errors for bad files."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes now: a truncated file fails here, not half-grey later
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: to 8 bits, not clipped to white
            image = image.convert("I").point(lambda v: v / 257).convert("L")
        rgb = image.convert("RGB")  # alpha dropped, as the host's LoadImage does
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    if square.size != (resolution, resolution):
        square = square.resize((resolution, resolution), Image.LANCZOS)
    return np.asarray(square, np.uint8).copy()


def _unreadable_reason(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image: PIL does not recognise the file's contents (a damaged file, or not an image at all)"
    if "truncated" in str(error):
        return f"the image file is truncated (PIL: {error}): copy it again, or take it out of the folder"
    return f"not a readable image ({type(error).__name__}: {error})"


def _read_files(image: Path) -> tuple[bytes, str, str | None]:
    """(the photo's bytes, its caption, None), or (b"", "", why they cannot be read)."""
    try:
        return image.read_bytes(), _read_caption(image), None
    except OSError as error:
        return b"", "", f"could not be read ({type(error).__name__}: {error})"
    except DatasetError as error:  # its caption
        return b"", "", str(error)


def _read_caption(image: Path) -> str:
    caption = image.with_suffix(".txt")
    if not caption.is_file():
        return ""
    try:
        return caption.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise DatasetError(f"its caption file {caption.name} is not UTF-8 text ({error.reason} at byte "
                           f"{error.start}): save it as UTF-8") from error


# ------------------------------------------------------------------------------------------------
# Fingerprints
# ------------------------------------------------------------------------------------------------
def _feed(digest, value) -> None:
    """Hash `value` (tensors by shape, dtype and SAMPLES_PER_TENSOR evenly spaced elements)."""
    if isinstance(value, torch.Tensor):
        digest.update(f"T{tuple(value.shape)}{value.dtype};".encode())
        flat = value.detach().reshape(-1)
        if flat.numel():
            count = min(SAMPLES_PER_TENSOR, flat.numel())
            index = (torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)).to(flat.device)  # exact in int64
            digest.update(flat[index].to("cpu", torch.float64).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        _feed(digest, torch.from_numpy(np.ascontiguousarray(value)))
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:  # a weight adapter (comfy.weight_adapter: its tensors in .weights) or a function
        digest.update(f"{type(value).__module__}.{type(value).__qualname__};".encode())
        if hasattr(value, "weights"):
            _feed(digest, value.weights)


def _model_fingerprint(host_object, what: str, extra=()) -> str:
    """A cheap fingerprint of a host model (CLIP_VISION, VAE, CLIP): every state-dict key with its shape and
    dtype, SAMPLES_PER_TENSOR elements of every tensor, and the patches (LoRA) its patcher will apply.

    Enough for a cache key, which guards against mistakes, not attacks: another model of the same
    architecture (another checkpoint, a fine-tune, a merge, a baked LoRA) changes nearly every element of
    the tensors it touches, so it changes the samples; a change of size, dtype or layout changes the keys.
    It reads 16 numbers per tensor where hashing the weights would read gigabytes. The weights a patcher
    has patched in place while loaded are read from its backup, so loading the model does not change it."""
    patcher = getattr(host_object, "patcher", None)
    module = getattr(patcher, "model", None)
    if not isinstance(module, torch.nn.Module):
        raise DatasetError(f"expected the host's {what} (one with a model patcher), got {type(host_object).__name__}: "
                           f"connect a {what} output")
    digest = hashlib.sha256(f"{type(host_object).__qualname__};".encode())
    backup = getattr(patcher, "backup", {}) or {}
    state = module.state_dict()
    for key in sorted(state):
        original = backup.get(key)
        _feed(digest, key)
        _feed(digest, original.weight if original is not None else state[key])
    _feed(digest, dict(getattr(patcher, "patches", {}) or {}))
    _feed(digest, extra)
    return digest.hexdigest()[:16]


def encoder_fingerprints(analyzer: FaceAnalyzer, clip_vision, vae, clip) -> Fingerprints:
    # The detector decides which box is masked and which face is embedded: its file counts like the recognizer's.
    detector_file = Path(getattr(analyzer.detector, "model_file", "") or "")
    detector = "?"
    if detector_file.is_file():
        stat = detector_file.stat()
        detector = _file_sha256_16(str(detector_file.resolve()), stat.st_size, stat.st_mtime_ns)
    rec = analyzer.recognizer_id
    faces = hashlib.sha256(f"{rec.sha256_16}:{rec.embedding_dim}:{detector}:{tuple(analyzer.det_size)}:"
                           f"{float(analyzer.det_thresh)}".encode()).hexdigest()[:16]
    return Fingerprints(
        faces=faces,
        clip_vision=_model_fingerprint(clip_vision, "CLIP_VISION", getattr(clip_vision, "config", None)),
        vae=_model_fingerprint(vae, "VAE", str(getattr(vae, "vae_dtype", ""))),
        # clip_layer (CLIP Set Last Layer) changes the context; tokenizer options are in the tokens' own hash.
        text_encoder=_model_fingerprint(clip, "CLIP", getattr(clip, "layer_idx", None)),
    )


def _entry_key(image_sha256: str, caption: str, tokens_hash: str, resolution: int, mask_margin: float,
               fingerprints: Fingerprints) -> str:
    """Everything an example's encoding depends on. The tokens' hash besides the text: a textual-inversion
    embedding named in the caption, or a tokenizer option, changes the tokens but not the text."""
    parts = (CACHE_VERSION, image_sha256, caption, tokens_hash, str(int(resolution)), repr(float(mask_margin)),
             fingerprints.faces, fingerprints.clip_vision, fingerprints.vae, fingerprints.text_encoder)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------------
@dataclass
class _Example:
    index: int
    name: str
    caption: str
    truncated: bool
    tensors: dict[str, torch.Tensor]


@dataclass
class _Cache:
    folder: Path
    problem: str | None = None

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def read(self, key: str) -> dict | None:
        """{"status", "tensors", metadata...} of a valid entry; None when there is none, or it is corrupt."""
        from safetensors.torch import load_file
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as stream:
                metadata = dict(stream.metadata() or {})
            tensors = load_file(str(path))
            if metadata.get("facestudio_dataset") != CACHE_VERSION or metadata.get("key") != key:
                raise ValueError("it belongs to another entry or cache version")
            if metadata.get("status") == "skipped":
                if not metadata.get("reason"):
                    raise ValueError("a skipped entry without its reason")
            elif metadata.get("status") == "kept":
                for name, ndim in _KEPT_TENSORS.items():
                    tensor = tensors.get(name)
                    if tensor is None or tensor.ndim != ndim or not torch.isfinite(tensor).all():
                        raise ValueError(f"tensor {name!r} is missing or malformed")
                if abs(float(tensors["face"].norm()) - 1.0) > 1e-3:
                    raise ValueError("its face embedding is not unit-norm")
            else:
                raise ValueError(f"unknown status {metadata.get('status')!r}")
        except Exception as error:  # a half-copied or damaged file: encode that photo again
            logger.warning("Cache entry %s is unusable (%s): encoding the photo again.", path, error)
            return None
        return {**metadata, "tensors": tensors}

    def write(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Whole or not at all: a temporary file in the same folder, then os.replace. A cache that cannot be
        written (read-only folder, full disk) is reported, not fatal: the dataset is still returned."""
        from safetensors.torch import save_file

        if self.problem is not None:
            return
        temporary = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.", suffix=".tmp")
            os.close(handle)
            save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, temporary,
                      metadata={"facestudio_dataset": CACHE_VERSION, "key": key, **metadata})
            os.replace(temporary, self.path(key))
            temporary = None
        except OSError as error:
            self.problem = f"{type(error).__name__}: {error}"
            logger.warning("Could not write the dataset cache in %s (%s): the examples are encoded but not cached.",
                           self.folder, error)
        finally:
            if temporary is not None and os.path.exists(temporary):
                os.remove(temporary)


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """A photo whose face passed, waiting for the batched CLIP vision / VAE / text encoding."""

    index: int
    name: str
    key: str
    pixels: np.ndarray      # uint8 [R, R, 3]
    bbox: np.ndarray        # (4,)
    face: np.ndarray        # (D,) unit
    caption: str
    tokens: dict
    truncated: bool


def _first_chunk(tokens) -> tuple[dict, bool]:
    """The host tokenizer's output cut to its first 77-token chunk per encoder; whether anything was cut."""
    if not isinstance(tokens, dict):
        raise DatasetError(f"the CLIP's tokenizer returned {type(tokens).__name__}, not the usual dict of chunks")
    cut, truncated = {}, False
    for name, chunks in tokens.items():
        if isinstance(chunks, list) and chunks and isinstance(chunks[0], list):
            truncated |= len(chunks) > 1
            cut[name] = chunks[:1]
        else:
            cut[name] = chunks
    return cut, truncated


def _face_skip_reason(analyzer: FaceAnalyzer, pixels: np.ndarray, index: int):
    """(the one face, None) or (None, the reason the photo is skipped)."""
    try:
        found = detect_and_embed(analyzer, pixels, image_index=index, select="left-to-right")
    except FaceNotFound as error:
        return None, str(error)
    if len(found) > 1:
        return None, (f"{len(found)} faces found: a training photo must show exactly one person; crop it to one "
                      "face, or take it out of the folder.")
    small = too_small_message(found[0])
    if small:
        return None, small
    return found[0], None


def _encode_pending(pending: list[_Pending], clip_vision, vae, clip, mask_margin: float,
                    text_memo: dict) -> list[dict[str, torch.Tensor]]:
    """The batched encoders on a few photos: CLIP vision of the face-masked crops, the VAE of the crops, the
    text encoder once per distinct caption (`text_memo`: tokens hash -> (context, pooled))."""
    pixels = torch.from_numpy(np.stack([p.pixels for p in pending])).float() / 255.0
    masked = mask_boxes(pixels, [p.bbox[None] for p in pending], margin=mask_margin)
    image_embeds = clip_vision.encode_image(masked, crop=True)["image_embeds"]
    if image_embeds is None:
        raise DatasetError("the CLIP vision model gives no projected image_embeds (e_h): use a CLIP vision model with "
                           "its projection, e.g. ViT-H or ViT-bigG for IP-Adapter")
    image_embeds = image_embeds.detach().to("cpu", torch.float32)
    latents = vae.encode(pixels[..., :3]).detach().to("cpu", torch.float32)
    if image_embeds.shape[0] != len(pending) or latents.shape[0] != len(pending):
        raise DatasetError(f"the encoders gave {image_embeds.shape[0]} image embeddings and {latents.shape[0]} latents "
                           f"for {len(pending)} photos")
    out = []
    for i, item in enumerate(pending):
        digest = _tokens_hash(item.tokens)
        if digest not in text_memo:
            context, pooled = clip.encode_from_tokens(item.tokens, return_pooled=True)
            if pooled is None:
                raise DatasetError("the CLIP gives no pooled text embedding, which a FaceStudio adapter takes (e_T): "
                                   "use an SD1.5 or SDXL checkpoint's CLIP")
            text_memo[digest] = (context.detach().to("cpu", torch.float32)[0], pooled.detach().to("cpu", torch.float32)[0])
        context, pooled = text_memo[digest]
        out.append({"latent": latents[i], "context": context, "text_embeds": pooled, "image_embeds": image_embeds[i],
                    "face": torch.from_numpy(np.asarray(item.face, np.float32).copy())})
    return out


def _tokens_hash(tokens) -> str:
    digest = hashlib.sha256()
    _feed(digest, tokens)
    return digest.hexdigest()[:32]


def _check_inputs(analyzer, clip_vision, vae, clip, resolution, mask_margin) -> None:
    if not isinstance(resolution, int) or resolution < RESOLUTION_STEP or resolution % RESOLUTION_STEP:
        near = resolution if isinstance(resolution, (int, float)) else 512
        lower = max(RESOLUTION_STEP, int(near) // RESOLUTION_STEP * RESOLUTION_STEP)
        raise DatasetError(f"resolution must be a multiple of {RESOLUTION_STEP} px (the VAE's 8-px latent cells, halved "
                           f"three times by the UNet), not {resolution!r}: use {lower} or {lower + RESOLUTION_STEP}.")
    if not 0.0 <= float(mask_margin) <= 2.0:
        raise DatasetError(f"mask_margin must be between 0 and 2 (a share of the face box's size), not {mask_margin}")
    checks = ((analyzer, ("detector", "recognizer_id"), "FaceStudio face analyzer (FaceStudio Load Face Analyzer)"),
              (clip_vision, ("encode_image",), "CLIP_VISION (Load CLIP Vision)"),
              (vae, ("encode",), "VAE (the checkpoint's, or Load VAE)"),
              (clip, ("tokenize", "encode_from_tokens"), "CLIP (the checkpoint's text encoder)"))
    for value, attributes, what in checks:
        if not all(hasattr(value, a) for a in attributes):
            raise DatasetError(f"expected a {what}, got {type(value).__name__}")


def prepare_dataset(folder: str | os.PathLike, analyzer: FaceAnalyzer, clip_vision, vae, clip, resolution: int = 512,
                    cache_dir: str | os.PathLike | None = None, mask_margin: float = 0.25,
                    progress: Callable[[int, int], None] | None = None) -> EncodedDataset:
    """Encode a folder of photos for training (see the module's docstring). `progress(done, total)` is called
    after each photo. Raises DatasetError when the folder has no image, or no usable one (with every reason)."""
    _check_inputs(analyzer, clip_vision, vae, clip, resolution, mask_margin)
    folder = Path(folder)
    images = dataset_images(folder)
    cache = _Cache(Path(cache_dir) if cache_dir is not None else folder / CACHE_FOLDER)
    fingerprints = encoder_fingerprints(analyzer, clip_vision, vae, clip)

    examples: list[_Example] = []
    skipped: dict[int, tuple[str, str]] = {}
    skip_entries: list[tuple[str, str, str]] = []  # (key, name, reason): written only if the dataset is usable
    pending: list[_Pending] = []
    text_memo: dict = {}
    from_cache = 0

    def flush():
        for item, tensors in zip(pending, _encode_pending(pending, clip_vision, vae, clip, mask_margin, text_memo)):
            examples.append(_Example(item.index, item.name, item.caption, item.truncated, tensors))
            cache.write(item.key, tensors, {"status": "kept", "file": item.name})
        pending.clear()

    for index, path in enumerate(images):
        name = path.name
        data, caption, reason = _read_files(path)
        if reason is None:
            tokens, truncated = _first_chunk(clip.tokenize(caption))
            key = _entry_key(hashlib.sha256(data).hexdigest(), caption, _tokens_hash(tokens), resolution, mask_margin,
                             fingerprints)
            entry = cache.read(key)
        if reason is not None:
            skipped[index] = (name, reason)
        elif entry is not None and entry["status"] == "kept":
            examples.append(_Example(index, name, caption, truncated, entry["tensors"]))
            from_cache += 1
        elif entry is not None:
            skipped[index] = (name, entry["reason"])
        else:
            try:
                pixels = load_square(data, resolution)
            except Exception as error:  # PIL raises many types for a bad file
                skipped[index] = (name, _unreadable_reason(error))
            else:
                try:
                    face, reason = _face_skip_reason(analyzer, pixels, index)
                except Exception as error:  # the face models failed on this photo: not cached, may be transient
                    skipped[index] = (name, f"face analysis failed ({type(error).__name__}: {error})")
                else:
                    if reason is not None:
                        skipped[index] = (name, reason)
                        skip_entries.append((key, name, reason))
                    else:
                        pending.append(_Pending(index, name, key, pixels, face.bbox, face.normed_embedding, caption,
                                                tokens, truncated))
                        if len(pending) >= ENCODE_BATCH:
                            flush()
        if progress is not None:
            progress(index + 1, len(images))
    if pending:
        flush()

    skipped_list = tuple(skipped[i] for i in sorted(skipped))
    if not examples:
        reasons = "\n".join(f"  - {n}: {r}" for n, r in skipped_list)
        raise DatasetError(f"No usable photo in the dataset folder {folder} ({len(images)} image(s)); each photo "
                           f"must be readable and show exactly one clearly visible face:\n{reasons}")
    for key, name, reason in skip_entries:  # so a re-run does not analyse the same photos again
        cache.write(key, {}, {"status": "skipped", "file": name, "reason": reason})

    examples.sort(key=lambda e: e.index)
    lengths = {tuple(e.tensors["context"].shape) for e in examples}
    if len(lengths) != 1:
        raise DatasetError(f"The text encoder gives contexts of different shapes {sorted(lengths)} for the captions in "
                           f"{folder}: training needs one length; use an SD1.5 or SDXL checkpoint's CLIP.")
    stacked = {name: torch.stack([e.tensors[name] for e in examples]) for name in _KEPT_TENSORS}
    batch = TrainingBatch(latents=stacked["latent"], context=stacked["context"], text_embeds=stacked["text_embeds"],
                          image_embeds=stacked["image_embeds"], faces=stacked["face"])
    return EncodedDataset(
        batch=batch, files=tuple(e.name for e in examples), captions=tuple(e.caption for e in examples),
        skipped=skipped_list, truncated=tuple(e.name for e in examples if e.truncated), recognizer=analyzer.recognizer_id,
        resolution=resolution, mask_margin=float(mask_margin), fingerprints=fingerprints, folder=folder,
        cache_dir=cache.folder, from_cache=from_cache, cache_problem=cache.problem,
    )
