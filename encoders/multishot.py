"""Several photos of one person -> one `FaceIdentity` (encoders/identity.py): one face ("shot") per
photo, outlier shots dropped, and for FaceID Plus adapters the CLIP vision features of the face crops.

Host-free (numpy, encoders/faces.py; torch only when a CLIP vision model is given).

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
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .face_cache import FACE_CACHE, FaceCache, cached_detect_and_embed
from .faces import SELECTIONS, DetectedFace, FaceAnalyzer, FaceNotFound, images_list, too_small_message
from .identity import DroppedShot, FaceIdentity, IdentityError, combine_clip_features, combine_embeddings, readonly

logger = logging.getLogger("FaceStudio.identity")

DEFAULT_OUTLIER_THRESHOLD = 0.4
MIN_SHOTS_FOR_OUTLIERS = 3
# The FaceID Plus reference crops 224 px for SD1.5 and SDXL alike (norm_crop(..., image_size=224) in
# the model card's Plus demo and the training crop on the IP-Adapter-Face wiki page; IPAdapterFaceIDPlusXL
# inherits get_image_embeds unchanged), so one crop serves every Plus adapter. cubiq's 256 px on SDXL is not
# the reference's (README, "Where FaceStudio differs from ComfyUI_IPAdapter_plus").
CROP_SIZE = 224
ON_MISSING = ("error", "skip")


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
        embeddings=readonly(np.stack(embeddings), np.float32),
        normed_embeddings=readonly(normed_array, np.float32),
        embedding=readonly(combine_embeddings(normed_array, score_array), np.float32),
        recognizer=analyzer.recognizer_id,
        crops=readonly(crop_array, np.uint8),
        det_scores=readonly(score_array, np.float32),
        bboxes=readonly(np.stack(bboxes), np.float32),
        kps=readonly(np.stack(kps), np.float32),
        used=tuple(int(i) for i in used),
        dropped=tuple(sorted(dropped, key=lambda d: d.image_index)),
        photo_count=offset + len(photos),
        clip_features=None if clip is None else readonly(clip, np.float32),
        clip_width=clip_width,
        combined_clip_features=None if combined_clip is None else readonly(combined_clip, np.float32),
        unconditional_clip_features=None if unconditional_clip is None else readonly(unconditional_clip, np.float32),
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
