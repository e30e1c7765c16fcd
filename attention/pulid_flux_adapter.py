"""PuLID-FLUX weight files: recognise them, split them, check the identity cross-attention layout.

A PuLID-FLUX .safetensors (pulid_flux_v0.9.x) holds two parts, as the reference's load_pretrain
splits them (by the first key component):
- `pulid_encoder.*`: the IDFormer that makes a face's 32 ID tokens (2048 wide); handed on as its own
  state dict, to attention/idformer.py.
- `pulid_ca.0..19.*`: 20 PerceiverAttentionCA modules (norm1, norm2, to_q, to_kv, to_out, no biases on
  the linears) at FLUX.1's width 3072 over 2048-wide ID tokens, 16 heads of 128. FLUX.1 dev/schnell
  have 19 double and 38 single blocks; CA k follows double block 2k (k < 10), then single block
  4(k - 10).

The layout (module count, widths) is read from the tensors, as for the SD adapters, with the
reference's 128-wide heads; every module must have it. Whether it fits a model is Apply's check
(flux_patch._flux_model): only FLUX.1 (3072 wide, 19 + 38 blocks) takes the public files, and
FLUX.2 (wider blocks) or any other model is refused there by name. Files that are not whole (missing
or extra keys, modules that disagree) are refused here with the file's name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch

__all__ = ["CALayout", "FLUX1_CA_LAYOUT", "DIM_HEAD", "PuLIDFluxError", "PuLIDFluxWeights", "load_pulid_flux",
           "pulid_flux_weights", "ENCODER_PREFIX", "CA_PREFIX"]

ENCODER_PREFIX = "pulid_encoder."
CA_PREFIX = "pulid_ca."
# PerceiverAttentionCA's head width in every PuLID-FLUX file (the reference's default, FLUX's own head
# width): the tensors give heads x dim_head, not the split.
DIM_HEAD = 128


class PuLIDFluxError(ValueError):
    """A file that is not a PuLID-FLUX file for FLUX.1; the message names it and says what it is instead."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


