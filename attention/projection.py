"""Embedding -> context tokens: the IP-Adapter image projections, and each layer's K/V of those tokens.

One small module per projection, with the reference IP-Adapter code's parameter names (so a file's
`image_proj` section loads into it strictly, in fp32) and its maths:

    FaceIDMLP            MLPProjModel (FaceID 4 tokens, Portrait 16 per shot):
                         proj.0 -> GELU -> proj.2 -> [N, T, ctx] -> norm
    FaceIDPlusProjection ProjPlusModel: the same MLP, then FacePerceiverResampler over the CLIP
                         penultimate hidden states; v2: out = x + scale * resampler(x, clip)
    ImagePromptProjection ImageProjModel: proj -> [N, 4, ctx] -> norm
    Resampler            learned latents resampling an input sequence: IP-Adapter Plus (the CLIP
                         penultimate hidden states) and FaceID Portrait unnorm (the shots' raw
                         ArcFace embeddings, one row each: 16 tokens however many shots)

Tokens are computed once per Apply (not per sampling step), as are `layer_kv`'s per-layer K/V, which
are what `routing.TokenGroups.build` takes. No host imports: CLIP and face models are the caller's.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .adapters import AdapterError, AdapterKind, IPAdapterWeights
from .facestudio_fusion import FaceStudioFusion

__all__ = [
    "FaceIDMLP",
    "FaceIDPlusProjection",
    "ImagePromptProjection",
    "Resampler",
    "PerceiverAttention",
    "projection_for",
    "identity_tokens",
    "unconditional_identity_tokens",
    "style_tokens",
    "facestudio_tokens",
    "unconditional_style_tokens",
    "layer_kv",
]

_HEAD_WIDTH = 64


# --- the building blocks of both resamplers (reference resampler.py) -------------------------------

def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, bias-free linears (keys 0, 1, 3)."""
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [features, latents]: norm1 on the features, norm2 on the latents, one to_kv
    over their concatenation, q and k each scaled by dim_head**-0.25 before the product."""

    def __init__(self, dim: int, dim_head: int = _HEAD_WIDTH, heads: int = 8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
        return self.to_out(rearrange(weight @ v, "b h n d -> b n (h d)"))


def _perceiver_layers(dim: int, depth: int, heads: int, ff_mult: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.ModuleList([PerceiverAttention(dim, _HEAD_WIDTH, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth))


def _resample(layers: nn.ModuleList, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    for attn, ff in layers:
        latents = attn(x, latents) + latents
        latents = ff(latents) + latents
    return latents


class FacePerceiverResampler(nn.Module):
    """Resamples CLIP features into the given latents (FaceID Plus: the ID tokens)."""

    def __init__(self, dim: int, depth: int, heads: int, embedding_dim: int, output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = _perceiver_layers(dim, depth, heads, ff_mult)

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        latents = _resample(self.layers, self.proj_in(x), latents)
        return self.norm_out(self.proj_out(latents))


# --- the projections ------------------------------------------------------------------------------

class FaceIDMLP(nn.Module):
    """MLPProjModel: face embedding [N, id] -> [N, num_tokens, ctx]."""

    def __init__(self, id_dim: int, hidden: int, ctx: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.ctx = num_tokens, ctx
        self.proj = nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(), nn.Linear(hidden, ctx * num_tokens))
        self.norm = nn.LayerNorm(ctx)

    def id_tokens(self, id_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(id_embeds).reshape(-1, self.num_tokens, self.ctx))

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        return self.id_tokens(id_embeds)


class FaceIDPlusProjection(FaceIDMLP):
    """ProjPlusModel: the ID MLP's tokens resample the CLIP penultimate hidden states [N, S, clip].

    shortcut (v2): out = x + shortcut_scale * resampler(x, clip), x the ID MLP's tokens."""

    def __init__(self, id_dim: int, hidden: int, dim: int, num_tokens: int, clip_dim: int, ctx: int,
                 depth: int, heads: int, ff_mult: int = 4):
        super().__init__(id_dim, hidden, dim, num_tokens)
        self.output_dim = ctx
        self.perceiver_resampler = FacePerceiverResampler(dim, depth, heads, clip_dim, ctx, ff_mult)

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor, shortcut: bool = False,
                shortcut_scale: float = 1.0) -> torch.Tensor:
        x = self.id_tokens(id_embeds)
        out = self.perceiver_resampler(x, clip_embeds)
        if shortcut:
            if x.shape[-1] != out.shape[-1]:
                raise AdapterError(f"FaceID Plus v2's shortcut adds the {x.shape[-1]}-wide ID tokens to the "
                                   f"{out.shape[-1]}-wide output; they must be equally wide. This is not a v2 "
                                   "file: load it as kind 'faceid-plus'.")
            out = x + shortcut_scale * out
        return out


