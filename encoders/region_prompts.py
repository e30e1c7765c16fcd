"""A person's own prompt inside their region: the conditioning ConditioningSetMask makes (mask set,
area not shrunk to the mask's bounds, the given strength), added to the prompts already there as
ConditioningCombine adds them. One step instead of the core's three-node chain per region.

Host-free: a CONDITIONING is a list of [tensor, options]; nothing here imports the host."""
from __future__ import annotations

from .regions import RegionError, region_mask


def masked_conditioning(conditioning: list, mask, strength: float = 1.0) -> list:
    """`conditioning` limited to `mask` ([1, H, W] or [H, W]), as ConditioningSetMask's default mode
    sets it: each entry's options copied with mask, set_area_to_bounds False and mask_strength."""
    if mask.ndim == 2:
        mask = mask[None]
    return [[tensor, {**options, "mask": mask, "set_area_to_bounds": False, "mask_strength": strength}]
            for tensor, options in conditioning]


def region_prompt(encoded: list, masks, mask_index: int, strength: float = 1.0, add_to: list | None = None) -> list:
    """The prompt `encoded` (a CONDITIONING) inside region `mask_index` of the MASK batch `masks` (the
    mask FaceStudio Person's mask_index picks), after the conditioning `add_to` (the whole-image prompt
    or earlier regions' prompts; None: this one alone)."""
    if not encoded:
        raise RegionError("the region's prompt encoded to nothing: check the text and the CLIP it is encoded with.")
    return list(add_to or []) + masked_conditioning(encoded, region_mask(masks, mask_index), strength)
