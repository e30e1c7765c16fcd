"""The persons of FaceStudio Apply: who (an identity), where (a mask), how strongly and when.

Plain immutable values built by the FaceStudio Person node and read by attention/patch.py; nothing
here touches the host or the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True, eq=False)
class Person:
    """One person for FaceStudio Apply: an identity, where (mask), how strongly and when (0..1 of sampling).
    `negative`: an identity whose tokens replace the unconditional ones (CFG pushes away from it).
    `shortcut_scale`: FaceID Plus v2's s_scale for this person (cond and uncond tokens); other kinds ignore it."""

    identity: object  # encoders.identity.FaceIdentity
    mask: torch.Tensor | None = None  # [1, h, w] soft, or None for the whole image
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    negative: object | None = None
    shortcut_scale: float = 1.0  # FaceID Plus v2 only: out = x + shortcut_scale * resampler(x, clip)


def add_person(persons: Sequence[Person] | None, identity, mask: torch.Tensor | None = None, mask_index: int = 0,
               weight: float = 1.0, start: float = 0.0, end: float = 1.0, negative=None,
               shortcut_scale: float = 1.0) -> tuple[Person, ...]:
    """A new tuple: `persons` (never changed) plus this person. `mask` is a MASK batch; mask_index picks one."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"start and end must satisfy 0 <= start <= end <= 1, got start {start}, end {end}")
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim != 3:
            raise ValueError(f"mask must be a MASK [M, h, w], got shape {tuple(mask.shape)}")
        if not 0 <= mask_index < mask.shape[0]:
            raise ValueError(f"mask_index {mask_index} is out of range: the mask batch has {mask.shape[0]} mask(s) "
                             f"(use 0..{mask.shape[0] - 1})")
        mask = mask[mask_index:mask_index + 1].detach().float().cpu().clone()
        if not bool(mask.max() > 0):
            raise ValueError(f"mask_index {mask_index} selects an all zero (empty) mask: this person would not appear "
                             "anywhere. Paint the person's region white, pick another mask_index, or disconnect the "
                             "mask to use the whole image.")
    return tuple(persons or ()) + (Person(identity, mask, float(weight), float(start), float(end), negative,
                                          float(shortcut_scale)),)
