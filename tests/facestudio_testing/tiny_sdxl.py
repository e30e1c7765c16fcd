"""A seeded, random, small SDXL-architecture UNet in ComfyUI's diffusion-model format, and what goes with it.

No SDXL weights can be downloaded here, so the tests make their own, as tiny_models.py does for SD1.5:
real key names and shapes (from the host's UNetModel built on the meta device), seeded random values.
What the host must see to detect SDXL (comfy.supported_models.SDXL.unet_config): model_channels 320,
context_dim 2048, adm_in_channels 2816, transformer depths [0, 0, 2, 2, 10, 10] and linear
projections in the transformers. channel_mult is free: [1, 1, 1] keeps every block 320 wide (about
280M parameters) while cross-attention sits at exactly SDXL's 70 positions (transformer indices
0..9 in the 10-deep blocks), so patches address the same keys as on the real model.

- The UNet file (`unet_file`) has the bare UNet keys, as SDXL diffusion-model files do, and loads
  through the host's UNETLoader (models/unet = diffusion_models). Matrices are stored float8_e4m3fn,
  vectors fp16 (the host upcasts on load): 270 MiB. Norm weights 1, biases 0 (see tiny_models).
- Adapters for it (`adapter_state_dict`): the real SDXL image projections (widths as released, the
  FaceID Plus resampler slimmed), with `ip_adapter` layers 320 wide at its 70 positions. The 70
  layer pairs are 92M parameters, so tests share one set (`shared_layers`) across kinds.
- A whole checkpoint (`checkpoint_file`), for graphs that load SDXL with CheckpointLoaderSimple (the
  bundled SDXL workflows): the same UNet, SDXL's two text encoders at full size (CLIP-L 123M and
  bigG 695M parameters: the host builds them from fixed configs) and a TAESD VAE with the host's
  taesdxl scaling, in the SDXL checkpoint key layout. Matrices float8_e4m3fn, vectors fp16: about
  1.1 GiB; about 8 s to generate on 2 CPU cores, cached like the UNet file.
- Conditioning: SDXL's BaseModel needs `pooled_output` [B, 1280] with the [B, tokens, 2048] context
  (its encode_adm adds the size conditioning from defaults). `conditioning` builds it in memory, and
  `RandomSDXLConditioning` is a test-only node that outputs it, so graphs need no SDXL text
  encoders (CLIP-L + bigG would be about 800M parameters); `registered_conditioning_node` adds it to
  the host's node table for the duration of a test module.

Needs the booted host (facestudio_testing.bootstrap.boot()): it imports `comfy`.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from . import adapter_files as af
from . import tiny_models

GENERATOR_VERSION = 1
DEFAULT_SEED = 0
UNET_NAME = "tiny_sdxl_unet.safetensors"
UNET_FOLDER = "unet"  # one of the host's diffusion_models folders

SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
CONTEXT = 2048
POOLED = 1280
# Every attn2 of the tiny UNet, in diffusers' order: 320 wide throughout, 70 of them.
WIDTHS = af.unet_cross_attention_widths((320, 320, 320), (0, 2, 10), 2, 10)

MATRIX_DTYPE = torch.float8_e4m3fn
VECTOR_DTYPE = torch.float16


# --- the UNet file ---------------------------------------------------------------------------------
def _unet_module():
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**SDXL_UNET_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)


def _spec(seed: int) -> dict:
    return {"generator": GENERATOR_VERSION, "seed": seed, "unet": SDXL_UNET_CONFIG,
            "dtypes": [str(MATRIX_DTYPE), str(VECTOR_DTYPE)], "std": [tiny_models.EMBEDDING_STD, tiny_models.BIAS_STD]}


def spec_hash(seed: int = DEFAULT_SEED) -> str:
    return hashlib.sha256(json.dumps(_spec(seed), sort_keys=True).encode()).hexdigest()[:16]


def unet_state_dict(seed: int = DEFAULT_SEED) -> dict[str, torch.Tensor]:
    """Bare UNet keys ("input_blocks.0.0.weight", ...), values from tiny_models' per-key seeded fill."""
    out = {}
    for key, (kind, shape) in tiny_models._kinds(_unet_module()).items():
        value = tiny_models._fill(key, kind, shape, seed)
        out[key] = value.to(MATRIX_DTYPE if len(shape) >= 2 else VECTOR_DTYPE)
    return out