class ImagePromptProjection(nn.Module):
    """ImageProjModel: CLIP image_embeds [N, clip] -> [N, num_tokens, ctx]."""

    def __init__(self, clip_dim: int, ctx: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.ctx = num_tokens, ctx
        self.proj = nn.Linear(clip_dim, ctx * num_tokens)
        self.norm = nn.LayerNorm(ctx)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(image_embeds).reshape(-1, self.num_tokens, self.ctx))


class Resampler(nn.Module):
    """Learned latents [1, T, dim] resample an input sequence [N, S, embedding_dim]: IP-Adapter Plus's
    CLIP penultimate hidden states, or FaceID Portrait unnorm's raw face embeddings (S = shots)."""

    def __init__(self, dim: int, depth: int, heads: int, num_queries: int, embedding_dim: int, ctx: int,
                 ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, ctx)
        self.norm_out = nn.LayerNorm(ctx)
        self.layers = _perceiver_layers(dim, depth, heads, ff_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.size(0), 1, 1)
        latents = _resample(self.layers, self.proj_in(x), latents)
        return self.norm_out(self.proj_out(latents))


# --- building from a file -------------------------------------------------------------------------

def _perceiver_shape(sd: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, int, int]:
    """(depth, heads, ff_mult) of a resampler's blocks."""
    depth = 0
    while f"{prefix}layers.{depth}.0.to_q.weight" in sd:
        depth += 1
    inner, dim = sd[f"{prefix}layers.0.0.to_q.weight"].shape
    ff_inner = sd[f"{prefix}layers.0.1.1.weight"].shape[0]
    return depth, inner // _HEAD_WIDTH, ff_inner // dim


def _build(adapter: IPAdapterWeights) -> nn.Module:
    sd, kind, ctx = adapter.image_proj, adapter.kind, adapter.context_dim
    if kind in (AdapterKind.FACEID, AdapterKind.FACEID_PORTRAIT):
        hidden, id_dim = sd["proj.0.weight"].shape
        return FaceIDMLP(id_dim, hidden, ctx, adapter.num_tokens)
    if kind in (AdapterKind.FACEID_PLUS, AdapterKind.FACEID_PLUS_V2):
        hidden, id_dim = sd["proj.0.weight"].shape
        dim, clip_dim = sd["perceiver_resampler.proj_in.weight"].shape
        depth, heads, ff_mult = _perceiver_shape(sd, "perceiver_resampler.")
        return FaceIDPlusProjection(id_dim, hidden, dim, adapter.num_tokens, clip_dim, ctx, depth, heads, ff_mult)
    if kind is AdapterKind.IMAGE_PROMPT:
        return ImagePromptProjection(sd["proj.weight"].shape[1], ctx, adapter.num_tokens)
    if kind in (AdapterKind.IMAGE_PROMPT_PLUS, AdapterKind.FACEID_PORTRAIT_UNNORM):
        _, num_queries, dim = sd["latents"].shape
        depth, heads, ff_mult = _perceiver_shape(sd, "")
        return Resampler(dim, depth, heads, num_queries, sd["proj_in.weight"].shape[1], ctx, ff_mult)
    if kind is AdapterKind.FACESTUDIO:
        width = sd["image_in.weight"].shape[0]
        return FaceStudioFusion(adapter.clip_width, adapter.text_width, ctx, adapter.num_tokens, width,
                                adapter.id_embedding_width)
    raise AdapterError(f"{adapter.source}: no projection for kind {kind.value!r}")


def projection_for(adapter: IPAdapterWeights, device: torch.device | str = "cpu") -> nn.Module:
    """The adapter's projection module, its `image_proj` tensors loaded strictly (every key, nothing
    more) in fp32, in eval mode without gradients. Build it once per Apply and pass it on as `module`.

    Built on the meta device and given the fp32 tensors themselves (assign): one fp32 copy of an fp16
    file's projection, none of an fp32 one. Initialising real parameters first and copying into them
    held two (about 0.75 GB extra at every Apply of an SDXL FaceID Plus v2)."""
    def fail(why: str) -> AdapterError:
        return AdapterError(f"{adapter.source}: its image projection does not load into {adapter.kind.label}'s "
                            f"projection ({why}). The file is incomplete or damaged; download it again.")

    try:
        with torch.device("meta"):
            module = _build(adapter)
        result = module.load_state_dict({k: v.float() for k, v in adapter.image_proj.items()}, strict=False,
                                        assign=True)
    except KeyError as e:
        raise fail(f"no {e}") from None
    except RuntimeError as e:  # shapes that disagree
        raise fail(" ".join(str(e).split())[:300]) from None
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{what} {', '.join(repr(k) for k in keys)}"
                 for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise fail("; ".join(parts))
    return module.to(device).eval().requires_grad_(False)


