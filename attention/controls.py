"""The IP-Adapter controls users know from other packs, as Apply-time transforms of the token K/V.

Embeds scaling (how a weight w acts on a layer's adapter attention):
  "V only"                  w * softmax(q K^T) V: the weight scales the output (IP-Adapter's own scale);
  "K+V"                     softmax(q (wK)^T) (wV): a larger weight also sharpens the attention;
  "K+V w/ C penalty"        as K+V with w * C / 1280, C the layer's width: weaker in wide-feature
                            (high-resolution) layers, which mostly carry layout;
  "K+mean(V) w/ C penalty"  K scaled as above, and only V's mean over the tokens scaled, so the
                            tokens' differences keep their size.
K and V are fixed per Apply, so every mode is applied once to them here; the routing kernel then
only weights by the region mask, and its cost does not change.

Style blocks (InstantStyle): the style image acts only in the blocks chosen. InstantStyle found that
SDXL's up_blocks.0.attentions.1 carries style and down_blocks.2.attentions.1 composition (the host's
("output", 1) and ("input", 8)). SD1.5 has no published choice; we use the same places in its
layout, the second attention of the lowest-resolution up stage ("output", 4) and of the lowest-
resolution down stage ("input", 8).
"""
from __future__ import annotations

import re

import torch

EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
C_PENALTY_WIDTH = 1280.0

STYLE_BLOCKS = ("all", "style only", "composition only", "style and composition")
_INSTANTSTYLE = {
    "SDXL": {"style": ("output", 1), "composition": ("input", 8)},
    "SD1.5": {"style": ("output", 4), "composition": ("input", 8)},
}

KV = tuple[torch.Tensor, torch.Tensor]


def scale_kv(kv: KV, weight: float, mode: str) -> tuple[KV, float]:
    """(K, V) with `mode` applied for `weight`, and the weight left for the routing kernel to apply."""
    if mode not in EMBEDS_SCALING:
        raise ValueError(f"embeds_scaling must be one of {', '.join(EMBEDS_SCALING)}, not {mode!r}")
    k, v = kv
    if mode == "V only" or weight == 0.0:
        return kv, weight  # 0 stays an exact 0 in the kernel, whatever the mode
    if mode != "K+V":
        weight = weight * k.shape[-1] / C_PENALTY_WIDTH
    if mode == "K+mean(V) w/ C penalty":
        mean = v.mean(dim=1, keepdim=True)
        return (k * weight, v - mean + mean * weight), 1.0
    return (k * weight, v * weight), 1.0


def parse_block_weights(text: str) -> dict[tuple[str, int], float]:
    """'input 8=1, output 1=0.5, middle=0' -> {("input", 8): 1.0, ...}; ValueError says what is wrong."""
    weights = {}
    for part in filter(None, (p.strip() for p in re.split(r"[,;\n]", text or ""))):
        m = re.fullmatch(r"(input|output|middle)\s*(\d+)?\s*[=:]\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)", part, re.I)
        if not m or (m.group(1).lower() != "middle" and m.group(2) is None):
            raise ValueError(f"block weight '{part}' is not understood: write e.g. 'input 8=1.0, output 1=0.5, "
                             "middle=0' (the host's block names: input N, middle, output N)")
        weights[(m.group(1).lower(), int(m.group(2) or 0))] = float(m.group(3))
    return weights


def style_layer_scales(positions, base_model: str, blocks: str = "all", block_weights: str = "") -> list[float]:
    """The style's multiplier at each position: the preset's 1/0, then `block_weights` for the blocks it names."""
    if blocks not in STYLE_BLOCKS:
        raise ValueError(f"style_blocks must be one of {', '.join(STYLE_BLOCKS)}, not {blocks!r}")
    chosen = _INSTANTSTYLE.get(base_model, {})
    wanted = {"all": None, "style only": {chosen.get("style")}, "composition only": {chosen.get("composition")},
              "style and composition": {chosen.get("style"), chosen.get("composition")}}[blocks]
    custom = parse_block_weights(block_weights)
    known = {p.patch_key[:2] for p in positions}
    unknown = sorted(set(custom) - known)
    if unknown:
        raise ValueError(f"this model has no cross-attention in block(s) "
                         f"{', '.join(f'{b} {i}' if b != 'middle' else b for b, i in unknown)}; its blocks with "
                         f"cross-attention are {', '.join(f'{b} {i}' if b != 'middle' else b for b, i in sorted(known))}")
    return [custom.get(p.patch_key[:2], 1.0 if wanted is None or p.patch_key[:2] in wanted else 0.0)
            for p in positions]
