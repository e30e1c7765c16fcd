"""What a FaceStudio adapter file says about itself: the safetensors header of a trained adapter.

The tensors are in IP-Adapter's layout (`image_proj.<FaceStudioFusion keys>`, `ip_adapter.<2n+1>.to_k_ip /
to_v_ip.weight`, see attention/adapters.py), so the header is what makes it a FaceStudio file: the format
and its version, the base model family, the face recognizer whose embeddings it reads (by the sha256 of its
ONNX file, as encoders/recognizers.py identifies recognizers: the adapter has learnt that recognizer's
embedding space and no other), the CLIP vision model and text encoder it read, its token count, the
training settings, and the licences the user stated for the dataset and the face models (a trained file
inherits their terms: FFHQ is CC BY-NC-SA 4.0, insightface's model packs are for non-commercial research).

safetensors headers hold strings only: nested values are JSON. Host-free and torch-free.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..encoders.faces import RecognizerIdentity

__all__ = ["FORMAT", "FORMAT_VERSION", "FaceStudioMetadata", "MetadataError", "NOT_STATED"]

FORMAT = "facestudio-adapter"
FORMAT_VERSION = 1
NOT_STATED = "not stated"


class MetadataError(ValueError):
    """A header that is not a readable FaceStudio adapter header; the message says what is missing."""


@dataclass(frozen=True)
class FaceStudioMetadata:
    base_model: str                       # "SD1.5" | "SDXL"
    recognizer: RecognizerIdentity        # the recognizer of every e_f it was trained on
    clip_vision: Mapping[str, Any]        # {"name", "image_embeds_width", "fingerprint"}
    text_encoder: Mapping[str, Any]       # {"name", "pooled_width", "fingerprint"}
    num_tokens: int
    training: Mapping[str, Any]           # TrainingSettings.as_dict() plus steps_done, examples, resolution
    dataset_licence: str = NOT_STATED
    face_models_licence: str = NOT_STATED
    created_by: str = "ComfyUI-FaceStudio"
    version: int = FORMAT_VERSION
    extra: Mapping[str, str] = field(default_factory=dict)  # keys a newer writer added, kept on a re-save

    def to_header(self) -> dict[str, str]:
        r = self.recognizer
        return {
            **dict(self.extra),
            "format": FORMAT,
            "format_version": str(self.version),
            "base_model": self.base_model,
            "recognizer": json.dumps({"file_name": r.file_name, "sha256_16": r.sha256_16,
                                      "embedding_dim": r.embedding_dim}),
            "clip_vision": json.dumps(dict(self.clip_vision)),
            "text_encoder": json.dumps(dict(self.text_encoder)),
            "num_tokens": str(self.num_tokens),
            "training": json.dumps(dict(self.training)),
            "licences": json.dumps({"dataset": self.dataset_licence, "face_models": self.face_models_licence}),
            "created_by": self.created_by,
        }

    @classmethod
    def from_header(cls, header: Mapping[str, str] | None, source: str) -> "FaceStudioMetadata":
        header = dict(header or {})
        if header.get("format") != FORMAT:
            raise MetadataError(
                f"{source} has a FaceStudio projection but its header does not say format '{FORMAT}' (it "
                f"says {header.get('format')!r}): FaceStudio's own files carry the recognizer they were trained "
                "with in that header, and without it the face embeddings cannot be checked. Save the adapter "
                "again with FaceStudio Save Adapter (or the training script); a .bin copy loses the header.")
        try:
            version = int(header.get("format_version", ""))
        except ValueError:
            raise MetadataError(f"{source}: its 'format_version' is {header.get('format_version')!r}, not a number.") from None
        if version > FORMAT_VERSION:
            raise MetadataError(f"{source} is a FaceStudio adapter of format version {version}; this FaceStudio "
                                f"reads up to version {FORMAT_VERSION}. Update ComfyUI-FaceStudio.")

        def parsed(key: str) -> Any:
            if key not in header:
                raise MetadataError(f"{source}: its FaceStudio header has no '{key}'; the file was changed after "
                                    "it was saved. Save it again from its training state.")
            try:
                return json.loads(header[key])
            except json.JSONDecodeError:
                raise MetadataError(f"{source}: its header's '{key}' is not valid JSON ({header[key][:80]!r}).") from None

        rec = parsed("recognizer")
        try:
            recognizer = RecognizerIdentity(str(rec["file_name"]), str(rec["sha256_16"]), int(rec["embedding_dim"]))
        except (KeyError, TypeError, ValueError):
            raise MetadataError(f"{source}: its header's recognizer {header['recognizer'][:120]!r} lacks file_name, "
                                "sha256_16 or embedding_dim.") from None
        licences = parsed("licences") if "licences" in header else {}
        known = {"format", "format_version", "base_model", "recognizer", "clip_vision", "text_encoder",
                 "num_tokens", "training", "licences", "created_by"}
        return cls(
            base_model=header.get("base_model", ""), recognizer=recognizer,
            clip_vision=parsed("clip_vision"), text_encoder=parsed("text_encoder"),
            num_tokens=int(header.get("num_tokens", "0") or 0), training=parsed("training"),
            dataset_licence=str(licences.get("dataset", NOT_STATED)),
            face_models_licence=str(licences.get("face_models", NOT_STATED)),
            created_by=header.get("created_by", ""), version=version,
            extra={k: v for k, v in header.items() if k not in known},
        )

    def describe(self) -> str:
        steps = self.training.get("steps_done")
        trained = f", trained {steps} steps on {self.training.get('examples')} images" if steps is not None else ""
        return (f"recognizer {self.recognizer}{trained}; licences: dataset {self.dataset_licence}, "
                f"face models {self.face_models_licence}")