# --- tokens ---------------------------------------------------------------------------------------

def _rows(x: torch.Tensor, ndim: int, what: str, width: int | None) -> torch.Tensor:
    """x with a leading batch axis (ndim in all), fp32; checks the last axis' width."""
    if x.ndim == ndim - 1:
        x = x.unsqueeze(0)
    if x.ndim != ndim:
        raise ValueError(f"{what} must be {ndim - 1}-D or {ndim}-D, got shape {list(x.shape)}")
    if width is not None and x.shape[-1] != width:
        raise ValueError(f"{what} are {x.shape[-1]} wide; this adapter reads {width}")
    return x.float()


def _single(x: torch.Tensor, what: str, hint: str) -> torch.Tensor:
    if x.shape[0] != 1:
        raise ValueError(f"{what}: expected one, got {x.shape[0]}; {hint}")
    return x


def _clip_hidden(adapter: IPAdapterWeights, clip_features: torch.Tensor | None, what: str) -> torch.Tensor:
    if clip_features is None:
        raise ValueError(f"{adapter.kind.label} needs CLIP vision features ({what}): "
                         f"the penultimate hidden states [1, S, {adapter.clip_width}]")
    return _single(_rows(clip_features, 3, "CLIP hidden states", adapter.clip_width), "CLIP hidden states",
                   "pass the features of one image")


@torch.no_grad()
def identity_tokens(adapter: IPAdapterWeights, embeddings: torch.Tensor, clip_features: torch.Tensor | None = None,
                    shortcut_scale: float = 1.0, module: nn.Module | None = None) -> torch.Tensor:
    """[1, T, ctx] fp32 context tokens of one identity.

    embeddings: ArcFace embeddings [N, 512] (or [512]). Portrait: every shot becomes its 16 tokens,
    shots in order ([1, 16 N, ctx]). Portrait unnorm: the N raw embeddings are the resampler's input
    sequence ([1, N, 512] -> [1, 16, ctx]). Other kinds take the one combined embedding (N == 1).
    clip_features: FaceID Plus only, the CLIP penultimate hidden states of the face crop [1, S, clip].
    shortcut_scale: FaceID Plus v2's shortcut weight. module: a `projection_for(adapter)` to reuse.
    """
    if not adapter.is_identity:
        raise ValueError(f"{adapter.source} is {adapter.kind.label}, not a face-identity adapter")
    emb = _rows(embeddings, 2, "face embeddings", adapter.id_embedding_width)
    module = module if module is not None else projection_for(adapter, emb.device)
    if adapter.kind is AdapterKind.FACEID_PORTRAIT:
        return module(emb).reshape(1, -1, adapter.context_dim)
    if adapter.kind is AdapterKind.FACEID_PORTRAIT_UNNORM:
        # The shots are one input sequence, as the reference pipeline passes face_embeds [1, n, 512] to a
        # Resampler behind an attention processor fixed at 16 tokens. cubiq's pack resamples each shot
        # alone (16 tokens per shot); the two agree for one shot.
        return module(emb[None])
    _single(emb, "face embeddings", "combine the shots into one embedding first (only Portrait takes several)")
    if adapter.kind in (AdapterKind.FACEID_PLUS, AdapterKind.FACEID_PLUS_V2):
        clip = _clip_hidden(adapter, clip_features, "of the face crop").to(emb.device)
        return module(emb, clip, shortcut=adapter.kind is AdapterKind.FACEID_PLUS_V2, shortcut_scale=shortcut_scale)
    return module(emb)


def unconditional_identity_tokens(adapter: IPAdapterWeights, zero_clip_features: torch.Tensor | None = None,
                                  shortcut_scale: float = 1.0, shots: int = 1,
                                  module: nn.Module | None = None) -> torch.Tensor:
    """The negative side's tokens, as the reference code makes them: the projection of a zero face
    embedding (Portrait and Portrait unnorm: `shots` of them, one per conditioning shot) and, for
    FaceID Plus, of the CLIP features of an all-zero normalized image (`torch.zeros_like(clip_image)`
    through the vision model; the caller runs it), with the same shortcut scale as the conditional side."""
    if adapter.id_embedding_width is None:
        raise ValueError(f"{adapter.source} is {adapter.kind.label}, not a face-identity adapter")
    zeros = torch.zeros(shots, adapter.id_embedding_width)
    if zero_clip_features is not None:
        zeros = zeros.to(zero_clip_features.device)
    return identity_tokens(adapter, zeros, zero_clip_features, shortcut_scale, module)