@dataclass(frozen=True)
class CALayout:
    """The shape of a file's identity cross-attention: how many modules, how wide."""

    modules: int = 20
    dim: int = 3072        # FLUX's hidden width (image tokens)
    id_dim: int = 2048     # the ID tokens' width
    heads: int = 16
    dim_head: int = 128
    double_interval: int = 2  # a CA after double block i with i % 2 == 0
    single_interval: int = 4  # and after single block i with i % 4 == 0

    @property
    def inner(self) -> int:
        return self.heads * self.dim_head

    def module_shapes(self) -> dict[str, tuple[int, ...]]:
        """Key (after `pulid_ca.<k>.`) -> shape of one PerceiverAttentionCA(dim, dim_head, heads, kv_dim=id_dim)."""
        return {
            "norm1.weight": (self.id_dim,), "norm1.bias": (self.id_dim,),
            "norm2.weight": (self.dim,), "norm2.bias": (self.dim,),
            "to_q.weight": (self.inner, self.dim),
            "to_kv.weight": (2 * self.inner, self.id_dim),
            "to_out.weight": (self.dim, self.inner),
        }

    def modules_for(self, double_blocks: int, single_blocks: int) -> int:
        """How many CA modules a FLUX model with these block counts takes."""
        return -(-double_blocks // self.double_interval) + -(-single_blocks // self.single_interval)


FLUX1_CA_LAYOUT = CALayout()


@dataclass(frozen=True, eq=False)
class PuLIDFluxWeights:
    """A PuLID-FLUX file, split: `encoder` is the IDFormer's state dict (`pulid_encoder.` removed), `ca` one
    state dict per CA module in order (`pulid_ca.<k>.` removed), in the file's dtype."""

    source: str
    encoder: dict[str, torch.Tensor]
    ca: tuple[dict[str, torch.Tensor], ...]
    layout: CALayout

    @property
    def dtype(self) -> torch.dtype:
        return self.ca[0]["to_q.weight"].dtype


def load_pulid_flux(path: str) -> PuLIDFluxWeights:
    """Read and check a PuLID-FLUX .safetensors."""
    source = os.path.basename(path)
    if not os.path.isfile(path):
        raise PuLIDFluxError(f"{path} does not exist or is not a file.")
    if not source.lower().endswith(".safetensors"):
        raise PuLIDFluxError(f"{source}: PuLID-FLUX files are .safetensors (pulid_flux_v0.9.1.safetensors).")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        _check_kind(keys, source)  # from the header alone: no need to load gigabytes to refuse a file
        state_dict = safetensors.torch.load_file(path, device="cpu")
    except PuLIDFluxError:
        raise
    except Exception as e:  # SafetensorError and OSError alike: the file is not whole
        raise PuLIDFluxError(f"{source} is truncated or corrupt, or not a safetensors file ({e}). "
                             "Download it again.") from None
    return pulid_flux_weights(state_dict, source)


def _layout_of(first: dict[str, torch.Tensor], modules: int, source: str) -> CALayout:
    """The layout pulid_ca.0's tensors say (each module is then checked against it)."""
    try:
        dim, id_dim = first["norm2.weight"].shape[0], first["norm1.weight"].shape[0]
        inner = first["to_q.weight"].shape[0]
    except KeyError as e:
        raise PuLIDFluxError(f"{source}: pulid_ca.0 has no {e.args[0]}, which PuLID's PerceiverAttentionCA has: the "
                             "file is not whole. Download pulid_flux_v0.9.1.safetensors again.") from None
    if inner % DIM_HEAD:
        raise PuLIDFluxError(f"{source}: pulid_ca.0.to_q is {inner} wide, not a whole number of PuLID's {DIM_HEAD}-wide "
                             "heads: it is not a PuLID-FLUX file. Use pulid_flux_v0.9.1.safetensors.")
    return CALayout(modules=modules, dim=dim, id_dim=id_dim, heads=inner // DIM_HEAD, dim_head=DIM_HEAD)


def _check_kind(keys: list[str], source: str) -> None:
    if any(k.startswith(CA_PREFIX) for k in keys) and any(k.startswith(ENCODER_PREFIX) for k in keys):
        return
    if any(k.startswith(("id_adapter.", "id_adapter_attn_layers.")) for k in keys):
        what = "PuLID for SDXL (id_adapter.*), not PuLID-FLUX"
    elif any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        what = "an IP-Adapter (image_proj.* / ip_adapter.*): load it with FaceStudio Load Adapter"
    elif any(k.startswith(CA_PREFIX) for k in keys) or any(k.startswith(ENCODER_PREFIX) for k in keys):
        half = CA_PREFIX if any(k.startswith(CA_PREFIX) for k in keys) else ENCODER_PREFIX
        what = f"only half of one: it has {half}* keys but not the other part"
    else:
        what = f"not a PuLID-FLUX file (its keys start like {sorted(keys)[:3]})"
    raise PuLIDFluxError(f"{source} is {what}. A PuLID-FLUX file holds pulid_encoder.* and pulid_ca.* keys: use "
                         "pulid_flux_v0.9.1.safetensors from guozinan/PuLID, in models/pulid.")


def pulid_flux_weights(state_dict: dict[str, torch.Tensor], source: str) -> PuLIDFluxWeights:
    """Split and check a PuLID-FLUX state dict (tensors on any device, `meta` included)."""
    _check_kind(list(state_dict), source)
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    ca: dict[int, dict[str, torch.Tensor]] = {}
    others = []
    for key, value in state_dict.items():
        if key.startswith(ENCODER_PREFIX):
            continue
        index, _, rest = key[len(CA_PREFIX):].partition(".") if key.startswith(CA_PREFIX) else ("", "", "")
        if not index.isdigit():
            others.append(key)
            continue
        ca.setdefault(int(index), {})[rest] = value
    if others:
        raise PuLIDFluxError(f"{source} has keys outside pulid_encoder.* and pulid_ca.<n>.* ({others[:3]}): it is "
                             "not a PuLID-FLUX file as the reference writes it. Use pulid_flux_v0.9.1.safetensors.")
    if sorted(ca) != list(range(len(ca))):
        missing = sorted(set(range(max(ca) + 1)) - set(ca))
        raise PuLIDFluxError(f"{source} has identity cross-attention modules pulid_ca.{min(ca)}..{max(ca)} without "
                             f"pulid_ca.{missing[0]}: the file is not whole. Download pulid_flux_v0.9.1.safetensors again.")
    layout = _layout_of(ca[0], len(ca), source)
    expected = layout.module_shapes()
    for k in range(layout.modules):
        module = ca[k]
        if set(module) != set(expected):
            missing, extra = sorted(set(expected) - set(module)), sorted(set(module) - set(expected))
            raise PuLIDFluxError(f"{source}: pulid_ca.{k} has not the keys of PuLID's PerceiverAttentionCA (missing "
                                 f"{missing}, unexpected {extra}). Download pulid_flux_v0.9.1.safetensors again.")
        for name, shape in expected.items():
            if tuple(module[name].shape) != shape:
                raise PuLIDFluxError(
                    f"{source}: pulid_ca.{k}.{name} is {tuple(module[name].shape)}, but pulid_ca.0's is {shape}: its "
                    "identity cross-attention modules disagree, so the file is not whole. Download "
                    "pulid_flux_v0.9.1.safetensors again.")
    return PuLIDFluxWeights(source, encoder, tuple(ca[k] for k in range(layout.modules)), layout)
