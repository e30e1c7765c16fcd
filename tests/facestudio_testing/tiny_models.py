"""A seeded, random, tiny SD1.5-architecture checkpoint in ComfyUI's single-file format.

No Stable Diffusion weights can be downloaded here, so the tests make their own: the real key
names and shapes (taken from the host's and transformers' modules, built on the meta device),
filled with seeded random values. What the host must see:

- UNet (`model.diffusion_model.*`): model_channels 320 and context_dim 768 are what make the host
  detect SD1.5; channel_mult [1,1,1,1] keeps it at about 110M params, while cross-attention sits
  at exactly SD1.5's 16 positions so attention patches address the same blocks as on the real
  model. Stored fp16, as pruned SD1.5 checkpoints are.
- CLIP-L (`cond_stage_model.transformer.text_model.*`): always full size (the host's SD1 text
  encoder has a fixed config); stored float8_e4m3fn to halve the file (the host upcasts on load).
- TAESD (`first_stage_model.taesd_encoder/decoder.*`): the host's VAE builds a 2.45M-param TAESD
  when it sees `taesd_decoder.1.weight`.

Norm weights are 1 and biases 0: zero norm weights would make the UNet output exactly 0 for any
input, and every comparison test would pass vacuously.

The file is cached outside git under a name that hashes everything that determines its content,
and written atomically so that parallel or aborted runs never leave a broken file behind.
Needs the booted host (facestudio_testing.bootstrap.boot()): it imports `comfy`.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

# Bump when anything below changes what gets written: the cache name depends on it. (Key names
# come from the host's/transformers' modules and are not hashed; test_tiny_checkpoint checks them.)
GENERATOR_VERSION = 2
DEFAULT_SEED = 0
CHECKPOINT_NAME = "tiny_sd15.safetensors"

# What the host's model detection reads back from an SD1.5 state dict, with channel_mult shrunk.
# transformer_depth is per input res block (input_blocks 1,2,4,5,7,8,10,11);
# transformer_depth_output is per output block LAST FIRST (UNetModel pops it from the end, so
# its first entry is output_blocks.11): with the middle block, SD1.5's 16 cross-attentions.
SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 1, 1, 1],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_heads": 8,
    "num_head_channels": -1,
}

# SD1.5's cross-attention blocks, as (block, index) in the host's patch keys ("input", 1) ...
SD15_CROSS_ATTENTION_BLOCKS = (
    [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", i) for i in range(3, 12)]
)

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
VAE_PREFIX = "first_stage_model."

UNET_DTYPE = torch.float16
CLIP_DTYPE = torch.float8_e4m3fn
VAE_DTYPE = torch.float16

EMBEDDING_STD = 0.02
BIAS_STD = 0.01
# What the host's own TAESD loader sets for SD1.5 (nodes.VAELoader.load_taesd): with it the
# decoder sees the sampler's raw latent again after SD15's process_out.
TAESD_SCALARS = {"vae_scale": 0.18215, "vae_shift": 0.0}


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "comfyui-facestudio-tests"
    return Path(os.environ.get("FACESTUDIO_TEST_CACHE") or default)


def _spec(seed: int) -> dict:
    return {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "unet": SD15_UNET_CONFIG,
        "dtypes": [str(UNET_DTYPE), str(CLIP_DTYPE), str(VAE_DTYPE)],
        "std": [EMBEDDING_STD, BIAS_STD],
        "taesd": TAESD_SCALARS,
    }


def spec_hash(seed: int = DEFAULT_SEED) -> str:
    return hashlib.sha256(json.dumps(_spec(seed), sort_keys=True).encode()).hexdigest()[:16]


# --- key names and shapes, from the real modules on the meta device --------------------------
def _unet_module():
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**SD15_UNET_CONFIG, device="meta", operations=comfy.ops.disable_weight_init)


def _clip_module():
    import comfy.sd1_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    config_path = Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**json.loads(config_path.read_text())))


def _taesd_module():
    import comfy.taesd.taesd

    with torch.device("meta"):
        return comfy.taesd.taesd.TAESD(latent_channels=4)


def _kinds(module: torch.nn.Module) -> dict[str, tuple[str, torch.Size]]:
    """state-dict key -> (how to fill it, shape)."""
    out = {}
    for module_name, sub in module.named_modules():
        for param_name, param in sub.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                kind = "one" if param_name == "weight" else "zero"
            elif isinstance(sub, torch.nn.Embedding):
                kind = "embedding"
            elif param_name == "bias":
                kind = "bias"
            elif param.dim() >= 2:
                kind = "fan_in"
            else:
                kind = "scalar"
            out[key] = (kind, param.shape)
    return out


def layout(prefixes: tuple[str, ...] = (UNET_PREFIX, CLIP_PREFIX, VAE_PREFIX)) -> dict[str, tuple[str, torch.Size, torch.dtype]]:
    """Every key of the checkpoint's parts named by `prefixes` -> (fill kind, shape, stored dtype)."""
    result = {}
    if UNET_PREFIX in prefixes:
        for key, (kind, shape) in _kinds(_unet_module()).items():
            result[UNET_PREFIX + key] = (kind, shape, UNET_DTYPE)
    if CLIP_PREFIX in prefixes:
        # transformers 5 dropped the `text_model.` level that SD1.5 files keep (CLIP_PREFIX has it).
        for key, (kind, shape) in _kinds(_clip_module()).items():
            result[CLIP_PREFIX + key.removeprefix("text_model.")] = (kind, shape, CLIP_DTYPE)
    if VAE_PREFIX in prefixes:
        for key, (kind, shape) in _kinds(_taesd_module()).items():
            result[VAE_PREFIX + key] = (kind, shape, VAE_DTYPE)
    return result


