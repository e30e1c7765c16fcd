"""The FaceStudio adapter being trained: the fusion (attention/facestudio_fusion.py) and, for every
cross-attention position of the UNet, the decoupled cross-attention's to_k_ip / to_v_ip.

Built for one model: its positions are read from the UNet (attention/layers.py, diffusers' order, so
layer n is file key 2n+1 as in every IP-Adapter file), and each to_k_ip / to_v_ip starts as a copy of
that position's own attn2 to_k / to_v, IP-Adapter's initialisation: the new tokens start out read the
way the text context is. No host imports (the UNet is read as a torch module).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..attention.facestudio_fusion import ARCFACE_WIDTH, DEFAULT_TOKENS, DEFAULT_WIDTH, FaceStudioFusion
from ..attention.layers import AttentionPosition, cross_attention_positions, diffusion_model_of

__all__ = ["TrainableAdapter"]


class TrainableAdapter(nn.Module):
    def __init__(self, fusion: FaceStudioFusion, positions: Sequence[AttentionPosition]):
        super().__init__()
        self.fusion = fusion
        self.positions = tuple(positions)
        ctx = fusion.context_dim
        self.to_k_ip = nn.ModuleList(nn.Linear(ctx, p.inner_width, bias=False) for p in self.positions)
        self.to_v_ip = nn.ModuleList(nn.Linear(ctx, p.inner_width, bias=False) for p in self.positions)

    @classmethod
    def for_model(cls, model, clip_dim: int, text_dim: int, num_tokens: int = DEFAULT_TOKENS,
                  width: int = DEFAULT_WIDTH, seed: int = 0, id_dim: int = ARCFACE_WIDTH) -> "TrainableAdapter":
        """A fresh adapter for `model` (a MODEL, BaseModel or UNet): the fusion initialised from `seed`,
        each position's K/V from the UNet's own attn2 weights (fp32, CPU)."""
        positions = cross_attention_positions(model)
        if not positions:
            raise ValueError("The model has no cross-attention layers: a FaceStudio adapter attaches to a UNet's.")
        contexts = {p.context_width for p in positions}
        if len(contexts) != 1:
            raise ValueError(f"The model's cross-attention layers read contexts of several widths {sorted(contexts)}.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fusion = FaceStudioFusion(clip_dim, text_dim, contexts.pop(), num_tokens, width, id_dim)
        adapter = cls(fusion, positions)
        unet = diffusion_model_of(model)
        with torch.no_grad():
            for n, p in enumerate(positions):
                attn2 = unet.get_submodule(p.module_path)
                adapter.to_k_ip[n].weight.copy_(attn2.to_k.weight.float())
                adapter.to_v_ip[n].weight.copy_(attn2.to_v.weight.float())
        return adapter

    def layer_kv(self, n: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Position n's keys and values of `tokens` [B, T, ctx]: [B, T, inner] each."""
        return self.to_k_ip[n](tokens), self.to_v_ip[n](tokens)
