"""EVA02-CLIP-L-14-336's vision tower, as PuLID-FLUX reads a face through it.

The file users have is QuanSun/EVA-CLIP's `EVA02_CLIP_L_336_psz14_s6B.pt` (a torch state dict, fp16,
vision keys under `visual.`, text tower under `text.`); only the vision tower is loaded. The tower is
timm's `eva02_large_patch14_clip_336` (subln attention with q/v biases and an inner LayerNorm,
SwiGLU MLP with its LayerNorm, 2-D RoPE interpolated from 16x16 to 24x24, CLS pooling, a 768-wide
head), and timm's own EVA checkpoint filter maps the EVA-CLIP key names onto it, so the layout
knowledge lives in one maintained place. It reproduces the reference tower: on the same seeded
random weights in fp32, tests/test_pulid_identity.py measures 1.3e-7 between the normed CLS
embeddings and at most 1.1e-5 between the hidden states (whose values reach 16) against PuLID's own
eva_clip/ code (the residue is timm's fused scaled_dot_product_attention against the reference's
explicit softmax(q k^T) v). Nothing had to be approximated: timm's `forward_intermediates` reports
block outputs, and block k's input is block k-1's output.

What PuLID takes (pulid/pipeline_flux.py get_id_embedding), and `EvaClipVision.encode` returns:
- the CLS token after the final LayerNorm, through the head, L2-normed: [B, 768];
- the *inputs* of blocks 4, 8, 12, 16 and 20 (= the outputs of blocks 3, 7, 11, 15, 19): five
  [B, 577, 1024], CLS included, no norm.
Pixels: [B, 3, 336, 336] in 0..1, normalized with OpenAI CLIP's mean/std (the reference's
`image_mean`/`image_std` fall back to those, which is what EVA-CLIP was trained with).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .clip_vision import ClipVisionError

__all__ = ["EvaClipVision", "load_eva_clip", "eva_clip_from_state_dict", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD",
           "HIDDEN_BLOCK_INPUTS", "IMAGE_SIZE"]

TIMM_NAME = "eva02_large_patch14_clip_336"
FILE_NAME = "EVA02_CLIP_L_336_psz14_s6B.pt"
SOURCE_URL = "https://huggingface.co/QuanSun/EVA-CLIP/blob/main/EVA02_CLIP_L_336_psz14_s6B.pt"
IMAGE_SIZE = 336
WIDTH, DEPTH, EMBED_DIM, MLP_HIDDEN = 1024, 24, 768, 2730
TOKENS = (IMAGE_SIZE // 14) ** 2 + 1  # 577: 24x24 patches and CLS
HIDDEN_BLOCK_INPUTS = (4, 8, 12, 16, 20)  # the blocks whose input PuLID's IDFormer takes
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The keys (after `visual.`) whose shapes say "EVA02-CLIP-L-14-336" and no other EVA-CLIP: the 577
# position embeddings (336 px, patch 14), 1024 wide, 24 blocks, subln q/k/v and SwiGLU 2730, head 768.
_SIGNATURE = {
    "pos_embed": (1, TOKENS, WIDTH),
    "patch_embed.proj.weight": (WIDTH, 3, 14, 14),
    f"blocks.{DEPTH - 1}.attn.q_proj.weight": (WIDTH, WIDTH),
    "blocks.0.mlp.w1.weight": (MLP_HIDDEN, WIDTH),
    "head.weight": (EMBED_DIM, WIDTH),
}


class EvaClipError(ClipVisionError):
    """A file that is not the EVA02-CLIP-L-14-336 checkpoint PuLID needs; the message says which is."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


def _wrong_file(source: str, found: str) -> EvaClipError:
    return EvaClipError(f"{source} is not the EVA02-CLIP-L-14-336 checkpoint PuLID-FLUX needs ({found}). Use "
                        f"{FILE_NAME} from {SOURCE_URL} (the vision tower of EVA02-CLIP-L-14 at 336 px).")


