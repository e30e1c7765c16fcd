"""Seeded random CLIP vision models for the tests. Call only after the host is booted (`booted`).

- `tiny_clip_vision`: the host's own class (comfy.clip_vision.ClipVisionModel, the object a
  CLIP_VISION socket carries) at a tiny size, in memory: for calling encoders and nodes directly.
- `vitl_clip_vision_file`: a file the host's CLIPVisionLoader loads, for running graphs through the
  executor. The smallest config the host detects is ViT-L/14 (24 layers, 304M params); matrices
  are stored float8_e4m3fn (the host upcasts on load), vectors fp16: 290 MiB. Key names and shapes
  come from the host's module built on the meta device; values from a generator seeded per key.
  Cached like tiny_models' checkpoint: under a name hashing what determines the content, written
  atomically under a lock.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import tiny_models

TINY_CLIP_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": 32, "image_size": 224,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 3,
    "patch_size": 32, "projection_dim": 16, "torch_dtype": "float32",
}
TINY_CLIP_WIDTH = TINY_CLIP_CONFIG["hidden_size"]
TINY_CLIP_TOKENS = (TINY_CLIP_CONFIG["image_size"] // TINY_CLIP_CONFIG["patch_size"]) ** 2 + 1


def tiny_clip_vision(folder: str | Path, seed: int = 0):
    """comfy.clip_vision.ClipVisionModel at a tiny size (width 32, 50 tokens), weights seeded by `seed`;
    its config file is written into `folder`."""
    import comfy.clip_vision
    import torch

    config = Path(folder) / "tiny_clip_vision.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    model = comfy.clip_vision.ClipVisionModel(str(config))
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) * 0.05 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
             for k, v in model.get_sd().items()}
    missing, unexpected = model.load_sd(state)
    assert not unexpected, unexpected
    return model


VITL_GENERATOR_VERSION = 1
VITL_CONFIG = "clip_vision_config_vitl.json"
VITL_NAME = "facestudio_test_vitl.safetensors"


def _vitl_config() -> dict:
    import comfy.clip_vision

    return json.loads((Path(comfy.clip_vision.__file__).parent / VITL_CONFIG).read_text())


def vitl_state_dict(seed: int = 0) -> dict:
    import comfy.clip_model
    import comfy.ops
    import torch

    with torch.device("meta"):
        module = comfy.clip_model.CLIPVisionModelProjection(_vitl_config(), torch.float32, "meta",
                                                            comfy.ops.manual_cast)
    out = {}
    for i, (key, meta) in enumerate(sorted(module.state_dict().items())):
        shape = meta.shape
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        if "layer_norm" in key or "layrnorm" in key:  # norm weights 1, biases 0
            value = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        elif key.endswith("bias"):
            value = torch.zeros(shape)
        elif len(shape) >= 2 and "embedding" not in key:  # keep activations at unit scale
            value = torch.randn(shape, generator=generator) * shape[1:].numel() ** -0.5
        else:
            value = torch.randn(shape, generator=generator) * 0.02
        out[key] = value.to(torch.float8_e4m3fn if len(shape) >= 2 else torch.float16)
    return out


def vitl_clip_vision_file(seed: int = 0) -> Path:
    """The cached ViT-L CLIP vision file for `seed`, generated on first use (about 2 s)."""
    spec = json.dumps({"version": VITL_GENERATOR_VERSION, "seed": seed, "config": _vitl_config()}, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    path = tiny_models.cache_dir() / f"clip_vision_vitl-v{VITL_GENERATOR_VERSION}-seed{seed}-{digest}.safetensors"
    return tiny_models.cached_file(path, lambda: vitl_state_dict(seed), {"facestudio_test_clip_vision": spec})


def install_vitl(models_dir: str | os.PathLike, name: str = VITL_NAME, seed: int = 0) -> str:
    """The cached file in `<models_dir>/clip_vision/`; returns the name CLIPVisionLoader knows."""
    return tiny_models.link_model(vitl_clip_vision_file(seed), models_dir, "clip_vision", name)
