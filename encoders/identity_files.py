"""The identity file format: a `FaceIdentity` as a .safetensors file (arrays as tensors, the rest in
its metadata), and reading one back with an error for anything unusable.

Host-free (numpy, safetensors).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .faces import RecognizerIdentity
from .identity import DroppedShot, FaceIdentity, IdentityError, readonly

FORMAT_NAME = "facestudio-identity"
FORMAT_VERSION = 2
# Version 1 lacked unconditional_clip_features; its files without CLIP features read unchanged.
READABLE_VERSIONS = ("1", "2")

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
            **{name: readonly(tensors[name], _DTYPES.get(name, np.float32)) for name in _TENSORS},
            recognizer=recognizer,
            used=tuple(int(i) for i in tensors["used"]),
            dropped=dropped,
            photo_count=int(metadata["photo_count"]),
            clip_features=readonly(tensors["clip_features"], np.float32) if "clip_features" in tensors else None,
            clip_width=clip_width,
            combined_clip_features=(readonly(tensors["combined_clip_features"], np.float32)
                                    if "combined_clip_features" in tensors else None),
            unconditional_clip_features=(readonly(tensors["unconditional_clip_features"], np.float32)
                                         if "unconditional_clip_features" in tensors else None),
            **{name: readonly(tensors[name], np.float32) if name in tensors else None
               for name in ("mixed_embeddings", "mixed_normed_embeddings")},
        )
    except IdentityError as error:
        raise IdentityError(f"{path.name} is not a valid identity: {error}") from error
    except (ValueError, TypeError) as error:
        raise IdentityError(f"{path.name} has unreadable metadata: {error}") from error
    if abs(float(np.linalg.norm(identity.embedding)) - 1.0) > 1e-3:
        raise IdentityError(f"{path.name}: its identity embedding is not unit length; the file is damaged")
    return identity
