"""A seeded random ControlNet for the tiny SD1.5 UNet, in the original layout ('control_model.' keys:
the UNet encoder's copy, the zero convs and the hint encoder) that the host's ControlNetLoader detects
from the keys as it does a release SD1.5 ControlNet. Cached beside the tiny checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from . import tiny_models

GENERATOR_VERSION = 1
PREFIX = "control_model."
DTYPE = torch.float16
NAME = "facestudio_tiny_controlnet_sd15.safetensors"


def _config() -> dict:
    return {k: v for k, v in tiny_models.SD15_UNET_CONFIG.items() if k != "out_channels"}


def _module():
    import comfy.ops
    from comfy.cldm.cldm import ControlNet

    return ControlNet(**_config(), hint_channels=3, device="meta", operations=comfy.ops.disable_weight_init)


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return {PREFIX + key: tiny_models._fill(PREFIX + key, kind, shape, seed).to(DTYPE)
            for key, (kind, shape) in tiny_models._kinds(_module()).items()}


def controlnet_file(seed: int = 0) -> Path:
    spec = {"generator": GENERATOR_VERSION, "seed": seed, "config": _config(), "dtype": str(DTYPE)}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = tiny_models.cache_dir() / f"tiny_controlnet_sd15-v{GENERATOR_VERSION}-seed{seed}-{digest}.safetensors"
    return tiny_models.cached_file(path, lambda: state_dict(seed), {"facestudio_tiny_controlnet": json.dumps(spec)})


def install_controlnet(models_dir: str | os.PathLike, name: str = NAME, seed: int = 0) -> str:
    """The cached file in `<models_dir>/controlnet/`; returns the name ControlNetLoader knows."""
    return tiny_models.link_model(controlnet_file(seed), models_dir, "controlnet", name)