@torch.no_grad()
def facestudio_tokens(adapter: IPAdapterWeights, face: torch.Tensor, text_embeds: torch.Tensor,
                      image_embeds: torch.Tensor | None, blend: float, module: nn.Module | None = None) -> torch.Tensor:
    """[1, T, ctx] fp32: a FaceStudio adapter's hybrid guidance e_g = blend * e_i + (1 - blend) * e_p of one
    face embedding [1, 512], the prompt's pooled embedding [1, text] and, for e_i, the style image's CLIP
    image_embeds [1, clip] (None: the text path alone)."""
    if adapter.kind is not AdapterKind.FACESTUDIO:
        raise ValueError(f"{adapter.source} is {adapter.kind.label}, not a FaceStudio adapter")
    face = _single(_rows(face, 2, "face embeddings", adapter.id_embedding_width), "face embeddings",
                   "combine the shots into one embedding first")
    text = _single(_rows(text_embeds, 2, "pooled text embeddings", adapter.text_width), "pooled text embeddings",
                   "pass the prompt's pooled output")
    image = None if image_embeds is None else _single(
        _rows(image_embeds, 2, "CLIP image embeds", adapter.clip_width), "CLIP image embeds", "pass one style image")
    module = module if module is not None else projection_for(adapter, face.device)
    return module.hybrid(face, text.to(face.device), None if image is None else image.to(face.device), float(blend))


@torch.no_grad()
def style_tokens(adapter: IPAdapterWeights, clip_features: torch.Tensor,
                 module: nn.Module | None = None) -> torch.Tensor:
    """[1, T, ctx] fp32 tokens of one style image: image-prompt takes CLIP `image_embeds` [1, clip],
    image-prompt Plus the penultimate hidden states [1, S, clip]."""
    if adapter.kind is AdapterKind.IMAGE_PROMPT:
        x = _single(_rows(clip_features, 2, "CLIP image embeds", adapter.clip_width), "CLIP image embeds",
                    "pass the embedding of one image")
    elif adapter.kind is AdapterKind.IMAGE_PROMPT_PLUS:
        x = _clip_hidden(adapter, clip_features, "of the style image")
    else:
        raise ValueError(f"{adapter.source} is {adapter.kind.label}, not an image-prompt (style) adapter")
    module = module if module is not None else projection_for(adapter, x.device)
    return module(x)


def unconditional_style_tokens(adapter: IPAdapterWeights, zero_clip_features: torch.Tensor | None = None,
                               module: nn.Module | None = None) -> torch.Tensor:
    """Image-prompt: the projection of a zero image embedding (as the reference code does). Plus: of
    the CLIP hidden states of an all-zero normalized image, which the caller computes."""
    if adapter.kind is AdapterKind.IMAGE_PROMPT and zero_clip_features is None:
        zero_clip_features = torch.zeros(1, adapter.clip_width)
    return style_tokens(adapter, zero_clip_features, module)


# --- per-layer keys and values --------------------------------------------------------------------

@torch.no_grad()
def layer_kv(adapter: IPAdapterWeights, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) = (tokens to_k_ip^T, tokens to_v_ip^T) per layer, fp32, in the adapter's layer order:
    [1 or B, T, inner] each, the `persons` / `style` entries of `routing.TokenGroups.build`."""
    return layer_kvs(adapter, [tokens])[0]


def layer_kvs(adapter: IPAdapterWeights, token_sets) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """`layer_kv` of several token sets (any T each). Each layer's fp16 weights become fp32 once, not once
    per set: per-set casts left ~100 MB per person of freed copies in the allocator, which the process's
    peak memory kept. One product per set, not one over all sets stacked: a BLAS may sum a row in another
    order when the product has more rows (MKL on AVX-512 does), and a person's K/V must not depend on who
    else is in the Apply (a chained Apply equals one Apply with both persons, bit for bit)."""
    shapes = []
    for tokens in token_sets:
        if tokens.ndim != 3 or tokens.shape[-1] != adapter.context_dim:
            raise ValueError(f"tokens must be [1 or B, T, {adapter.context_dim}], got {list(tokens.shape)}")
        shapes.append(tuple(tokens.shape[:-1]))
    if not shapes:
        return []
    rows = [t.float().reshape(-1, adapter.context_dim) for t in token_sets]
    out: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in shapes]
    for k, v in adapter.layers:
        k, v = (w.to(rows[0].device, torch.float32) for w in (k, v))
        for i, (x, shape) in enumerate(zip(rows, shapes)):
            out[i].append((F.linear(x, k).reshape(*shape, -1), F.linear(x, v).reshape(*shape, -1)))
    return out
