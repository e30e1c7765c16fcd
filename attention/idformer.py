"""PuLID-FLUX's IDFormer: one face's ArcFace + EVA-CLIP features -> 32 ID tokens of width 2048.

The `pulid_encoder.*` part of a PuLID-FLUX file (`pulid_flux_v0.9.1.safetensors`, guozinan/PuLID).
What the reference IDFormer does (pulid/encoders_transformer.py), in our own module:

    x       = id_embedding_mapping([arcface 512 || eva_cls 768])  -> [B, 5, dim]  (5 ID tokens)
    latents = [learned latents (32) || x]                           -> [B, 37, dim]
    for scale i in 0..4 (EVA hidden states: the inputs to blocks 4, 8, 12, 16, 20):
        ctx = [x || mapping_i(hidden_i)]                            -> [B, 5 + 577, dim]
        depth/5 perceiver layers: latents += attn(ctx, latents); latents += ff(latents)
    tokens  = latents[:, :32] @ proj_out                            -> [B, 32, 2048]

The attention and feed-forward blocks are IP-Adapter's (attention/projection.py), with 16 heads of
64 here. Sizes are read from the tensors; a file whose layout is not this one is refused by name.
No host imports.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from .adapters import AdapterError
from .projection import PerceiverAttention, _feed_forward

__all__ = ["IDFormer", "PULID_ENCODER_PREFIX", "idformer_from_state_dict", "unconditional_id_tokens"]

PULID_ENCODER_PREFIX = "pulid_encoder."
NUM_SCALES = 5  # EVA-CLIP hidden states IDFormer takes, two perceiver layers each in PuLID-FLUX
_HEAD_WIDTH = 64  # the reference's dim_head; heads = to_q rows / 64
_MLP_KEYS = ("0", "1", "3", "4", "6")  # Linear, LayerNorm, (LeakyReLU), Linear, LayerNorm, (LeakyReLU), Linear


def _mapping(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, out_dim))


class IDFormer(nn.Module):
    """forward(arcface [B, 512] raw, eva_cls [B, 768] L2-normed, hidden: 5 x [B, 577, 1024]) -> [B, 32, 2048]."""

    def __init__(self, dim: int = 1024, depth: int = 10, heads: int = 16, num_id_tokens: int = 5,
                 num_queries: int = 32, output_dim: int = 2048, ff_mult: int = 4, id_dim: int = 1280,
                 vit_dim: int = 1024, mapping_dim: int = 1024):
        super().__init__()
        if depth % NUM_SCALES:
            raise ValueError(f"IDFormer's depth must be a multiple of {NUM_SCALES} (layers per EVA scale), got {depth}")
        self.dim, self.num_id_tokens, self.num_queries, self.id_dim = dim, num_id_tokens, num_queries, id_dim
        self.vit_dim = vit_dim
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_out = nn.Parameter(torch.zeros(dim, output_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, _HEAD_WIDTH, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth))
        for i in range(NUM_SCALES):
            setattr(self, f"mapping_{i}", _mapping(vit_dim, mapping_dim, dim))
        self.id_embedding_mapping = _mapping(id_dim, mapping_dim, dim * num_id_tokens)

    @property
    def output_dim(self) -> int:
        return self.proj_out.shape[1]

    def forward(self, arcface: torch.Tensor, eva_cls: torch.Tensor, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        if arcface.ndim != 2 or eva_cls.ndim != 2 or arcface.shape[0] != eva_cls.shape[0]:
            raise ValueError(f"IDFormer takes arcface [B, 512] and eva_cls [B, 768] with the same B, got "
                             f"{list(arcface.shape)} and {list(eva_cls.shape)}")
        if arcface.shape[1] + eva_cls.shape[1] != self.id_dim:
            raise ValueError(f"IDFormer reads {self.id_dim} numbers per face (ArcFace || EVA-CLIP), got "
                             f"{arcface.shape[1]} + {eva_cls.shape[1]}")
        if len(hidden) != NUM_SCALES or any(h.ndim != 3 or h.shape[-1] != self.vit_dim for h in hidden):
            raise ValueError(f"IDFormer takes {NUM_SCALES} EVA-CLIP hidden states [B, T, {self.vit_dim}], got "
                             f"{[list(h.shape) for h in hidden]}")
        b = arcface.shape[0]
        x = self.id_embedding_mapping(torch.cat([arcface, eva_cls], dim=-1)).reshape(b, self.num_id_tokens, self.dim)
        latents = torch.cat([self.latents.expand(b, -1, -1), x], dim=1)
        per_scale = len(self.layers) // NUM_SCALES
        for i, h in enumerate(hidden):
            # The ID tokens stay in every scale's context: the latents keep seeing the ArcFace identity.
            ctx = torch.cat([x, getattr(self, f"mapping_{i}")(h)], dim=1)
            for attn, ff in self.layers[i * per_scale:(i + 1) * per_scale]:
                latents = attn(ctx, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :self.num_queries] @ self.proj_out


def _layout_error(source: str, why: str) -> AdapterError:
    return AdapterError(f"{source}: its pulid_encoder part is not PuLID-FLUX's IDFormer ({why}). Use "
                        "pulid_flux_v0.9.1.safetensors (or v0.9.0) from https://huggingface.co/guozinan/PuLID.")


def _shape(sd: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise _layout_error(source, f"no {key!r}")
    return tuple(sd[key].shape)


def idformer_from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "the PuLID file",
                             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> IDFormer:
    """The IDFormer of a PuLID-FLUX state dict (the whole file's, `pulid_encoder.` keys are taken, or
    those keys already stripped), loaded strictly, in eval mode without gradients."""
    sd = {k[len(PULID_ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(PULID_ENCODER_PREFIX)}
    if not sd:
        sd = dict(state_dict)
    if "latents" not in sd:
        raise _layout_error(source, "no 'pulid_encoder.latents'; keys start with "
                                    f"{sorted({k.split('.')[0] for k in state_dict})[:8]}")
    lat = _shape(sd, "latents", source)
    if len(lat) != 3 or lat[0] != 1:
        raise _layout_error(source, f"latents of shape {list(lat)}, expected [1, queries, dim]")
    _, num_queries, dim = lat
    proj = _shape(sd, "proj_out", source)
    if len(proj) != 2 or proj[0] != dim:
        raise _layout_error(source, f"proj_out of shape {list(proj)}, expected [{dim}, output width]")
    depth = len({m.group(1) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    if depth == 0 or depth % NUM_SCALES:
        raise _layout_error(source, f"{depth} perceiver layers, expected a multiple of {NUM_SCALES}")
    inner, q_in = _shape(sd, "layers.0.0.to_q.weight", source)
    if q_in != dim or inner % _HEAD_WIDTH:
        raise _layout_error(source, f"layers.0.0.to_q.weight of shape {[inner, q_in]}")
    ff_inner = _shape(sd, "layers.0.1.1.weight", source)[0]
    id_out, id_dim = (_shape(sd, "id_embedding_mapping.6.weight", source)[0],
                      _shape(sd, "id_embedding_mapping.0.weight", source)[1])
    mapping_dim = _shape(sd, "id_embedding_mapping.0.weight", source)[0]
    vit_dim = _shape(sd, "mapping_0.0.weight", source)[1]
    if id_out % dim or ff_inner % dim:
        raise _layout_error(source, f"id_embedding_mapping makes {id_out} numbers, not a whole number of "
                                    f"{dim}-wide tokens")
    for i in range(NUM_SCALES):
        for k in _MLP_KEYS:
            _shape(sd, f"mapping_{i}.{k}.weight", source)
    with torch.device("meta"):
        module = IDFormer(dim, depth, inner // _HEAD_WIDTH, id_out // dim, num_queries, proj[1], ff_inner // dim,
                          id_dim, vit_dim, mapping_dim)
    try:
        result = module.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    except RuntimeError as e:  # shapes that disagree with the ones inferred
        raise _layout_error(source, " ".join(str(e).split())[:300]) from None
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{what} {', '.join(repr(PULID_ENCODER_PREFIX + k) for k in keys[:6])}"
                 for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise _layout_error(source, "; ".join(parts))
    return module.to(device).eval().requires_grad_(False)


@torch.no_grad()
def unconditional_id_tokens(module: IDFormer, tokens_per_scale: int = 577) -> torch.Tensor:
    """[1, 32, 2048]: IDFormer on all-zero inputs, PuLID's negative side (get_id_embedding(cal_uncond=True):
    zeros for [arcface || eva_cls] and for each hidden state, which still gives non-zero tokens through
    the mappings' biases and the learned latents). Depends only on the weights: compute it once."""
    p = module.latents
    zeros = lambda *shape: torch.zeros(*shape, device=p.device, dtype=p.dtype)  # noqa: E731
    eva_width = module.id_dim - 512
    hidden = [zeros(1, tokens_per_scale, module.vit_dim) for _ in range(NUM_SCALES)]
    return module(zeros(1, 512), zeros(1, eva_width), hidden)
