"""Seeded random files in the real layouts of PuLID-FLUX's identity models, built once and cached.

No real weights can be downloaded here. Key names and shapes come from the reference code's own
modules, never from the pack's: EVA-CLIP's `create_model("EVA02-CLIP-L-14-336")` (PuLID's eva_clip/),
PuLID's `IDFormer()` and `PerceiverAttentionCA()`, facexlib's `RetinaFace("resnet50")`, `BiSeNet(19)`
and `ParseNet` (FaceRestoreHelper's constructor loads that one too). Values are seeded random:

- linear / conv weights ~ N(0, 1/fan_in) (He for the convnets), so activations keep their scale
  through 24 EVA blocks and attention is not uniform; residual output projections at half that;
- norm weights 1 + 0.1 N(0, 1) and biases 0.02 N(0, 1): not all ones, so a swapped or missing norm
  shows; BatchNorm running statistics near 0 / 1;
- computed tables (EVA's RoPE `freqs_cos`/`freqs_sin`) as the reference computes them;
- the convnets' BatchNorm running statistics measured on two other scikit-image photos (cat, coffee),
  so that activations keep their scale and the random detector finds a few "faces", not every anchor.

Files, under <cache>/pulid/ (cache: $FACESTUDIO_TEST_CACHE, default ~/.cache/comfyui-facestudio-tests):
- `EVA02_CLIP_L_336_psz14_s6B.pt`: fp16 like the release (856 MB for 428M parameters): the whole
  vision tower, the text tower's tensors of under 1M numbers and `logit_scale` (the text tower's big
  matrices are left out: nothing reads them), about 610 MB;
- `pulid_flux_v0.9.1.safetensors`: bf16, every `pulid_encoder.*` key and one `pulid_ca.0.*` set (the
  release has 20; another module reads them);
- `facexlib/detection_Resnet50_Final.pth`, `parsing_bisenet.pth`, `parsing_parsenet.pth`: fp32 like
  facexlib's releases, named as its loaders look them up (so facexlib finds them and downloads nothing).
Each file is written to a temporary name and renamed, under a name folder that hashes the generator.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from . import pulid_reference
from .face_models import cache_root

GENERATOR_VERSION = 2
EVA_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
PULID_FILE = "pulid_flux_v0.9.1.safetensors"
DETECTOR_FILE = "detection_Resnet50_Final.pth"
BISENET_FILE = "parsing_bisenet.pth"
PARSENET_FILE = "parsing_parsenet.pth"
SMALL_TEXT_NUMEL = 1_000_000


def folder() -> Path:
    spec = json.dumps({"generator": GENERATOR_VERSION}, sort_keys=True).encode()
    return cache_root() / "pulid" / hashlib.sha256(spec).hexdigest()[:12]


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fill(shapes: Mapping[str, torch.Size], seed: int, conv_gain: float = 1.0,
          residual: tuple[str, ...] = (), norms: Callable[[str, torch.Size], bool] | None = None,
          fixed: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Seeded values for `shapes` in fp32, by the rules of the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if fixed and name in fixed:
            out[name] = fixed[name].clone()
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[name] = torch.zeros(shape, dtype=torch.int64)
        elif leaf == "running_mean":
            out[name] = 0.05 * torch.randn(shape, generator=gen)
        elif leaf == "running_var":
            out[name] = 1 + 0.1 * torch.rand(shape, generator=gen)
        elif len(shape) == 1 and norms is not None and norms(name, shape) and leaf == "weight":
            out[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) <= 1:
            out[name] = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            std = conv_gain / math.sqrt(fan_in)
            if any(r in name for r in residual):
                std *= 0.5
            out[name] = std * torch.randn(shape, generator=gen)
    return out


# --- EVA02-CLIP-L-14-336 ---------------------------------------------------------------------------

def reference_eva_clip_model() -> torch.nn.Module:
    """The reference's whole EVA02-CLIP-L-14-336 (CustomCLIP, as PuLID builds it), randomly initialised."""
    return pulid_reference.eva_clip().create_model(pulid_reference.EVA_MODEL_NAME, force_custom_clip=True)


def _eva_norm(name: str, shape) -> bool:
    owner = name.rsplit(".", 2)[-2]
    return owner in ("norm", "norm1", "norm2", "ffn_ln", "inner_attn_ln", "ln_final", "ln_1", "ln_2", "ln_pre",
                     "ln_post", "fc_norm")


def eva_clip_file(seed: int = 0) -> Path:
    def write(tmp: Path) -> None:
        sd = reference_eva_clip_model().state_dict()
        keep = {k: v.shape for k, v in sd.items()
                if k.startswith("visual.") or k == "logit_scale" or v.numel() < SMALL_TEXT_NUMEL}
        fixed = {k: v for k, v in sd.items() if "freqs_" in k}
        fixed["logit_scale"] = torch.tensor(math.log(100.0))
        values = _fill(keep, seed, residual=(".attn.proj.", ".mlp.w3."), norms=_eva_norm, fixed=fixed)
        torch.save({k: v.half() for k, v in values.items()}, tmp)

    return _atomic(folder() / f"seed{seed}" / EVA_FILE, write)


