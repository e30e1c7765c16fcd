"""The reference image projections, imported from their own sources for tests to run on the same weights.

IP-Adapter's `Resampler` (tencent-ailab/IP-Adapter ip_adapter/resampler.py) comes from cubiq's
ComfyUI_IPAdapter_plus checkout that scripts/setup.sh clones at the pinned commit: its
image_proj_models.py holds the same Resampler, PerceiverAttention and FeedForward line for line, and
it is what that pack builds for FaceID Portrait unnorm (IPAdapterPlus.py:67-68, :99-109). Imported
by path, without the pack's ComfyUI-facing modules.
"""
from __future__ import annotations

import functools
import importlib.util
import sys

import torch

from . import peer_packs


@functools.lru_cache(maxsize=None)
def cubiq_image_proj_models():
    """cubiq's image_proj_models module (the reference Resampler, FacePerceiverResampler, MLPProjModelFaceId)."""
    path = peer_packs.ipadapter_plus_dir() / "image_proj_models.py"
    name = "facestudio_reference_image_proj_models"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def portrait_unnorm_resampler(image_proj: dict[str, torch.Tensor], output_dim: int) -> torch.nn.Module:
    """The reference Resampler as cubiq builds it for Portrait unnorm (depth 4, 64-wide heads, ff x4;
    width, head count and queries read off the tensors as its fixed SDXL values 1280 / 20 / 16 are),
    loaded strictly in fp32 and in eval mode."""
    _, queries, dim = image_proj["latents"].shape
    resampler = cubiq_image_proj_models().Resampler(
        dim=dim, depth=4, dim_head=64, heads=image_proj["layers.0.0.to_q.weight"].shape[0] // 64,
        num_queries=queries, embedding_dim=image_proj["proj_in.weight"].shape[1], output_dim=output_dim, ff_mult=4)
    resampler.load_state_dict({k: v.float() for k, v in image_proj.items()}, strict=True)
    return resampler.float().eval()


def release_unnorm_resampler_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released ip-adapter-faceid-portrait_sdxl_unnorm.bin's image_proj: the reference
    Resampler with cubiq's SDXL arguments (IPAdapterPlus.py:99-109, :280-281, :287-288), built on the meta device."""
    with torch.device("meta"):
        resampler = cubiq_image_proj_models().Resampler(
            dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=2048, ff_mult=4)
    return {k: tuple(v.shape) for k, v in resampler.state_dict().items()}
