"""Identities: several photos of one person -> one `FaceIdentity`; mixing, saving and loading them.

Host-free (numpy, safetensors, encoders/faces.py). A `FaceIdentity` is a value: frozen, its arrays
read-only. It keeps every used shot's embeddings and crops (Portrait adapters take the shots as
separate tokens; FaceID Plus takes the crops), and the combined embedding that single-token
adapters take: the detection-score-weighted mean of the shots' unit embeddings, renormalized.

FaceID Plus (v1/v2) adapters also take CLIP vision features of the aligned face crop (as in the
IP-Adapter FaceID Plus reference code: the 224-px norm_crop through the CLIP image encoder, its
penultimate hidden states). Given the host's CLIP vision model object (anything with
`encode_image(image [N, H, W, 3] float 0..1)` returning `penultimate_hidden_states`; it is passed
in, never imported), `encode_identity` stores each kept shot's penultimate hidden states
(`clip_features`, (N, T, W)) and their combination (`combined_clip_features`, (T, W)): the same
detection-score-weighted mean over the kept shots as the embedding, but not renormalized (hidden
states are not unit vectors). The crop is at the CLIP model's 224 px, so the host only rescales and
normalizes it, as CLIPImageProcessor does (tests/test_plus_v2_reference.py runs it). With them
goes the same model's features of an all-zero normalized image (`unconditional_clip_features`, see
encoders/clip_vision.py): the uncond branch of FaceID Plus, as in the reference code.

With three or more shots, a shot whose cosine to the (renormalized) mean of the other shots is
below `outlier_threshold` is dropped with a warning naming it: a wrong photo in the batch, or the
wrong face chosen in a group photo. DEFAULT_OUTLIER_THRESHOLD is 0.4, from the trained SFace
numbers the tests measure: the same person (the astronaut, mirrored and resized) gives ~0.94,
different people (astronaut and the six of insightface's t1) stay below 0.36, and OpenCV's own
match threshold for SFace is 0.363. 0.4 is above every different-person pair measured and far below
the same-person value, leaving room for pose, lighting and age, which lower same-person cosines
to 0.5-0.7 on real photos. The mean of the others is nearer the person than any one shot, so a
genuine shot scores higher against it than against a single other shot.

Per-photo face results are kept in a bounded LRU cache (see `FaceCache`), keyed by the photo's
content, the recognizer and the detection settings, so re-running a workflow does not detect and
embed the same photos again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .faces import (
    SELECTIONS,
    DetectedFace,
    FaceAnalyzer,
    FaceError,
    FaceNotFound,
    RecognizerIdentity,
    detect_and_embed,
    images_list,
    to_rgb_uint8,
    too_small_message,
)

logger = logging.getLogger("FaceStudio.identity")

FORMAT_NAME = "facestudio-identity"
FORMAT_VERSION = 2
# Version 1 lacked unconditional_clip_features; its files without CLIP features read unchanged.
READABLE_VERSIONS = ("1", "2")
DEFAULT_OUTLIER_THRESHOLD = 0.4
MIN_SHOTS_FOR_OUTLIERS = 3
# The FaceID Plus reference crops 224 px for SD1.5 and SDXL alike (norm_crop(..., image_size=224) in
# the model card's Plus demo and the training crop on the IP-Adapter-Face wiki page; IPAdapterFaceIDPlusXL
# inherits get_image_embeds unchanged), so one crop serves every Plus adapter. cubiq's 256 px on SDXL is not
# the reference's (README, "Where FaceStudio differs from ComfyUI_IPAdapter_plus").
CROP_SIZE = 224
ON_MISSING = ("error", "skip")
CANCEL_NORM = 1e-6


class IdentityError(FaceError):
    """An identity that cannot be made, mixed, saved or loaded; the message says why."""


@dataclass(frozen=True, eq=False)
class DroppedShot:
    image_index: int  # index into the photos given (continuing the numbering of an identity added to)
    reason: str


@dataclass(frozen=True, eq=False)
class FaceIdentity:
    """One person, from one or more photos ("shots"). Arrays are read-only; row i is shot i.

    `used[i]` is the index (into the photos given) of the photo that shot i came from; `dropped`
    names the photos that gave no shot, and why. `photo_count` is how many photos were given in all
    (so a later add-shot continues the numbering).
    """

    embeddings: np.ndarray  # (N, D) float32: the recognizer's raw outputs
    normed_embeddings: np.ndarray  # (N, D) float32, unit rows
    embedding: np.ndarray  # (D,) float32, unit: the combined identity
    recognizer: RecognizerIdentity
    crops: np.ndarray  # (N, 224, 224, 3) uint8 RGB, aligned (norm_crop)
    det_scores: np.ndarray  # (N,) float32
    bboxes: np.ndarray  # (N, 4) float32, x1 y1 x2 y2 in the source photo's pixels
    kps: np.ndarray  # (N, 5, 2) float32
    used: tuple[int, ...]
    dropped: tuple[DroppedShot, ...] = ()
    photo_count: int = 0
    clip_features: np.ndarray | None = None  # (N, T, W) float32: per-shot CLIP penultimate hidden states
    clip_width: int | None = None  # W
    combined_clip_features: np.ndarray | None = None  # (T, W) float32: score-weighted mean of clip_features
    unconditional_clip_features: np.ndarray | None = None  # (T, W) float32: the same model's zero-image features
    # A mix's rows for adapters that take shots as tokens (Portrait), blended with the mix weights
    # (mix_identities); None for an identity of one person, whose rows are its shots.
    mixed_embeddings: np.ndarray | None = None  # (M, D) float32, raw-embedding scale
    mixed_normed_embeddings: np.ndarray | None = None  # (M, D) float32, unit rows
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for name in ("embeddings", "normed_embeddings", "embedding", "crops", "det_scores", "bboxes", "kps", "clip_features",
                     "combined_clip_features", "unconditional_clip_features", "mixed_embeddings",
                     "mixed_normed_embeddings"):
            value = getattr(self, name)
            if value is not None:
                value.setflags(write=False)
        n = len(self.used)
        if n < 1:
            raise IdentityError("an identity needs at least one shot")
        shapes = {
            "embeddings": (n, self.recognizer.embedding_dim),
            "normed_embeddings": (n, self.recognizer.embedding_dim),
            "embedding": (self.recognizer.embedding_dim,),
            "det_scores": (n,),
            "bboxes": (n, 4),
            "kps": (n, 5, 2),
        }
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise IdentityError(f"identity {name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        if self.crops.ndim != 4 or self.crops.shape[0] != n or self.crops.shape[3] != 3:
            raise IdentityError(f"identity crops have shape {tuple(self.crops.shape)}, expected ({n}, S, S, 3)")
        clip_given = (self.clip_features is not None, self.clip_width is not None,
                      self.combined_clip_features is not None, self.unconditional_clip_features is not None)
        if len(set(clip_given)) != 1:
            raise IdentityError("clip_features, combined_clip_features, unconditional_clip_features and clip_width "
                                "go together")
        mixed = (self.mixed_embeddings, self.mixed_normed_embeddings)
        if (mixed[0] is None) != (mixed[1] is None):
            raise IdentityError("mixed_embeddings and mixed_normed_embeddings go together")
        if mixed[0] is not None and (mixed[0].shape != mixed[1].shape or mixed[0].ndim != 2 or len(mixed[0]) < 1
                                     or mixed[0].shape[1] != self.recognizer.embedding_dim):
            raise IdentityError(f"identity mixed embeddings have shapes {tuple(mixed[0].shape)} and "
                                f"{tuple(mixed[1].shape)}, expected (M, {self.recognizer.embedding_dim}) both")
        if self.clip_features is not None:
            features, combined = self.clip_features, self.combined_clip_features
            if features.ndim != 3 or features.shape[0] != n or features.shape[2] != self.clip_width:
                raise IdentityError(f"identity clip_features have shape {tuple(features.shape)}, "
                                    f"expected ({n}, T, {self.clip_width})")
            for name in ("combined_clip_features", "unconditional_clip_features"):
                if tuple(getattr(self, name).shape) != tuple(features.shape[1:]):
                    raise IdentityError(f"identity {name} have shape {tuple(getattr(self, name).shape)}, "
                                        f"expected {tuple(features.shape[1:])}")

    @property
    def shot_count(self) -> int:
        return len(self.used)

    def shot_rows(self, normed: bool = True) -> np.ndarray:
        """(M, D) the rows an adapter that takes every shot as tokens reads (FaceID Portrait: unit rows;
        Portrait unnorm: `normed=False`, the raw scale): the shots, or a mix's weighted blend of them."""
        if self.mixed_embeddings is not None:
            return self.mixed_normed_embeddings if normed else self.mixed_embeddings
        return self.normed_embeddings if normed else self.embeddings

    @property
    def embedding_dim(self) -> int:
        return self.recognizer.embedding_dim

    def report(self) -> str:
        """A short human-readable account: shots used with their scores, shots dropped and why."""
        lines = [f"{self.shot_count} shot(s) used of {self.photo_count} photo(s); recognizer {self.recognizer}."]
        if self.clip_width is not None:
            lines.append(f"  CLIP vision features of the face crops: width {self.clip_width}, "
                         f"{self.clip_features.shape[1]} tokens.")
        for i, index in enumerate(self.used):
            cos = float(self.normed_embeddings[i] @ self.embedding)
            lines.append(f"  image {index}: detection score {float(self.det_scores[i]):.3f}, cosine to identity {cos:.3f}")
        for shot in self.dropped:
            lines.append(f"  image {shot.image_index} dropped: {shot.reason}")
        return "\n".join(lines)


