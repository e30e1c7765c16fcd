"""The unconditional image features IP-Adapter pairs with its image features.

IP-Adapter's reference code gives the uncond branch of FaceID Plus and image-prompt Plus the
encoder's penultimate hidden states of an all-zero *normalized* image
(`image_encoder(torch.zeros_like(clip_image))`): CLIP's mean colour, not a black photo. The host's
`encode_image` rounds pixels to 8 bits before normalizing, so no photo maps to exact zeros; the zero
tensor goes straight to the host's vision model, after the host has loaded it as `encode_image` does.
The result only depends on the model, so it is computed once per CLIP vision object.
"""
from __future__ import annotations

import weakref

import torch

_ZERO_IMAGE_CACHE: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()


class ClipVisionError(ValueError):
    """A CLIP vision model object this pack cannot use; the message says why."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


def zero_image_hidden_states(clip_vision) -> torch.Tensor:
    """Penultimate hidden states (1, T, W), CPU float32, of an all-zero normalized image."""
    model, patcher = getattr(clip_vision, "model", None), getattr(clip_vision, "patcher", None)
    if model is None or patcher is None or not hasattr(clip_vision, "load_device"):
        raise ClipVisionError(f"expected the host's CLIP vision model (CLIP_VISION, from Load CLIP Vision), got "
                              f"{type(clip_vision).__name__}")
    cached = _ZERO_IMAGE_CACHE.get(clip_vision)
    if cached is not None:
        return cached
    import comfy.model_management

    comfy.model_management.load_model_gpu(patcher)
    size = int(getattr(clip_vision, "image_size", 224))
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    with torch.no_grad():
        out = model(pixel_values=pixels, intermediate_output=-2)
    hidden = out[1].detach().to("cpu", torch.float32).clone()
    if hidden.ndim != 3 or hidden.shape[0] != 1:
        raise ClipVisionError(f"unexpected CLIP vision output for the zero image: hidden states of shape "
                              f"{tuple(hidden.shape)}")
    _ZERO_IMAGE_CACHE[clip_vision] = hidden
    return hidden