def unet_file(seed: int = DEFAULT_SEED) -> Path:
    """The cached UNet file for `seed`, generated on first use (a few seconds), written atomically."""
    path = tiny_models.cache_dir() / f"tiny_sdxl_unet-v{GENERATOR_VERSION}-seed{seed}-{spec_hash(seed)}.safetensors"
    return tiny_models.cached_file(path, lambda: unet_state_dict(seed),
                                   {"facestudio_tiny_sdxl": json.dumps(_spec(seed), sort_keys=True)})


def install_unet(models_dir: str | os.PathLike, name: str = UNET_NAME, seed: int = DEFAULT_SEED) -> str:
    """The cached UNet in `<models_dir>/unet/`; returns the name UNETLoader knows."""
    import folder_paths

    linked = tiny_models.link_model(unet_file(seed), models_dir, UNET_FOLDER, name)
    folder_paths.filename_list_cache.pop("diffusion_models", None)
    return linked


def load_unet(seed: int = DEFAULT_SEED):
    """The MODEL (ModelPatcher) as UNETLoader makes it."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(unet_file(seed)))


# --- a whole checkpoint: UNet, CLIP-L + bigG text encoders, TAESD -----------------------------------
CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
CLIP_G_PREFIX = "conditioner.embedders.1.model.transformer."  # -> clip_g.transformer. (HF layout)
# What the host's VAELoader sets for taesdxl (nodes.VAELoader.load_taesd).
TAESD_SCALARS = {"vae_scale": 0.13025, "vae_shift": 0.0}


def _clip_g_module():
    import comfy.sd1_clip
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = json.loads(Path(comfy.sd1_clip.__file__).with_name("clip_config_bigg.json").read_text())
    with torch.device("meta"):
        return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def _stored(key: str, kind: str, shape: torch.Size, seed: int) -> torch.Tensor:
    if kind == "scalar":  # TAESD's vae_scale / vae_shift
        return torch.full(shape, TAESD_SCALARS[key.rsplit(".", 1)[-1]], dtype=VECTOR_DTYPE)
    return tiny_models._fill(key, kind, shape, seed).to(MATRIX_DTYPE if len(shape) >= 2 else VECTOR_DTYPE)


def checkpoint_state_dict(seed: int = DEFAULT_SEED) -> dict[str, torch.Tensor]:
    """An SDXL checkpoint's tensors: the tiny UNet (the same values as `unet_file`), full-size CLIP-L and
    bigG (seeded per key; norm weights 1), TAESD."""
    out = {tiny_models.UNET_PREFIX + key: value for key, value in unet_state_dict(seed).items()}
    for key, (kind, shape, _) in tiny_models.layout((tiny_models.CLIP_PREFIX,)).items():
        key = CLIP_L_PREFIX + key.removeprefix(tiny_models.CLIP_PREFIX)
        out[key] = _stored(key, kind, shape, seed)
    for key, (kind, shape) in tiny_models._kinds(_clip_g_module()).items():
        # transformers 5 dropped the `text_model.` level that checkpoints keep.
        key = CLIP_G_PREFIX + (key if key.startswith(("text_model.", "text_projection")) else "text_model." + key)
        out[key] = _stored(key, kind, shape, seed)
    for key, (kind, shape, _) in tiny_models.layout((tiny_models.VAE_PREFIX,)).items():
        out[key] = _stored(key, kind, shape, seed)
    return out


def _checkpoint_spec(seed: int) -> dict:
    return {**_spec(seed), "checkpoint": [CLIP_L_PREFIX, CLIP_G_PREFIX, "clip_config_bigg.json", TAESD_SCALARS]}


def checkpoint_file(seed: int = DEFAULT_SEED) -> Path:
    """The cached SDXL checkpoint for `seed`, generated on first use, written atomically."""
    spec = _checkpoint_spec(seed)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = tiny_models.cache_dir() / f"tiny_sdxl_checkpoint-v{GENERATOR_VERSION}-seed{seed}-{digest}.safetensors"
    return tiny_models.cached_file(path, lambda: checkpoint_state_dict(seed),
                                   {"facestudio_tiny_sdxl_checkpoint": json.dumps(spec, sort_keys=True)})


# --- adapters for it ---------------------------------------------------------------------------------
# Real SDXL FaceID Plus v2 runs its resampler at the context width (2048, 32 heads, 4 blocks, ff x4:
# about 200M parameters). v2's shortcut needs exactly that width; the slimmed resampler keeps the
# width and shrinks what no loader constrains (one block, one 64-wide head, ff x1).
PLUS_SIZES = {"resampler_dim": CONTEXT, "resampler_depth": 1, "resampler_heads": 1, "ff_mult": 1}


_LAYERS: dict[int, dict[str, torch.Tensor]] = {}


def shared_layers(seed: int = 0) -> dict[str, torch.Tensor]:
    """`ip_adapter` to_k_ip / to_v_ip at the tiny UNet's 70 positions, fp16 (92M parameters, made once
    per process and seed; shared: do not change them)."""
    if seed not in _LAYERS:
        _LAYERS[seed] = af.attention_layers(WIDTHS, CONTEXT, af._Random(seed, torch.float16), None)
    return _LAYERS[seed]


def image_projection(kind: str, seed: int = 1, **sizes) -> dict[str, torch.Tensor]:
    """The SDXL `image_proj` of `kind`, fp16. `sizes`: adapter_files.image_projection's options
    (CLIP widths, resampler sizes); FaceID Plus defaults to PLUS_SIZES."""
    if kind.startswith("faceid-plus"):
        sizes = {**PLUS_SIZES, **sizes}
    return af.image_projection(kind, af.SDXL, af._Random(seed, torch.float16), **sizes)


def adapter_state_dict(kind: str, seed: int = 1, layers_seed: int = 0, **sizes) -> dict[str, dict]:
    """Nested {"image_proj", "ip_adapter"} of an SDXL adapter that fits the tiny UNet (layers shared)."""
    return {"image_proj": image_projection(kind, seed, **sizes), "ip_adapter": shared_layers(layers_seed)}


# --- conditioning ----------------------------------------------------------------------------------
# The context length is free (the text encoders give 77 per chunk); at 77 tokens the 70 attn2 K/V
# projections of the context (2 x 2048 x 320 each) cost several times the rest of the tiny UNet.
CONTEXT_TOKENS = 8


def conditioning(seed: int = 0, batch: int = 1, tokens: int = CONTEXT_TOKENS) -> list:
    """CONDITIONING for SDXL: seeded [B, tokens, 2048] context with a [B, 1280] pooled output."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, CONTEXT, generator=gen)
    pooled = torch.randn(batch, POOLED, generator=gen)
    return [[context, {"pooled_output": pooled}]]


