"""A seeded, random, tiny FLUX.1-architecture diffusion model and PuLID-FLUX files to go with it.

No FLUX or PuLID weights can be downloaded here, so the tests make their own, in the real files' key
layouts taken from an independent source, the reference's modules built on the meta device:
- the FLUX model: PuLID's flux/model.py (Black Forest Labs' FLUX code, whose key names FLUX.1 dev's
  single-file release uses, RMSNorm weights as `.scale`), at width 256 (2 heads of 128: the host
  derives the heads from the width over sum(axes_dim) = 128), 3 double and 5 single blocks, reading
  CLIP-L's 768-wide states and pooled vector (clip_l_file(): the host's CLIPLoader encodes for it).
- its VAE: a taef1 (TAESD with FLUX's 16 latent channels and scale/shift) under `taesd_*` keys, which
  the host's VAELoader reads from any file in models/vae (vae_file()). The host's own loader (comfy.sd.load_diffusion_model)
  reads every size back from the tensors (on v0.33; see load_tiny_flux for older hosts).
- PuLID-FLUX: `pulid_ca.<k>.*` from PuLID's PerceiverAttentionCA and `pulid_encoder.*` from its IDFormer.
  `pulid_flux_file()` is scaled down to the tiny model (4 CA modules: after double blocks 0, 2 and single
  blocks 0, 4; width 256 over 64-wide ID tokens); `real_pulid_flux_state_dict()` is the real layout (20
  modules, 3072 over 2048) on `meta`, for layout checks without 1 GB of tensors.

RMSNorm scales are 1 and the CA's LayerNorm weights near 1 (never 0: a zero norm makes every
comparison pass vacuously). Files are cached outside git (tiny_models.cache_dir) under a hash of their spec.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from . import pulid_flux_reference as reference
from .tiny_models import cache_dir, cached_file

GENERATOR_VERSION = 2
DEFAULT_SEED = 0
UNET_NAME = "tiny_flux1.safetensors"

# FluxParams of the reference's FLUX.1 (flux/util.py configs), shrunk; in_channels is 16 latent channels x 2x2.
# Its text widths are CLIP-L's (768 states, 768 pooled): FLUX's T5-XXL (4.7B parameters, a fixed config in the
# host) has no small form, so the workflow tests encode their prompts with the host's own CLIP-L loader instead.
TINY_FLUX_PARAMS = dict(in_channels=64, vec_in_dim=768, context_in_dim=768, hidden_size=256, mlp_ratio=4.0,
                        num_heads=2, depth=3, depth_single_blocks=5, axes_dim=[16, 56, 56], theta=10_000,
                        qkv_bias=True, guidance_embed=True)
# PerceiverAttentionCA at the tiny width, and 4 of them (ceil(3/2) + ceil(5/4)).
TINY_CA = dict(dim=256, dim_head=128, heads=2, kv_dim=64)  # PuLID's 128-wide heads, as every real file
TINY_CA_MODULES = 4
TINY_IDFORMER = dict(dim=64, depth=5, dim_head=16, heads=4, num_id_token=5, num_queries=32, output_dim=64)
ID_TOKENS = 32
FLUX_DTYPE = torch.bfloat16  # as FLUX.1 dev's release
PULID_DTYPE = torch.bfloat16  # as pulid_flux_v0.9.1.safetensors
BIAS_STD = 0.01


def _spec(seed: int, what: str) -> dict:
    return {"generator": GENERATOR_VERSION, "seed": seed, "what": what, "flux": TINY_FLUX_PARAMS, "ca": TINY_CA,
            "ca_modules": TINY_CA_MODULES, "idformer": TINY_IDFORMER, "dtypes": [str(FLUX_DTYPE), str(PULID_DTYPE)]}


def _hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _meta(make):
    with torch.device("meta"):
        return make()


def _shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[str, torch.Size]]:
    """state-dict key -> (how to fill it, shape), from a module's parameters."""
    out = {}
    for name, sub in module.named_modules():
        for param_name, param in sub.named_parameters(recurse=False):
            key = prefix + (f"{name}.{param_name}" if name else param_name)
            if param_name == "scale":  # BFL's RMSNorm
                kind = "one"
            elif isinstance(sub, torch.nn.LayerNorm):
                kind = "norm" if param_name == "weight" else "bias"
            elif param_name == "bias":
                kind = "bias"
            elif param.dim() >= 2:
                kind = "fan_in"
            else:
                raise ValueError(f"no fill chosen for {key} {tuple(param.shape)}")
            out[key] = (kind, param.shape)
    return out


