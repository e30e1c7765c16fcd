"""Where an adapter's layers go in a ComfyUI UNet: its cross-attention (attn2) positions.

The reference adapters number their layers by diffusers' `attn_processors` order: down blocks, up
blocks, then the middle block last. ComfyUI walks input, middle, output; we list positions in
diffusers' order so adapter key `2n+1` is simply position n, and keep ComfyUI's patch key
(block name, block index, transformer index) with each, as `set_model_attn2_replace` wants it.
The positions are read from the model itself, so any UNet layout works, not only SD1.5's 16 or SDXL's 70.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import BASE_BY_CONTEXT, AdapterError, IPAdapterWeights

# (ComfyUI block name, UNetModel attribute) in diffusers' attn_processors order.
_BLOCK_ORDER = (("input", "input_blocks"), ("output", "output_blocks"), ("middle", "middle_block"))


@dataclass(frozen=True)
class AttentionPosition:
    block: str               # "input" | "middle" | "output"
    block_index: int         # index in input_blocks / output_blocks; 0 for the middle block
    transformer_index: int   # index in the SpatialTransformer's transformer_blocks
    inner_width: int         # attn2.to_k out-features: what the adapter's to_k_ip must produce
    context_width: int       # attn2.to_k in-features: the text-context width
    module_path: str         # e.g. "input_blocks.1.1.transformer_blocks.0.attn2"
    heads: int               # attn2.heads: how the patch's token layout splits the width

    @property
    def patch_key(self) -> tuple[str, int, int]:
        return (self.block, self.block_index, self.transformer_index)


@dataclass(frozen=True, eq=False)
class MappedLayer:
    position: AttentionPosition
    adapter_key: int         # 2n+1: the layer's number in the file's ip_adapter section
    to_k_ip: torch.Tensor = field(repr=False)
    to_v_ip: torch.Tensor = field(repr=False)


def diffusion_model_of(model) -> torch.nn.Module:
    """The UNet inside a MODEL (ModelPatcher), a BaseModel, or the UNet itself."""
    inner = getattr(model, "model", model)              # ModelPatcher -> BaseModel
    unet = getattr(inner, "diffusion_model", inner)     # BaseModel -> UNetModel
    if not (hasattr(unet, "input_blocks") and hasattr(unet, "output_blocks")):
        raise AdapterError(f"IP-Adapter layers fit UNet models (SD1.5, SDXL); this MODEL's diffusion model is a "
                           f"{type(unet).__name__}, which has no UNet input/output blocks.")
    return unet


def cross_attention_positions(model) -> tuple[AttentionPosition, ...]:
    unet = diffusion_model_of(model)
    positions = []
    for block, attr in _BLOCK_ORDER:
        container = getattr(unet, attr, None)
        if container is None:
            continue
        # ComfyUI patches the whole middle block as ("middle", 0).
        blocks = [(0, attr, container)] if block == "middle" else [
            (i, f"{attr}.{i}", seq) for i, seq in enumerate(container)]
        for index, path, seq in blocks:
            for child, layer in seq.named_children():
                for t, transformer in enumerate(getattr(layer, "transformer_blocks", None) or ()):
                    attn2 = getattr(transformer, "attn2", None)
                    if attn2 is None:
                        continue
                    inner, context = attn2.to_k.weight.shape
                    positions.append(AttentionPosition(block, index, t, int(inner), int(context),
                                                       f"{path}.{child}.transformer_blocks.{t}.attn2",
                                                       int(attn2.heads)))
    return tuple(positions)


def _model_name(context: int) -> str:
    base = BASE_BY_CONTEXT.get(context)
    return f"an {base} model" if base else f"a model with a {context}-wide text context"


def map_adapter_layers(adapter: IPAdapterWeights, positions: tuple[AttentionPosition, ...]) -> tuple[MappedLayer, ...]:
    """Adapter layer n onto position n; AdapterError when the adapter was made for another UNet."""
    if not positions:
        raise AdapterError("The model has no cross-attention layers, so no IP-Adapter can attach to it.")
    # Context first: an SDXL adapter on SD1.5 also has the wrong layer count, but this says why.
    for p in positions:
        if p.context_width != adapter.context_dim:
            raise AdapterError(
                f"{adapter.source} is an {adapter.base_model} adapter (context width {adapter.context_dim}) and "
                f"cannot be used on {_model_name(p.context_width)} (context width {p.context_width} at "
                f"{p.module_path}): load the adapter made for this model's base.")
    if adapter.layer_count != len(positions):
        raise AdapterError(
            f"{adapter.source} has {adapter.layer_count} cross-attention layers but the model has {len(positions)}: "
            f"the adapter was trained for a different {adapter.base_model} UNet layout than this model's.")
    mapped = []
    for n, ((k, v), p) in enumerate(zip(adapter.layers, positions)):
        if k.shape[0] != p.inner_width:
            raise AdapterError(
                f"{adapter.source} layer {n} ('{2 * n + 1}.to_k_ip.weight') makes {k.shape[0]} channels, but the "
                f"model's {p.module_path} (patch {p.patch_key}) is {p.inner_width} wide: the adapter was trained "
                f"for a different UNet than this model.")
        mapped.append(MappedLayer(p, 2 * n + 1, k, v))
    return tuple(mapped)