@dataclass(eq=False)
class EvaClipVision:
    """The loaded tower (timm Eva, eval, no gradients) and where it came from."""

    model: torch.nn.Module
    source: str

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pos_embed.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images [B, 3, 336, 336] in 0..1 -> (cls_normed [B, 768], hidden: 5 x [B, 577, 1024])."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"EVA02-CLIP-L-14-336 takes images [B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] in 0..1, got "
                             f"{list(images.shape)}")
        mean = torch.tensor(OPENAI_CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD, device=images.device).view(1, 3, 1, 1)
        x = ((images.float() - mean) / std).to(self.device, self.dtype)
        # timm reports each block's output: block k's input is block k-1's output.
        final, taken = self.model.forward_intermediates(
            x, indices=[k - 1 for k in HIDDEN_BLOCK_INPUTS], return_prefix_tokens=True, output_fmt="NLC")
        hidden = [torch.cat([prefix, patches], dim=1) for patches, prefix in taken]
        cls = self.model.forward_head(final)  # final LayerNorm (in forward_intermediates), CLS, head
        return cls / cls.norm(dim=-1, keepdim=True), hidden


def _read(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError) as e:
        # mmap needs the zip format every torch >= 1.6 writes; an older pickle still loads without it.
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e2:  # noqa: BLE001 - any unreadable file gets the same advice
            raise _wrong_file(str(path), f"not a torch checkpoint torch can read weights-only: "
                                         f"{type(e2).__name__}: {str(e2)[:200]}") from e
    except Exception as e:  # noqa: BLE001
        raise _wrong_file(str(path), f"not a torch checkpoint torch can read weights-only: "
                                     f"{type(e).__name__}: {str(e)[:200]}") from e
    for key in ("state_dict", "model", "module"):  # the wrappers EVA-CLIP's own loader accepts
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise _wrong_file(str(path), f"it holds a {type(checkpoint).__name__}, not a state dict")
    if any(str(k).startswith("module.") for k in checkpoint):
        checkpoint = {str(k).removeprefix("module."): v for k, v in checkpoint.items()}
    return checkpoint


def _check_signature(sd: Mapping[str, torch.Tensor], source: str) -> None:
    if not any(k.startswith("visual.") for k in sd):
        roots = sorted({str(k).split(".")[0] for k in sd})
        raise _wrong_file(source, f"no 'visual.' keys (an EVA-CLIP vision tower); its keys start with {roots[:8]}")
    for key, shape in _SIGNATURE.items():
        t = sd.get("visual." + key)
        if t is None:
            raise _wrong_file(source, f"no 'visual.{key}'")
        if tuple(t.shape) != shape:
            raise _wrong_file(source, f"'visual.{key}' is {list(t.shape)}, expected {list(shape)}")
    if any(k.startswith(f"visual.blocks.{DEPTH}.") for k in sd):
        raise _wrong_file(source, f"more than {DEPTH} blocks")


def eva_clip_from_state_dict(sd: Mapping[str, torch.Tensor], source: str = "the EVA-CLIP state dict",
                             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> EvaClipVision:
    """The vision tower of an EVA02-CLIP-L-14-336 state dict (EVA-CLIP key names, `visual.` prefix)."""
    import timm
    from timm.models._manipulate import reinit_non_persistent_buffers
    from timm.models.eva import checkpoint_filter_fn

    _check_signature(sd, source)
    # Built on the meta device, then given storage without initialising it: random initialisation of
    # 300M parameters took 8 s on 2 cores, for values the checkpoint replaces at once.
    with torch.device("meta"):
        model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=EMBED_DIM)
    model = model.to_empty(device=device).to(dtype)
    filtered = checkpoint_filter_fn(dict(sd), model)  # drops text.* and the stored RoPE tables; renames w1/w2/w3...
    try:
        result = model.load_state_dict(filtered, strict=False)
    except RuntimeError as e:  # shapes that disagree
        raise _wrong_file(source, " ".join(str(e).split())[:300]) from None
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{what} {', '.join(keys[:6])}" for what, keys in
                 (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise _wrong_file(source, "; ".join(parts))
    # The RoPE sin/cos tables are computed, not stored: compute them on the real device now.
    reinit_non_persistent_buffers(model)
    return EvaClipVision(model.eval().requires_grad_(False), source)


def load_eva_clip(path: str | Path, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> EvaClipVision:
    """Load EVA02_CLIP_L_336_psz14_s6B.pt's vision tower; a clear EvaClipError for any other file."""
    path = Path(path)
    if not path.is_file():
        raise EvaClipError(f"{path} does not exist: PuLID-FLUX needs {FILE_NAME} there, from {SOURCE_URL}.")
    return eva_clip_from_state_dict(_read(path), str(path), device, dtype)
