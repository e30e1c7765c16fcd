"""PuLID-FLUX's encoders as a model the host manages: loaded to the compute device when an identity is
encoded, counted in the host's memory budget, and offloaded when a model needs the room.

The host does the same for its own CLIP vision (comfy/clip_vision.py): the model sits on the text
encoder offload device, a patcher of the host's own class (CoreModelPatcher: ModelPatcherDynamic under
dynamic VRAM, so it never forces the old-style unloading of every other model) holds it, and
load_model_gpu runs before each encode. Here the one model is PuLIDFluxNetworks (IDFormer, EVA-CLIP,
RetinaFace, BiSeNet: 151 + 304 + 27 + 13 M parameters, 2.0 GB in fp32, 1.1 GB with the
IDFormer and EVA-CLIP in bf16). They are plain torch modules, not comfy.ops ones, so the host cannot
cast them layer by layer: the load is a full one (force_full_load), which the host makes room for first.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..attention.token_store import host_patcher_class
from .pulid_flux_identity import PuLIDFlux, PuLIDFluxIdentity, encode_pulid_flux_identity, load_pulid_flux_models

__all__ = ["load_pulid_flux_on_host", "encode_on_host", "encoder_dtype"]


def encoder_dtype(device: torch.device) -> torch.dtype:
    """bf16 for the IDFormer and EVA-CLIP where the device computes in it (the reference runs PuLID-FLUX
    in bf16), fp32 elsewhere (fp16 is not tried: EVA-CLIP's hidden states were trained in bf16's range)."""
    import comfy.model_management

    if comfy.model_management.is_device_cpu(device):
        return torch.float32
    return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float32


def load_pulid_flux_on_host(pulid_path: str | Path, eva_path: str | Path, detector_path: str | Path,
                            parser_path: str | Path, load_device: torch.device | None = None,
                            offload_device: torch.device | None = None) -> PuLIDFlux:
    """load_pulid_flux_models on the offload device, with a patcher over its networks (the devices default
    to the host's text encoder devices, where its CLIP vision goes)."""
    import comfy.model_management

    load_device = load_device or comfy.model_management.text_encoder_device()
    offload_device = offload_device or comfy.model_management.text_encoder_offload_device()
    models = load_pulid_flux_models(pulid_path, eva_path, detector_path, parser_path, device=offload_device,
                                    dtype=encoder_dtype(load_device))
    patcher = host_patcher_class()(models.networks, load_device=load_device, offload_device=offload_device)
    return dataclasses.replace(models, patcher=patcher)


def encode_on_host(models: PuLIDFlux, analyzer, photos: Sequence,
                   progress: Callable[[int, int], None] | None = None) -> PuLIDFluxIdentity:
    """encode_pulid_flux_identity with the networks loaded by the host first (where `models` has a patcher)."""
    if isinstance(models, PuLIDFlux) and models.patcher is not None:
        import comfy.model_management

        comfy.model_management.load_models_gpu([models.patcher], force_full_load=True)
    return encode_pulid_flux_identity(models, analyzer, photos, progress)