# --- values ------------------------------------------------------------------------------------
def _fill(key: str, kind: str, shape: torch.Size, seed: int) -> torch.Tensor:
    if kind == "one":
        return torch.ones(shape)
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "scalar":
        name = key.rsplit(".", 1)[-1]
        if name not in TAESD_SCALARS:
            raise ValueError(f"no value chosen for the scalar parameter {key}")
        return torch.full(shape, TAESD_SCALARS[name])
    # One generator per key: values do not shift when another key is added or removed.
    key_seed = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1
    generator = torch.Generator().manual_seed(key_seed)
    if kind == "embedding":
        std = EMBEDDING_STD
    elif kind == "bias":
        std = BIAS_STD
    else:  # linear (out, in) or conv (out, in, k, k): keep activations at unit scale
        std = (shape[1:].numel()) ** -0.5
    return torch.randn(shape, generator=generator) * std


def state_dict(seed: int = DEFAULT_SEED,
               prefixes: tuple[str, ...] = (UNET_PREFIX, CLIP_PREFIX, VAE_PREFIX)) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, in their stored dtypes; `prefixes` picks parts, e.g. (UNET_PREFIX,)."""
    return {key: _fill(key, kind, shape, seed).to(dtype) for key, (kind, shape, dtype) in layout(prefixes).items()}


# --- the cached file ---------------------------------------------------------------------------
@contextmanager
def _locked(path: Path):
    """Serialises generation across processes (pytest-xdist workers, parallel runs)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def save_atomically(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written to a temp file in the same folder, then renamed: never half-written."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_file(path: Path, make: Callable[[], dict], metadata: dict[str, str]) -> Path:
    """`path`, written atomically from `make()` unless it is there already; one process generates it."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            if not path.is_file():  # another process may have written it while we waited
                save_atomically(make(), path, metadata)
    return path


def tiny_sd15_checkpoint(seed: int = DEFAULT_SEED) -> Path:
    """The cached checkpoint for `seed`, generated on first use."""
    path = cache_dir() / f"tiny_sd15-v{GENERATOR_VERSION}-seed{seed}-{spec_hash(seed)}.safetensors"
    return cached_file(path, lambda: state_dict(seed), {"facestudio_tiny_sd15": json.dumps(_spec(seed), sort_keys=True)})


def link_model(target: Path, models_dir: str | os.PathLike, folder: str, name: str) -> str:
    """Symlinks a cached file into `<models_dir>/<folder>/<name>`; returns `name`, as the host's loaders know it."""
    link = Path(models_dir) / folder / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return name
        link.unlink()
    link.symlink_to(target)
    return name


def install_checkpoint(models_dir: str | os.PathLike, name: str = CHECKPOINT_NAME,
                       seed: int = DEFAULT_SEED) -> str:
    """The cached checkpoint in `<models_dir>/checkpoints/`, for the host's CheckpointLoaderSimple."""
    return link_model(tiny_sd15_checkpoint(seed), models_dir, "checkpoints", name)
