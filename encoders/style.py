"""Style images -> a `StyleEncoding` for the IP-Adapter image-prompt path (FaceStudio's style guidance).

The host's CLIP vision model does the encoding (`encode_image`, its own preprocessing: resize the
short side to 224 and centre-crop); this module adds the FaceStudio part: optionally painting out
the faces of the style image first, so the style reference gives its look (colour, medium,
composition) without also pulling the generated face towards the face it happens to show.
It also keeps the same model's features of an all-zero normalized image (encoders/clip_vision.py),
the uncond branch of image-prompt Plus adapters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .clip_vision import ClipVisionError, zero_image_hidden_states
from .faces import FaceAnalyzer, FaceNotFound, detect_and_embed

# Neutral gray: CLIP's preprocessing maps it near 0 in every channel (its means are 0.41-0.48).
MASK_VALUE = 0.5


class StyleError(ValueError):
    """A style image or CLIP vision model that cannot be used; the message says why."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


@dataclass(frozen=True, eq=False)
class StyleEncoding:
    """CLIP vision features of one or more style images (batch B). Tensors are CPU float32 copies."""

    image_embeds: torch.Tensor  # (B, P): projected embeddings, what plain image-prompt adapters take
    penultimate_hidden_states: torch.Tensor  # (B, T, W): what image-prompt "plus" adapters take
    clip_width: int  # W
    masked_faces: tuple[int, ...]  # faces painted out, per image
    unconditional_hidden_states: torch.Tensor  # (1, T, W): the same model's zero-image features

    @property
    def batch_size(self) -> int:
        return int(self.image_embeds.shape[0])


def face_boxes(analyzer: FaceAnalyzer, images: torch.Tensor) -> list[np.ndarray]:
    """The (n, 4) face boxes of each image of an IMAGE batch [B, H, W, C]; (0, 4) where none."""
    boxes = []
    for i in range(images.shape[0]):
        try:
            found = detect_and_embed(analyzer, images[i], image_index=i, select="left-to-right")
            boxes.append(np.stack([f.bbox for f in found]))
        except FaceNotFound:
            boxes.append(np.zeros((0, 4), np.float32))
    return boxes


def mask_boxes(images: torch.Tensor, boxes: Sequence[np.ndarray], margin: float = 0.25,
               value: float = MASK_VALUE) -> torch.Tensor:
    """A copy of `images` [B, H, W, C] with each box, grown by `margin` of its size on every side,
    filled with `value`. The input is left untouched."""
    if len(boxes) != images.shape[0]:
        raise StyleError(f"{len(boxes)} box lists for {images.shape[0]} images")
    out = images.clone()
    height, width = images.shape[1:3]
    for i, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in np.asarray(image_boxes, np.float64).reshape(-1, 4):
            dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
            left, top = max(0, int(np.floor(x1 - dx))), max(0, int(np.floor(y1 - dy)))
            right, bottom = min(width, int(np.ceil(x2 + dx))), min(height, int(np.ceil(y2 + dy)))
            if right > left and bottom > top:
                out[i, top:bottom, left:right, :3] = value
    return out


def encode_style(clip_vision, images: torch.Tensor, *, analyzer: FaceAnalyzer | None = None,
                 mask_margin: float = 0.25) -> StyleEncoding:
    """Encode a style IMAGE batch with the host's CLIP vision model; with `analyzer`, faces are
    painted out first (see mask_boxes)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        raise StyleError(f"expected an IMAGE batch [B, H, W, C], got {getattr(images, 'shape', type(images))}")
    if not hasattr(clip_vision, "encode_image"):
        raise StyleError(f"expected a CLIP vision model (CLIP_VISION), got {type(clip_vision).__name__}")
    masked: tuple[int, ...] = (0,) * images.shape[0]
    if analyzer is not None:
        boxes = face_boxes(analyzer, images)
        images = mask_boxes(images, boxes, margin=mask_margin)
        masked = tuple(len(b) for b in boxes)
    out = clip_vision.encode_image(images, crop=True)
    embeds = out["image_embeds"].detach().to("cpu", torch.float32).clone()
    hidden = out["penultimate_hidden_states"].detach().to("cpu", torch.float32).clone()
    if hidden.ndim != 3 or embeds.ndim != 2 or hidden.shape[0] != embeds.shape[0]:
        raise StyleError(f"unexpected CLIP vision outputs: image_embeds {tuple(embeds.shape)}, "
                         f"penultimate_hidden_states {tuple(hidden.shape)}")
    try:
        unconditional = zero_image_hidden_states(clip_vision)
    except ClipVisionError as error:
        raise StyleError(str(error)) from error
    if unconditional.shape[1:] != hidden.shape[1:]:
        raise StyleError(f"the CLIP vision model gives hidden states of shape {tuple(unconditional.shape[1:])} for "
                         f"the zero image but {tuple(hidden.shape[1:])} for the style image")
    return StyleEncoding(image_embeds=embeds, penultimate_hidden_states=hidden, clip_width=int(hidden.shape[-1]),
                         masked_faces=masked, unconditional_hidden_states=unconditional)