def _readonly(array, dtype) -> np.ndarray:
    out = np.array(array, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


# ------------------------------------------------------------------------------------------------
# Combining
# ------------------------------------------------------------------------------------------------
def combine_embeddings(normed: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The detection-score-weighted mean of unit embeddings, renormalized to unit length."""
    normed = np.asarray(normed, np.float64)
    weights = np.asarray(scores, np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    mean = (weights[:, None] * normed).sum(axis=0) / weights.sum()
    norm = float(np.linalg.norm(mean))
    if norm < CANCEL_NORM:
        raise IdentityError("the shots' embeddings cancel out: they cannot be one person")
    return (mean / norm).astype(np.float32)


def combine_clip_features(features: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The detection-score-weighted mean of per-shot CLIP features (N, T, W) -> (T, W); not
    renormalized. The same weights as combine_embeddings (equal weights when the scores sum to 0)."""
    features = np.asarray(features, np.float64)
    weights = np.asarray(scores, np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    return (np.tensordot(weights, features, axes=1) / weights.sum()).astype(np.float32)


CLIP_BATCH = 16


def encode_clip_crops(clip_vision, crops: np.ndarray) -> np.ndarray:
    """The penultimate hidden states (N, T, W) float32 of uint8 RGB crops (N, S, S, 3), through the
    host's CLIP vision model object: the reference's CLIPImageProcessor + hidden_states[-2].

    Crops must already be at the model's input size (224 for ViT-H/bigG): the host then only rescales
    and normalizes, which equals CLIPImageProcessor to float precision, where a resize would go
    through torch's antialiased bicubic instead of the processor's PIL bicubic (a different image)."""
    import torch

    if not callable(getattr(clip_vision, "encode_image", None)):
        raise IdentityError(f"expected a CLIP vision model (CLIP_VISION), got {type(clip_vision).__name__}")
    size = int(getattr(clip_vision, "image_size", CROP_SIZE))
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise IdentityError(f"the face crops are {tuple(crops.shape[1:])} but this CLIP vision model takes "
                            f"{size}x{size} RGB images: FaceID Plus adapters were trained on {CROP_SIZE}-px face "
                            f"crops through CLIP ViT-H/14 ({CROP_SIZE} px); load that model with Load CLIP Vision")
    out = []
    for start in range(0, len(crops), CLIP_BATCH):
        batch = torch.from_numpy(np.array(crops[start:start + CLIP_BATCH], np.float32)) / 255.0  # a writable copy
        with torch.no_grad():
            hidden = clip_vision.encode_image(batch)["penultimate_hidden_states"]
        hidden = hidden.detach().to("cpu", torch.float32).numpy()
        if hidden.ndim != 3 or hidden.shape[0] != batch.shape[0]:
            raise IdentityError(f"unexpected CLIP vision output: penultimate_hidden_states of shape "
                                f"{tuple(hidden.shape)} for {batch.shape[0]} crop(s)")
        out.append(hidden)
    return np.concatenate(out)


def outlier_cosines(normed: np.ndarray) -> np.ndarray:
    """For each shot, its cosine to the renormalized mean of the other shots."""
    normed = np.asarray(normed, np.float64)
    total = normed.sum(axis=0)
    out = np.empty(len(normed))
    for i, row in enumerate(normed):
        others = total - row
        norm = np.linalg.norm(others)
        out[i] = float(row @ others / norm) if norm > 0 else 1.0
    return out


def find_outliers(normed: np.ndarray, threshold: float) -> list[tuple[int, float]]:
    """(row, cosine) of the shots to drop: with 3+ shots, those below `threshold`; never all."""
    if len(normed) < MIN_SHOTS_FOR_OUTLIERS:
        return []
    cosines = outlier_cosines(normed)
    low = [i for i in range(len(normed)) if cosines[i] < threshold]
    if len(low) == len(normed):
        keep = int(np.argmax(cosines))
        low.remove(keep)
    return [(i, float(cosines[i])) for i in low]


# ------------------------------------------------------------------------------------------------
# Per-photo face cache
# ------------------------------------------------------------------------------------------------
class FaceCache:
    """A bounded LRU of detect_and_embed results, keyed by (photo content hash, recognizer hash,
    detection settings). Thread-safe; holds at most `max_entries` photos' results."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[DetectedFace, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(analyzer: FaceAnalyzer, pixels: np.ndarray, select: str, index: int, crop_size: int) -> tuple:
        digest = hashlib.sha256()
        digest.update(repr(pixels.shape).encode())
        digest.update(pixels.tobytes())
        detector_file = os.path.abspath(str(getattr(analyzer.detector, "model_file", id(analyzer.detector))))
        return (
            digest.hexdigest(),
            analyzer.recognizer_id.sha256_16,
            analyzer.recognizer_id.embedding_dim,
            detector_file,
            tuple(analyzer.det_size),
            float(analyzer.det_thresh),
            select,
            int(index) if select == "index" else 0,
            int(crop_size),
        )

    def get(self, key):
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key, faces: tuple[DetectedFace, ...]) -> None:
        with self._lock:
            self._entries[key] = faces
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


FACE_CACHE = FaceCache()


def cached_detect_and_embed(analyzer: FaceAnalyzer, image, *, image_index: int = 0, select: str = "largest",
                            index: int = 0, crop_size: int = CROP_SIZE, cache: FaceCache | None = FACE_CACHE):
    """detect_and_embed through `cache` (None: no cache). Faces come back numbered `image_index`."""
    if cache is None:
        return detect_and_embed(analyzer, image, image_index=image_index, select=select, index=index, crop_size=crop_size)
    rgb = to_rgb_uint8(image)  # the key hashes these bytes; channel order is fixed, so RGB serves
    key = cache.key(analyzer, rgb, select, index, crop_size)
    found = cache.get(key)
    if found is None:
        found = detect_and_embed(analyzer, rgb, image_index=image_index, select=select, index=index, crop_size=crop_size)
        cache.put(key, found)
    return tuple(f if f.image_index == image_index else dataclasses.replace(f, image_index=image_index) for f in found)


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------
def encode_identity(
    analyzer: FaceAnalyzer,
    images,
    *,
    select: str = "largest",
    index: int = 0,
    on_missing: str = "error",
    outlier_threshold: float = DEFAULT_OUTLIER_THRESHOLD,
    base: FaceIdentity | None = None,
    cache: FaceCache | None = FACE_CACHE,
    progress=None,
    clip_vision=None,
) -> FaceIdentity:
    """One identity from several photos of one person, one face ("shot") per photo.

    `select`: "largest" or "index" (the `index`-th face left to right) in each photo.
    `on_missing`: "error" raises FaceNotFound naming the photo; "skip" logs a warning and records
    the photo in `dropped`. `base`: an identity to add these shots to (its photos keep their numbers,
    these continue after them). `progress(done, total)` is called after each photo.
    `clip_vision`: the host's CLIP vision model, for FaceID Plus adapters: every kept shot's crop
    (the base's too, so all shots come from the same model) is encoded; see the module docstring.
    A base that has CLIP features needs it again, as every shot must have them.
    """
    if select not in ("largest", "index"):
        raise IdentityError(f"select must be 'largest' or 'index' for an identity (one face per photo), not {select!r}"
                            + (f"; the face selections are {', '.join(SELECTIONS)}" if select not in SELECTIONS else ""))
    if on_missing not in ON_MISSING:
        raise IdentityError(f"on_missing must be one of {', '.join(ON_MISSING)}, not {on_missing!r}")
    if not math.isfinite(outlier_threshold) or not -1.0 <= outlier_threshold <= 1.0:
        raise IdentityError(f"outlier_threshold is a cosine, between -1 and 1, not {outlier_threshold}")
    photos = images_list(images)
    if not photos:
        raise IdentityError("no photos given")
    if base is not None and base.recognizer != analyzer.recognizer_id:
        raise IdentityError(f"cannot add shots: the identity was made with {base.recognizer}, "
                            f"these photos are analysed with {analyzer.recognizer_id}")
    if base is not None and base.clip_features is not None and clip_vision is None:
        raise IdentityError(f"the identity these shots are added to has CLIP vision features (width {base.clip_width}, "
                            "for FaceID Plus adapters), and every shot must have them: connect the same CLIP vision "
                            "model to this Encode Identity node too")
    if clip_vision is not None and not callable(getattr(clip_vision, "encode_image", None)):
        raise IdentityError(f"expected a CLIP vision model (CLIP_VISION), got {type(clip_vision).__name__}")
    offset = base.photo_count if base is not None else 0

    faces: list[DetectedFace] = []
    dropped: list[DroppedShot] = list(base.dropped) if base is not None else []
    for number, photo in enumerate(photos):
        image_index = offset + number
        try:
            (face,) = cached_detect_and_embed(analyzer, photo, image_index=image_index, select=select,
                                              index=index, crop_size=CROP_SIZE, cache=cache)
            small = too_small_message(face)
            if small is not None:
                raise FaceNotFound(small, image_index)
            faces.append(face)
        except FaceNotFound as error:
            if on_missing == "error":
                if len(photos) > 1 or base is not None:
                    raise FaceNotFound(f"{error} Or set on_missing to 'skip' to leave the photos without a face out.",
                                       error.image_index) from None
                raise
            logger.warning("Skipping image %d: %s", image_index, error)
            dropped.append(DroppedShot(image_index, f"no face: {error}"))
        if progress is not None:
            progress(number + 1, len(photos))

    embeddings = [f.embedding for f in faces]
    normed = [f.normed_embedding for f in faces]
    crops = [f.crop for f in faces]
    scores = [f.det_score for f in faces]
    bboxes = [f.bbox for f in faces]
    kps = [f.kps for f in faces]
    used = [f.image_index for f in faces]
    if base is not None:
        embeddings = list(base.embeddings) + embeddings
        normed = list(base.normed_embeddings) + normed
        crops = list(base.crops) + crops
        scores = list(base.det_scores) + scores
        bboxes = list(base.bboxes) + bboxes
        kps = list(base.kps) + kps
        used = list(base.used) + used
    if not used:
        raise IdentityError(f"no usable face in any of the {len(photos)} photo(s): "
                            + "; ".join(f"image {d.image_index}: {d.reason}" for d in dropped))

    outliers = find_outliers(np.stack(normed), outlier_threshold)
    if outliers:
        names = ", ".join(f"image {used[i]} (cosine {cos:.2f})" for i, cos in outliers)
        logger.warning("Dropping shot(s) that do not look like the others (cosine to the rest below %.2f): %s",
                       outlier_threshold, names)
        for i, cos in outliers:
            dropped.append(DroppedShot(used[i], f"outlier: cosine {cos:.3f} to the other shots, below {outlier_threshold}"))
        keep = [i for i in range(len(used)) if i not in {i for i, _ in outliers}]
        embeddings, normed, crops, scores, bboxes, kps, used = (
            [seq[i] for i in keep] for seq in (embeddings, normed, crops, scores, bboxes, kps, used)
        )

    normed_array = np.stack(normed).astype(np.float32)
    score_array = np.asarray(scores, np.float32)
    crop_array = np.stack(crops).astype(np.uint8)
    clip = combined_clip = clip_width = unconditional_clip = None
    if clip_vision is not None:
        clip = encode_clip_crops(clip_vision, crop_array)
        clip_width = int(clip.shape[2])
        combined_clip = combine_clip_features(clip, score_array)
        unconditional_clip = _zero_image_features(clip_vision, clip.shape[1:])
        if base is not None and base.clip_features is not None and (
                base.clip_features.shape[1:] != clip.shape[1:]
                or not np.array_equal(base.unconditional_clip_features, unconditional_clip)):
            raise IdentityError("the identity these shots are added to was encoded with another CLIP vision model: "
                                "connect the same CLIP vision model to this Encode Identity node")
    return FaceIdentity(
        embeddings=_readonly(np.stack(embeddings), np.float32),
        normed_embeddings=_readonly(normed_array, np.float32),
        embedding=_readonly(combine_embeddings(normed_array, score_array), np.float32),
        recognizer=analyzer.recognizer_id,
        crops=_readonly(crop_array, np.uint8),
        det_scores=_readonly(score_array, np.float32),
        bboxes=_readonly(np.stack(bboxes), np.float32),
        kps=_readonly(np.stack(kps), np.float32),
        used=tuple(int(i) for i in used),
        dropped=tuple(sorted(dropped, key=lambda d: d.image_index)),
        photo_count=offset + len(photos),
        clip_features=None if clip is None else _readonly(clip, np.float32),
        clip_width=clip_width,
        combined_clip_features=None if combined_clip is None else _readonly(combined_clip, np.float32),
        unconditional_clip_features=None if unconditional_clip is None else _readonly(unconditional_clip, np.float32),
    )


def _zero_image_features(clip_vision, shape) -> np.ndarray:
    from .clip_vision import ClipVisionError, zero_image_hidden_states  # torch, only when CLIP is used

    try:
        hidden = zero_image_hidden_states(clip_vision)[0].numpy()
    except ClipVisionError as error:
        raise IdentityError(str(error)) from error
    if hidden.shape != tuple(shape):
        raise IdentityError(f"the CLIP vision model gives hidden states of shape {hidden.shape} for the zero image "
                            f"but {tuple(shape)} for the face crops")
    return hidden


# ------------------------------------------------------------------------------------------------
# Mixing
# ------------------------------------------------------------------------------------------------
def mix_identities(parts: Sequence[tuple[FaceIdentity, float]]) -> FaceIdentity:
    """The weighted sum of the identities' combined embeddings, renormalized.

    Parts with weight 0 are left out; with one part left, its identity comes back unchanged (so
    weights 1/0 give the first identity's embedding exactly). The shots of the mixed identities
    (weight != 0) are kept, in order (the report, scoring). Adapters that take shots as tokens
    (Portrait) read `shot_rows`: as many rows as the largest mixed identity has, row k the weighted
    sum of each identity's row k (cycling through a smaller one's), so the weights act there too and
    not the shot counts (see _mixed_rows). CLIP features (when
    every mixed identity has them) mix with the same weights: sum(w * combined) / sum(w). Raises
    IdentityError when the recognizers differ, the mix cancels out, or only some mixed identities
    have CLIP features, or theirs differ in shape.
    """
    parts = [(identity, float(weight)) for identity, weight in parts if identity is not None]
    if not parts:
        raise IdentityError("nothing to mix: give at least one identity")
    for identity, weight in parts:
        if not math.isfinite(weight):
            raise IdentityError(f"mix weight {weight} is not a finite number")
    first = parts[0][0].recognizer
    for identity, _ in parts[1:]:
        if identity.recognizer != first:
            raise IdentityError(f"cannot mix identities from different face recognizers: {first} and "
                                f"{identity.recognizer}. Encode every photo with the same face analyzer.")
    active = [(identity, weight) for identity, weight in parts if weight != 0.0]
    if not active:
        raise IdentityError("every mix weight is 0: give at least one identity a weight")
    if len(active) == 1 and active[0][1] > 0:
        return active[0][0]
    total = np.zeros(first.embedding_dim, np.float64)
    for identity, weight in active:
        total += weight * identity.embedding.astype(np.float64)
    norm = float(np.linalg.norm(total))
    if norm < CANCEL_NORM:
        raise IdentityError(f"the mix cancels out (its embedding has norm {norm:.2e}): the weighted identities "
                            "point in opposite directions. Change the weights.")
    identities = [identity for identity, _ in active]

    def cat(name):
        return np.concatenate([getattr(i, name) for i in identities])

    used, offset = [], 0
    for identity in identities:
        used += [offset + u for u in identity.used]
        offset += identity.photo_count
    dropped, offset = [], 0
    for identity in identities:
        dropped += [DroppedShot(offset + d.image_index, d.reason) for d in identity.dropped]
        offset += identity.photo_count
    clip = combined_clip = clip_width = unconditional_clip = None
    with_clip = [i.clip_features is not None for i in identities]
    if any(with_clip) and not all(with_clip):
        raise IdentityError(f"cannot mix identities with and without CLIP vision features ({sum(with_clip)} of the "
                            f"{len(identities)} identities with a nonzero weight have them): encode them all with, "
                            "or all without, a CLIP vision model")
    if all(with_clip):
        shapes = {tuple(i.clip_features.shape[1:]) for i in identities}
        if len(shapes) != 1:
            raise IdentityError("cannot mix identities whose CLIP vision features differ in shape "
                                f"({', '.join(f'{t} tokens x width {w}' for t, w in sorted(shapes))}): encode them "
                                "with the same CLIP vision model")
        unconditional_clip = identities[0].unconditional_clip_features
        if any(not np.array_equal(i.unconditional_clip_features, unconditional_clip) for i in identities[1:]):
            raise IdentityError("cannot mix identities encoded with different CLIP vision models: encode them all "
                                "with the same one")
        weight_sum = sum(w for _, w in active)
        if abs(weight_sum) < CANCEL_NORM:
            raise IdentityError("the mix weights sum to 0, so the CLIP vision features cannot be averaged. "
                                "Change the weights.")
        mixed = sum(w * i.combined_clip_features.astype(np.float64) for i, w in active) / weight_sum
        clip, combined_clip, clip_width = cat("clip_features"), mixed.astype(np.float32), identities[0].clip_width
    mixed_raw, mixed_normed = _mixed_rows(active)
    crops = [i.crops for i in identities]
    if len({c.shape[1:] for c in crops}) != 1:
        raise IdentityError("cannot mix identities whose face crops differ in size")
    return FaceIdentity(
        embeddings=cat("embeddings"),
        normed_embeddings=cat("normed_embeddings"),
        embedding=(total / norm).astype(np.float32),
        recognizer=first,
        crops=np.concatenate(crops),
        det_scores=cat("det_scores"),
        bboxes=cat("bboxes"),
        kps=cat("kps"),
        used=tuple(used),
        dropped=tuple(dropped),
        photo_count=offset,
        clip_features=clip,
        clip_width=clip_width,
        combined_clip_features=combined_clip,
        unconditional_clip_features=unconditional_clip,
        mixed_embeddings=mixed_raw,
        mixed_normed_embeddings=mixed_normed,
    )


def _mixed_rows(active: Sequence[tuple[FaceIdentity, float]]) -> tuple[np.ndarray, np.ndarray]:
    """A mix's Portrait rows (raw, unit): row k = unit(sum_i w_i u_i[k mod n_i]) over the identities'
    unit rows u_i, as the combined embedding mixes; the raw row is that direction at the rows' mean
    norm weighted by |w_i| (Portrait unnorm reads the magnitude). Concatenating the shots instead would
    mix by shot count: 0.3 / 0.7 of a 3-shot and a 2-shot person gave 3/5 and 2/5 of the tokens."""
    parts = [(i.shot_rows(True).astype(np.float64), np.linalg.norm(i.shot_rows(False), axis=1), w) for i, w in active]
    weight_sum = sum(abs(w) for _, w in active)
    raw_rows, unit_rows = [], []
    for k in range(max(len(units) for units, _, _ in parts)):
        direction = sum(w * units[k % len(units)] for units, _, w in parts)
        norm = float(np.linalg.norm(direction))
        if norm < CANCEL_NORM:
            raise IdentityError(f"the mix cancels out in its shot {k} (norm {norm:.2e}): the weighted identities "
                                "point in opposite directions. Change the weights.")
        unit = direction / norm
        scale = sum(abs(w) * float(norms[k % len(norms)]) for _, norms, w in parts)
        unit_rows.append(unit)
        raw_rows.append(unit * scale / weight_sum)
    return _readonly(raw_rows, np.float32), _readonly(unit_rows, np.float32)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
_TENSORS = ("embeddings", "normed_embeddings", "embedding", "crops", "det_scores", "bboxes", "kps")
_DTYPES = {"crops": np.uint8}


def save_identity(identity: FaceIdentity, path: str | os.PathLike) -> Path:
    """Write `identity` as a .safetensors file (arrays as tensors, the rest in its metadata)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {name: np.ascontiguousarray(getattr(identity, name)) for name in _TENSORS}
    tensors["used"] = np.asarray(identity.used, np.int64)
    if identity.clip_features is not None:
        tensors["clip_features"] = np.ascontiguousarray(identity.clip_features)
        tensors["combined_clip_features"] = np.ascontiguousarray(identity.combined_clip_features)
        tensors["unconditional_clip_features"] = np.ascontiguousarray(identity.unconditional_clip_features)
    if identity.mixed_embeddings is not None:
        tensors["mixed_embeddings"] = np.ascontiguousarray(identity.mixed_embeddings)
        tensors["mixed_normed_embeddings"] = np.ascontiguousarray(identity.mixed_normed_embeddings)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "recognizer_file": identity.recognizer.file_name,
        "recognizer_sha256_16": identity.recognizer.sha256_16,
        "recognizer_dim": str(identity.recognizer.embedding_dim),
        "photo_count": str(identity.photo_count),
        "dropped": json.dumps([[d.image_index, d.reason] for d in identity.dropped]),
        "clip_width": "" if identity.clip_width is None else str(identity.clip_width),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
    except (OSError, ValueError) as error:  # permissions, a full disk, a file where a folder should be...
        raise IdentityError(f"Could not write the identity file {path}: {error}. Check that the output folder is "
                            "writable and has free space, or choose another filename_prefix.") from error
    return path


def load_identity(path: str | os.PathLike) -> FaceIdentity:
    """Read an identity file written by save_identity; IdentityError for anything unusable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise IdentityError(f"no identity file {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:
        raise IdentityError(f"{path.name} (in {path.parent}) is not a readable identity file (truncated or corrupt?): "
                            f"{error}. Save the identity again with FaceStudio Save Identity, or encode its photos "
                            "again.") from error
    if metadata.get("format") != FORMAT_NAME:
        raise IdentityError(f"{path.name} (in {path.parent}) is not a FaceStudio identity file (format "
                            f"{metadata.get('format')!r}): pick a file saved by FaceStudio Save Identity.")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise IdentityError(f"{path.name} is identity format version {version}; this FaceStudio reads versions "
                            f"{', '.join(READABLE_VERSIONS)}. Encode the photos again, or update FaceStudio.")
    if version == "1" and "clip_features" in tensors:
        raise IdentityError(f"{path.name} was saved by an earlier FaceStudio without the unconditional CLIP features "
                            "that FaceID Plus needs: encode the photos again (with the CLIP vision model) and save.")
    required_meta = ("recognizer_file", "recognizer_sha256_16", "recognizer_dim", "photo_count", "dropped")
    missing = [k for k in required_meta if k not in metadata] + [k for k in _TENSORS + ("used",) if k not in tensors]
    clip_names = ("clip_features", "combined_clip_features", "unconditional_clip_features")
    if any(k in tensors for k in clip_names) or metadata.get("clip_width"):
        missing += [k for k in clip_names if k not in tensors] + ([] if metadata.get("clip_width") else ["clip_width"])
    if missing:
        raise IdentityError(f"{path.name} is incomplete: it lacks {', '.join(missing)}")
    for name, value in tensors.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise IdentityError(f"{path.name} holds NaN or infinite values in '{name}': the file is damaged")
    try:
        recognizer = RecognizerIdentity(metadata["recognizer_file"], metadata["recognizer_sha256_16"],
                                        int(metadata["recognizer_dim"]))
        dropped = tuple(DroppedShot(int(i), str(r)) for i, r in json.loads(metadata["dropped"]))
        clip_width = int(metadata["clip_width"]) if metadata.get("clip_width") else None
        identity = FaceIdentity(
            **{name: _readonly(tensors[name], _DTYPES.get(name, np.float32)) for name in _TENSORS},
            recognizer=recognizer,
            used=tuple(int(i) for i in tensors["used"]),
            dropped=dropped,
            photo_count=int(metadata["photo_count"]),
            clip_features=_readonly(tensors["clip_features"], np.float32) if "clip_features" in tensors else None,
            clip_width=clip_width,
            combined_clip_features=(_readonly(tensors["combined_clip_features"], np.float32)
                                    if "combined_clip_features" in tensors else None),
            unconditional_clip_features=(_readonly(tensors["unconditional_clip_features"], np.float32)
                                         if "unconditional_clip_features" in tensors else None),
            **{name: _readonly(tensors[name], np.float32) if name in tensors else None
               for name in ("mixed_embeddings", "mixed_normed_embeddings")},
        )
    except IdentityError as error:
        raise IdentityError(f"{path.name} is not a valid identity: {error}") from error
    except (ValueError, TypeError) as error:
        raise IdentityError(f"{path.name} has unreadable metadata: {error}") from error
    if abs(float(np.linalg.norm(identity.embedding)) - 1.0) > 1e-3:
        raise IdentityError(f"{path.name}: its identity embedding is not unit length; the file is damaged")
    return identity


# ------------------------------------------------------------------------------------------------
# Where identity files live (the nodes pass the host's output folder as `root`)
# ------------------------------------------------------------------------------------------------
IDENTITY_SUBFOLDER = os.path.join("facestudio", "identities")
IDENTITY_SUFFIX = ".safetensors"


MAX_NAME_BYTES = 200  # per folder or file name: most file systems allow 255, and a number and suffix follow


def _relative_parts(name: str, what: str) -> list[str]:
    """`name` split into path parts, refusing absolute paths, drive letters, '..', control characters
    and names too long for the file system."""
    parts = [p for p in re.split(r"[\\/]", name or "") if p not in ("", ".")]
    if not parts:
        raise IdentityError(f"The {what} {name!r} is empty: type a name such as 'identity' (sub-folders allowed, "
                            "e.g. 'people/anna').")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or any(p == ".." for p in parts):
        raise IdentityError(f"'{name}' is not a {what} inside the identities folder ({IDENTITY_SUBFOLDER} of the "
                            "output folder): no absolute paths or '..'.")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise IdentityError(f"{name!r} is not a usable {what}: it holds control characters (such as a line break "
                            "or a NUL byte). Type the name again with letters, digits, '-', '_' and '/' only.")
    long = next((p for p in parts if len(p.encode("utf-8")) > MAX_NAME_BYTES), None)
    if long is not None:
        raise IdentityError(f"The {what} '{name[:60]}...' has a folder or file name of {len(long.encode('utf-8'))} "
                            f"bytes; file systems allow about 255 and FaceStudio at most {MAX_NAME_BYTES}: "
                            "use a shorter name.")
    return parts


def _inside(root: Path, candidate: Path) -> bool:
    root, candidate = os.path.realpath(root), os.path.realpath(candidate)
    return os.path.commonpath([root, candidate]) == root


def new_identity_path(root: str | os.PathLike, prefix: str) -> Path:
    """The next free `<prefix>_NNNNN.safetensors` under `root` (sub-folders in the prefix allowed)."""
    root = Path(root)
    parts = _relative_parts(prefix, "file name prefix")
    folder = root.joinpath(*parts[:-1])
    if not _inside(root, folder):
        raise IdentityError(f"'{prefix}' would save outside {root}: a folder on its way links to another place. "
                            "Choose a prefix whose folders are real folders inside it.")
    stem = parts[-1]
    taken = set()
    if folder.is_dir():
        pattern = re.compile(re.escape(stem) + r"_(\d+)" + re.escape(IDENTITY_SUFFIX) + "$")
        taken = {int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))}
    number = max(taken, default=0) + 1
    return folder / f"{stem}_{number:05d}{IDENTITY_SUFFIX}"


def identity_file_names(root: str | os.PathLike) -> list[str]:
    """The identity files under `root`, as '/'-separated names relative to it, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*" + IDENTITY_SUFFIX) if p.is_file())


def resolve_identity_file(root: str | os.PathLike, name: str) -> Path:
    """The path of identity file `name` under `root`; never a path outside it."""
    root = Path(root)
    candidate = root.joinpath(*_relative_parts(name, "file name"))
    if not _inside(root, candidate):
        raise IdentityError(f"'{name}' is outside the identities folder {root}: it is a link to (or inside a "
                            "linked folder pointing to) another place. Copy the file into the folder instead.")
    if not candidate.is_file():
        raise IdentityError(f"No identity file '{name}' in {root}. Save one with FaceStudio Save Identity and "
                            "refresh the node list.")
    return candidate