# --- PuLID-FLUX ------------------------------------------------------------------------------------

def _pulid_norm(name: str, shape) -> bool:
    owner = name.rsplit(".", 2)[-2]
    if owner in ("norm1", "norm2"):
        return True
    parts = name.split(".")  # mapping_i.1 / .4, id_embedding_mapping.1 / .4; layers.N.1.0 (feed-forward LN)
    return (parts[0].startswith(("mapping_", "id_embedding_mapping")) and parts[1] in ("1", "4")) or \
        (parts[0] == "layers" and parts[2] == "1" and parts[3] == "0")


def pulid_flux_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    refs = pulid_reference._import("pulid.encoders_transformer")
    with torch.device("meta"):
        encoder = refs.IDFormer()
        ca = refs.PerceiverAttentionCA()
    shapes = {f"pulid_encoder.{k}": v.shape for k, v in encoder.state_dict().items()}
    shapes.update({f"pulid_ca.0.{k}": v.shape for k, v in ca.state_dict().items()})
    values = _fill({k.split(".", 1)[1] if k.startswith("pulid_encoder.") else k: s for k, s in shapes.items()},
                   seed, norms=_pulid_norm)
    values = {("pulid_encoder." + k if not k.startswith("pulid_ca.") else k): v for k, v in values.items()}
    # latents and proj_out as the reference initialises them (N(0, 1) * dim^-0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    dim = shapes["pulid_encoder.latents"][-1]
    for k in ("pulid_encoder.latents", "pulid_encoder.proj_out"):
        values[k] = torch.randn(shapes[k], generator=gen) * dim ** -0.5
    return values


def pulid_flux_file(seed: int = 0) -> Path:
    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in pulid_flux_state_dict(seed).items()}, str(tmp))

    return _atomic(folder() / f"seed{seed}" / PULID_FILE, write)


# --- facexlib --------------------------------------------------------------------------------------

def _bn_norm(name: str, shape) -> bool:
    return True  # a 1-D conv-net "weight" is always a BatchNorm's


def _calibration_photos(size: int) -> torch.Tensor:
    """[2, 3, size, size] RGB in 0..1: scikit-image's cat and coffee photos (not the test's astronaut)."""
    import cv2
    from skimage import data

    photos = [cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA) for p in (data.chelsea(), data.coffee())]
    return torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def _calibrate(module: torch.nn.Module, inputs: torch.Tensor) -> None:
    """BatchNorm running statistics measured on `inputs` (random convolutions with N(0, 1) statistics
    blow activations up to 1e5 through ResNet50, and every anchor then "detects" a face)."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the calibration pass
    module.train()
    module(inputs)
    module.eval()


def facexlib_folder(seed: int = 0) -> Path:
    """The folder holding the three facexlib files (facexlib's `model_rootpath`)."""
    target = folder() / f"seed{seed}" / "facexlib"

    def module_file(name: str, build: Callable[[], torch.nn.Module], offset: int,
                    calibration: torch.Tensor | None) -> None:
        def write(tmp: Path) -> None:
            module = build()
            shapes = {k: v.shape for k, v in module.state_dict().items()}
            module.load_state_dict(_fill(shapes, seed + offset, conv_gain=math.sqrt(2.0), norms=_bn_norm))
            if calibration is not None:
                _calibrate(module, calibration)
            with torch.no_grad():
                # The heads' outputs at a trained detector's scale (box offsets of about 1 prior unit: random
                # ones of 5 make boxes e^1 too big or small), and odds of 1 to e^3 against "face" at every
                # anchor, as a trained detector's background prior: a few anchors of a photo score above 0.97.
                for name in ("ClassHead", "BboxHead", "LandmarkHead"):
                    for head in getattr(module, name, ()):
                        head.conv1x1.weight.mul_(0.2)
                        if name == "ClassHead":
                            head.conv1x1.bias[0::2] += 3.0
            torch.save({k: v.clone() for k, v in module.state_dict().items()}, tmp)

        _atomic(target / name, write)

    retinaface = pulid_reference.facexlib("facexlib.detection.retinaface")
    bisenet = pulid_reference.facexlib("facexlib.parsing.bisenet")
    parsenet = pulid_reference.facexlib("facexlib.parsing.parsenet")
    photos = _calibration_photos(256)
    # RetinaFace reads BGR in 0..255 less its mean; BiSeNet ImageNet-normalized RGB (as PuLID feeds them).
    bgr = photos.flip(1) * 255 - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    imagenet = (photos - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    module_file(DETECTOR_FILE, lambda: retinaface.RetinaFace(network_name="resnet50", device="cpu"), 10, bgr)
    module_file(BISENET_FILE, lambda: bisenet.BiSeNet(num_class=19), 20, imagenet)
    module_file(PARSENET_FILE, lambda: parsenet.ParseNet(in_size=512, out_size=512, parsing_ch=19), 30, None)
    return target
