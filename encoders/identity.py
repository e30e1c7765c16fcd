"""The identity value: one person from one or more photos ("shots"), as one `FaceIdentity`.

Host-free (numpy, encoders/faces.py). A `FaceIdentity` is a value: frozen, its arrays read-only. It
keeps every used shot's embeddings and crops (Portrait adapters take the shots as separate tokens;
FaceID Plus takes the crops), and the combined embedding that single-token adapters take: the
detection-score-weighted mean of the shots' unit embeddings, renormalized (`combine_embeddings`).

Made by encoders/multishot.py (photos), encoders/mixing.py (a weighted blend) and
encoders/identity_files.py (a saved file); identity_folder.py says where such files live.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .faces import FaceError, RecognizerIdentity

CANCEL_NORM = 1e-6  # a combined or mixed direction shorter than this has cancelled out


class IdentityError(FaceError):
    """An identity that cannot be made, mixed, saved or loaded; the message says why."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


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


def readonly(array, dtype) -> np.ndarray:
    out = np.array(array, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


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