def _fill(key: str, kind: str, shape: torch.Size, seed: int) -> torch.Tensor:
    if kind == "one":
        return torch.ones(shape)
    key_seed = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1
    g = torch.Generator().manual_seed(key_seed)
    if kind == "norm":
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if kind == "bias":
        return BIAS_STD * torch.randn(shape, generator=g)
    # (out, in) linear, IDFormer's [1, queries, dim] latents / [dim, out] projection: unit-scale activations
    return torch.randn(shape, generator=g) * shape[-1] ** -0.5


def _filled(layout: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: _fill(k, kind, shape, seed).to(dtype) for k, (kind, shape) in layout.items()}


# --- the FLUX model ---------------------------------------------------------------------------------
def flux_layout() -> dict[str, tuple[str, torch.Size]]:
    flux, params = reference.flux_model()
    return _shapes(_meta(lambda: flux(params(**TINY_FLUX_PARAMS))))


def tiny_flux_file(seed: int = DEFAULT_SEED) -> Path:
    spec = _spec(seed, "flux")
    path = cache_dir() / f"tiny_flux1-v{GENERATOR_VERSION}-seed{seed}-{_hash(spec)}.safetensors"
    return cached_file(path, lambda: _filled(flux_layout(), seed, FLUX_DTYPE),
                       {"facestudio_tiny_flux": json.dumps(spec, sort_keys=True)})


