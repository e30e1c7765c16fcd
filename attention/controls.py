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

Style blocks (InstantStyle, as cubiq's ComfyUI_IPAdapter_plus sets them): the style image acts only
in the blocks chosen; block names are the host's (input N, middle, output N). The sets are cubiq's
weight_type sets (IPAdapterPlus.py:307-320 at 9d076a3), which index layers by the host's
transformer_index: a counter of the UNet's SpatialTransformers in execution order, input blocks, the
middle block, then output blocks (host openaimodel.py forward_timestep_embed; read as t_idx in
CrossAttentionPatch.py:72). Over SD1.5's 16 that is 0-5 = input 1, 2, 4, 5, 7, 8, 6 = middle,
7-15 = output 3-11; over SDXL's 11 it is 0-3 = input 4, 5, 7, 8, 4 = middle, 5-10 = output 0-5
(every transformer block of a SpatialTransformer shares its index). So:
  SD1.5 "style only"        {0-3, 9-15}: input 1, 2, 4, 5 and output 5-11, each at 1;
  SD1.5 "composition only"  {4: 0.25, 5: 1}: input 7 at 0.25 and input 8 at 1;
  SDXL  "style only"        {6}: output 1 (diffusers' up_blocks.0.attentions.1, InstantStyle's choice);
  SDXL  "composition only"  {3}: input 8 (down_blocks.2.attentions.1);
"style and composition" is the union of the two (cubiq's "style and composition", :316-320). A base
without a set here ("all" aside) gets no style layer; `block_weights` then names them.
"""
from __future__ import annotations

import re

import torch

EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
C_PENALTY_WIDTH = 1280.0

STYLE_BLOCKS = ("all", "style only", "composition only", "style and composition")
# {(block, index): multiplier}, cubiq's transformer_index sets (see the module docstring) in the host's block names.
_INSTANTSTYLE = {
    "SD1.5": {"style": {("input", 1): 1.0, ("input", 2): 1.0, ("input", 4): 1.0, ("input", 5): 1.0,
                        **{("output", i): 1.0 for i in range(5, 12)}},
              "composition": {("input", 7): 0.25, ("input", 8): 1.0}},
    "SDXL": {"style": {("output", 1): 1.0}, "composition": {("input", 8): 1.0}},
}


def _describe(layers: dict[tuple[str, int], float]) -> str:
    """{("input", 1): 1, ("input", 2): 1, ("input", 7): 0.25, ...} -> "input 1, 2, 7 (at 0.25) and output 5-11"."""
    groups = []
    for block in ("input", "middle", "output"):
        items = sorted((i, s) for (b, i), s in layers.items() if b == block)
        if not items:
            continue
        words, n = [], 0
        while n < len(items):
            end = n
            while (end + 1 < len(items) and items[end + 1][0] == items[end][0] + 1
                   and items[end + 1][1] == items[n][1] == 1.0):
                end += 1
            span = f"{items[n][0]}-{items[end][0]}" if end - n >= 2 else None
            for i, s in (items[n:end + 1] if span is None else [(span, 1.0)]):
                words.append(f"{i}" if s == 1.0 else f"{i} (at {s:g})")
            n = end + 1
        groups.append(block if block == "middle" else f"{block} {', '.join(words)}")
    return " and ".join(groups)


def style_blocks_help() -> str:
    """Which blocks each style_blocks preset uses, per base: for the Apply node's tooltip."""
    lines = []
    for base, sets in _INSTANTSTYLE.items():
        lines.append(f"{base}: style = {_describe(sets['style'])}; composition = {_describe(sets['composition'])}.")
    return ("Where the style image acts (InstantStyle, with cubiq's IPAdapter layer sets): 'all' = every "
            "cross-attention block; 'style only' keeps its look without its layout; 'composition only' the "
            "reverse; 'style and composition' uses both sets. Blocks are the host's (input N, middle, "
            "output N). " + " ".join(lines))


STYLE_BLOCKS_HELP = style_blocks_help()

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
    """The style's multiplier at each position: the preset's (1, 0.25 or 0), then `block_weights` for the blocks
    it names."""
    if blocks not in STYLE_BLOCKS:
        raise ValueError(f"style_blocks must be one of {', '.join(STYLE_BLOCKS)}, not {blocks!r}")
    chosen = _INSTANTSTYLE.get(base_model, {})
    style, composition = chosen.get("style", {}), chosen.get("composition", {})
    wanted = {"all": None, "style only": style, "composition only": composition,
              "style and composition": {**style, **composition}}[blocks]
    custom = parse_block_weights(block_weights)
    known = {p.patch_key[:2] for p in positions}
    unknown = sorted(set(custom) - known)
    if unknown:
        raise ValueError(f"this model has no cross-attention in block(s) "
                         f"{', '.join(f'{b} {i}' if b != 'middle' else b for b, i in unknown)}; its blocks with "
                         f"cross-attention are {', '.join(f'{b} {i}' if b != 'middle' else b for b, i in sorted(known))}")
    return [custom.get(p.patch_key[:2], 1.0 if wanted is None else wanted.get(p.patch_key[:2], 0.0))
            for p in positions]