class RandomSDXLConditioning:
    """Test-only node: SDXL CONDITIONING from a seed (no text encoders)."""

    NODE_ID = "FaceStudioTestRandomSDXLConditioning"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed: int):
        return (conditioning(seed),)


@contextmanager
def registered_conditioning_node():
    """RandomSDXLConditioning in the host's node table while the block runs."""
    import nodes

    nodes.NODE_CLASS_MAPPINGS[RandomSDXLConditioning.NODE_ID] = RandomSDXLConditioning
    try:
        yield RandomSDXLConditioning.NODE_ID
    finally:
        nodes.NODE_CLASS_MAPPINGS.pop(RandomSDXLConditioning.NODE_ID, None)


# --- CLIP vision models with ViT-H's / ViT-bigG's output widths -----------------------------------
# The adapters read only these widths: ViT-H/14 has 1280-wide hidden states and 1024-wide image
# embeds (SDXL FaceID Plus v2, Plus, ip-adapter_sdxl_vit-h); ViT-bigG/14 1664 and 1280
# (ip-adapter_sdxl). Depth, heads, MLP and patch size stay tiny (3 layers, 50 tokens).
VIT_H_WIDTHS = {"hidden_size": 1280, "projection_dim": 1024}
VIT_BIGG_WIDTHS = {"hidden_size": 1664, "projection_dim": 1280}


def clip_vision(folder: str | Path, widths: dict, seed: int = 0):
    """comfy.clip_vision.ClipVisionModel with clip_models' tiny config at `widths`; weights seeded."""
    import comfy.clip_vision

    from . import clip_models

    config = {**clip_models.TINY_CLIP_CONFIG, **widths}
    path = Path(folder) / f"clip_vision_{config['hidden_size']}_{config['projection_dim']}.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.get_sd().items():
        if ("norm" in key or "layrnorm" in key) and value.ndim == 1:  # norm weights 1, biases 0
            state[key] = torch.ones(value.shape) if key.endswith("weight") else torch.zeros(value.shape)
        elif value.ndim >= 2 and "embedding" not in key:
            state[key] = torch.randn(value.shape, generator=generator) * value.shape[1:].numel() ** -0.5
        else:
            state[key] = torch.randn(value.shape, generator=generator) * 0.02
    missing, unexpected = model.load_sd(state)
    assert not unexpected and not missing, (missing, unexpected)
    return model