def load_tiny_flux(seed: int = DEFAULT_SEED, dtype: torch.dtype = torch.float32):
    """The MODEL (ModelPatcher) as UNETLoader gives it: the host's loader, which reads every size from the tensors.

    Hosts before 0.33 (0.3.64 among them) detect any FLUX file as 3072 wide with a 4096-wide context:
    there the host's own FLUX config is given the tensors' sizes, then built and loaded the way its
    loader does (config.get_model, load_model_weights, ModelPatcher)."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    path = str(tiny_flux_file(seed))
    sd = comfy.utils.load_torch_file(path)
    config = comfy.model_detection.model_config_from_unet(sd, "")
    width = sd["img_in.weight"].shape[0]
    if config.unet_config["hidden_size"] == width:
        return comfy.sd.load_diffusion_model(path, model_options={"dtype": dtype})
    config.unet_config.update(hidden_size=width, num_heads=width // sum(config.unet_config["axes_dim"]),
                              context_in_dim=sd["txt_in.weight"].shape[1])
    config.set_inference_dtype(dtype, None)
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def conditioning(seed: int = 0, text_tokens: int = 8, guidance: float = 3.5) -> list:
    """A CONDITIONING as FLUX's text encoders give it: T5 states [1, L, context] (txt_in's input width), CLIP-L's
    pooled vector as `pooled_output` [1, vec] (vector_in's y) and FluxGuidance's `guidance`."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, text_tokens, TINY_FLUX_PARAMS["context_in_dim"], generator=g)
    pooled = torch.randn(1, TINY_FLUX_PARAMS["vec_in_dim"], generator=g)
    return [[context, {"pooled_output": pooled, "guidance": guidance}]]


# --- text encoder and VAE for the workflows -------------------------------------------------------------
TAEF1_SCALARS = {"vae_scale": 0.3611, "vae_shift": 0.1159}  # FLUX's latent scale and shift, as taef1's


def clip_l_file(seed: int = 0) -> Path:
    """CLIP-L as FLUX's clip_l.safetensors stores it (HF CLIPTextModel keys, `text_model.*`): the tiny SD1.5
    checkpoint's text encoder, the same seeded tensors."""
    from . import tiny_models

    spec = {"what": "clip_l", "checkpoint": tiny_models.spec_hash(seed)}
    path = cache_dir() / f"clip_l-seed{seed}-{_hash(spec)}.safetensors"

    def make():
        tensors = tiny_models.state_dict(seed, prefixes=(tiny_models.CLIP_PREFIX,))
        return {"text_model." + k[len(tiny_models.CLIP_PREFIX):]: v for k, v in tensors.items()}

    return cached_file(path, make, {"facestudio_clip_l": json.dumps(spec, sort_keys=True)})


def vae_file(seed: int = 0) -> Path:
    """A seeded taef1 (TAESD, 16 latent channels) as a models/vae file: the host builds a TAESD from its keys."""
    import comfy.taesd.taesd

    from . import tiny_models

    spec = {"what": "taef1", "seed": seed, "scalars": TAEF1_SCALARS, "generator": GENERATOR_VERSION}
    path = cache_dir() / f"taef1-seed{seed}-{_hash(spec)}.safetensors"

    def make():
        with torch.device("meta"):
            module = comfy.taesd.taesd.TAESD(latent_channels=16)
        out = {}
        for key, (kind, shape) in tiny_models._kinds(module).items():
            name = key.rsplit(".", 1)[-1]
            out[key] = (torch.full(shape, TAEF1_SCALARS[name]) if kind == "scalar"
                        else tiny_models._fill(key, kind, shape, seed)).to(torch.float16)
        return out

    return cached_file(path, make, {"facestudio_taef1": json.dumps(spec, sort_keys=True)})


# --- PuLID-FLUX files --------------------------------------------------------------------------------
def _pulid_layout(ca: dict, modules: int, idformer: dict) -> dict[str, tuple[str, torch.Size]]:
    ca_class, id_class = reference.perceiver_attention_ca(), reference.idformer()
    layout = {}
    for k in range(modules):
        layout.update(_shapes(_meta(lambda: ca_class(**ca)), f"pulid_ca.{k}."))
    layout.update(_shapes(_meta(lambda: id_class(**idformer)), "pulid_encoder."))
    return layout


def pulid_flux_file(seed: int = DEFAULT_SEED) -> Path:
    """A PuLID-FLUX file scaled down to the tiny model (the loader reads its layout from the tensors)."""
    spec = _spec(seed, "pulid_flux")
    path = cache_dir() / f"tiny_pulid_flux-v{GENERATOR_VERSION}-seed{seed}-{_hash(spec)}.safetensors"
    return cached_file(path, lambda: _filled(_pulid_layout(TINY_CA, TINY_CA_MODULES, TINY_IDFORMER), seed, PULID_DTYPE),
                       {"facestudio_tiny_pulid_flux": json.dumps(spec, sort_keys=True)})


def tiny_ca_layout_fields() -> dict:
    """The CALayout fields pulid_flux_file() was written with (modules, widths, heads)."""
    return dict(modules=TINY_CA_MODULES, dim=TINY_CA["dim"], id_dim=TINY_CA["kv_dim"], heads=TINY_CA["heads"],
                dim_head=TINY_CA["dim_head"])


def real_pulid_flux_state_dict(modules: int = 20, **ca) -> dict[str, torch.Tensor]:
    """The real PuLID-FLUX layout (PerceiverAttentionCA's defaults: 3072 over 2048, 16 x 128; IDFormer's
    defaults) as meta tensors; `modules` and `ca` (dim=..., kv_dim=...) make wrong variants."""
    ca_class, id_class = reference.perceiver_attention_ca(), reference.idformer()
    out = {}
    for k in range(modules):
        out.update({f"pulid_ca.{k}.{n}": t for n, t in _meta(lambda: ca_class(**ca)).state_dict().items()})
    out.update({f"pulid_encoder.{n}": t for n, t in _meta(id_class).state_dict().items()})
    return out


def id_tokens(seed: int, width: int = TINY_CA["kv_dim"]) -> torch.Tensor:
    """[1, 32, width] seeded ID tokens, as the IDFormer's output."""
    return torch.randn(1, ID_TOKENS, width, generator=torch.Generator().manual_seed(seed))
