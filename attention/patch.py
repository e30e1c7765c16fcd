"""Install FaceStudio's routed attention (routing.py) on a ModelPatcher as attn2 replacements.

Per Apply, every person's identity tokens (and the style's) are projected once and turned into each
layer's K/V once (fp32, CPU); the attn2 replacement at a position only computes A_text with the host's
attention (or a foreign replacement it wraps), picks the persons active at this step's sigma and calls
`routing.route_chunks` (cond rows: each person's tokens; uncond rows: their unconditional tokens).

The replacement objects are immutable (their caches only hold derived copies), so ModelPatcher.clone()
shares them (`__deepcopy__` returns self). A second Apply on a model already carrying ours builds a
merged replacement with both person lists, so all persons share one A_text and one routed call.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .adapters import AdapterError, AdapterKind, IPAdapterWeights
from .layers import cross_attention_positions, map_adapter_layers
from .projection import (
    identity_tokens,
    layer_kv,
    projection_for,
    style_tokens,
    unconditional_identity_tokens,
    unconditional_style_tokens,
)
from .routing import TokenGroups, find_downscale, masks_to_tokens, route_chunks, text_gain

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Person:
    """One person for FaceStudio Apply: an identity, where (mask), how strongly and when (0..1 of sampling)."""

    identity: object  # encoders.identity.FaceIdentity
    mask: torch.Tensor | None = None  # [1, h, w] soft, or None for the whole image
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0


def add_person(persons: Sequence[Person] | None, identity, mask: torch.Tensor | None = None, mask_index: int = 0,
               weight: float = 1.0, start: float = 0.0, end: float = 1.0) -> tuple[Person, ...]:
    """A new tuple: `persons` (never changed) plus this person. `mask` is a MASK batch; mask_index picks one."""
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"start and end must satisfy 0 <= start <= end <= 1, got start {start}, end {end}")
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim != 3:
            raise ValueError(f"mask must be a MASK [M, h, w], got shape {tuple(mask.shape)}")
        if not 0 <= mask_index < mask.shape[0]:
            raise ValueError(f"mask_index {mask_index} is out of range: the mask batch has {mask.shape[0]} mask(s) "
                             f"(use 0..{mask.shape[0] - 1})")
        mask = mask[mask_index:mask_index + 1].detach().float().cpu().clone()
    return tuple(persons or ()) + (Person(identity, mask, float(weight), float(start), float(end)),)


@dataclass(frozen=True, eq=False)
class PersonLayer:
    """A person's K/V at one layer (fp32, CPU, [1, T, inner]) and when/where it applies."""

    cond: KV
    uncond: KV
    weight: float
    sigma_start: float  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float
    mask: torch.Tensor | None

    def active(self, sigma: float | None) -> bool:
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start


@dataclass(frozen=True, eq=False)
class StyleLayer:
    cond: KV
    uncond: KV
    scale: float


@functools.lru_cache(maxsize=None)
def _takes_transformer_options(function: Callable) -> bool:
    # Hosts before about 0.3.60 have no transformer_options parameter on their attention functions.
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == "transformer_options" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _host_attention(q, k, v, heads, extra_options):
    from comfy.ldm.modules import attention  # looked up per call: the host picks its kernel at start-up

    function = attention.optimized_attention
    options = {"attn_precision": extra_options.get("attn_precision")}
    if _takes_transformer_options(function):
        options["transformer_options"] = extra_options
    return function(q, k, v, heads, **options)


class FaceStudioAttention:
    """The attn2 replacement at one position: `patch(q, k, v, extra_options)` -> [B, Nq, H*d] before to_out."""

    is_facestudio_attention = True

    def __init__(self, persons: Sequence[PersonLayer], style: StyleLayer | None, alpha: float,
                 wrapped: Callable | None = None):
        text_gain(alpha)  # validates alpha
        self.persons = tuple(persons)
        self.style = style
        self.alpha = float(alpha)
        self.wrapped = wrapped
        self._groups: dict = {}   # (active, heads) -> (cond TokenGroups, uncond TokenGroups)
        self._regions: dict = {}  # (active, latent hw, Nq, batch, device) -> region weights

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def merged_with(self, other: "FaceStudioAttention") -> "FaceStudioAttention":
        """One replacement with this one's persons, then other's (same A_text, one routed call)."""
        if self.style is not None and other.style is not None:
            raise ValueError("Both FaceStudio Apply nodes have a style: connect a style to only one of them.")
        if self.alpha != other.alpha:
            raise ValueError(f"Chained FaceStudio Apply nodes must use the same alpha (got {self.alpha} and "
                             f"{other.alpha}): alpha scales the shared text attention.")
        return FaceStudioAttention(self.persons + other.persons, self.style or other.style, self.alpha, self.wrapped)

    def wrapping(self, wrapped: Callable) -> "FaceStudioAttention":
        return FaceStudioAttention(self.persons, self.style, self.alpha, wrapped)

    def _token_groups(self, active: tuple[int, ...], heads: int) -> tuple[TokenGroups, TokenGroups]:
        key = (active, heads)
        groups = self._groups.get(key)
        if groups is None:
            chosen = [self.persons[i] for i in active]
            style = self.style
            groups = tuple(
                TokenGroups.build([(*getattr(p, side), p.weight) for p in chosen], heads,
                                  None if style is None else (*getattr(style, side), style.scale))
                for side in ("cond", "uncond"))
            self._groups[key] = groups
        return groups

    def _region_weights(self, active, groups: TokenGroups, latent_hw, nq: int, batch: int, device):
        key = (active, latent_hw, nq, batch, device)
        regions = self._regions.get(key)
        if regions is None:
            masks = [self.persons[i].mask for i in active]
            if any(m is not None for m in masks):
                downscale = find_downscale(latent_hw, nq)
                masks = [None if m is None else masks_to_tokens(m, latent_hw, downscale, batch).to(device)
                         for m in masks]
            else:
                masks = [None] * len(masks)
            regions = groups.to(device, torch.float32).region_weights(masks).to(device)
            self._regions[key] = regions
        return regions

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        if self.wrapped is not None:
            a_text = self.wrapped(q, k, v, extra_options)
        else:
            a_text = _host_attention(q, k, v, heads, extra_options)
        sigmas = extra_options.get("sigmas")
        sigma = None if sigmas is None else float(sigmas.reshape(-1)[0])
        active = tuple(i for i, p in enumerate(self.persons) if p.active(sigma))
        if not active and self.style is None:
            return a_text
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        cond, uncond = self._token_groups(active, heads)
        groups = [uncond if c == 1 else cond for c in chunks]
        batch = q.shape[0] // len(chunks)
        shape = extra_options.get("original_shape")
        latent_hw = tuple(int(x) for x in shape[-2:]) if shape is not None else (q.shape[1], 1)
        regions = self._region_weights(active, cond, latent_hw, q.shape[1], batch, q.device)
        return route_chunks(q, a_text, groups, regions, alpha=self.alpha)


# --- building from an adapter and identities ------------------------------------------------------

def _identity_inputs(adapter: IPAdapterWeights, identity) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(embeddings, clip features, shots) the adapter's projection takes from one identity."""
    width = adapter.id_embedding_width
    if identity.embedding_dim != width:
        raise AdapterError(
            f"The identity was made with a {identity.embedding_dim}-wide face recognizer ({identity.recognizer}), "
            f"but {adapter.source} reads {width}-wide ArcFace embeddings: encode the identity with an ArcFace "
            f"pack such as buffalo_l or antelopev2.")
    kind = adapter.kind
    if kind is AdapterKind.FACEID_PORTRAIT:
        emb = identity.normed_embeddings
    elif kind is AdapterKind.FACEID_PORTRAIT_UNNORM:
        emb = identity.embeddings
    else:
        emb = identity.embedding[None]
    clip = None
    if kind in (AdapterKind.FACEID_PLUS, AdapterKind.FACEID_PLUS_V2):
        if identity.combined_clip_features is None:
            raise AdapterError(f"{adapter.source} is {kind.label}, which also reads CLIP vision features of the face: "
                               "connect a CLIP vision model (ViT-H) to FaceStudio Encode Identity and encode again.")
        clip = torch.from_numpy(np.array(identity.combined_clip_features, np.float32))[None]
    return torch.from_numpy(np.array(emb, np.float32)), clip, emb.shape[0]


def _sigma(model, percent: float) -> float:
    return float(model.get_model_object("model_sampling").percent_to_sigma(percent))


def apply_facestudio(model, adapter: IPAdapterWeights, persons: Sequence[Person], alpha: float = 0.5,
                     style_adapter: IPAdapterWeights | None = None, style=None, style_weight: float = 1.0):
    """A clone of `model` with FaceStudio's routed attention at every cross-attention position."""
    if not adapter.is_identity:
        raise AdapterError(f"{adapter.source} is {adapter.kind.label}, a style (image-prompt) adapter: connect a "
                           "FaceID adapter as 'adapter' and this one as 'style_adapter'.")
    if style_adapter is not None and not style_adapter.is_style:
        raise AdapterError(f"{style_adapter.source} is {style_adapter.kind.label}, a face-identity adapter: "
                           "connect an image-prompt (style) adapter as 'style_adapter' and this one as 'adapter'.")
    if (style_adapter is None) != (style is None):
        raise ValueError("A style needs both 'style_adapter' and 'style' connected (or neither).")
    if not persons:
        raise ValueError("No persons: add at least one with FaceStudio Person.")
    text_gain(alpha)
    mapped = map_adapter_layers(adapter, cross_attention_positions(model))

    module = projection_for(adapter)
    person_kv = []
    for p in persons:
        emb, clip, shots = _identity_inputs(adapter, p.identity)
        cond = identity_tokens(adapter, emb, clip, module=module)
        uncond = unconditional_identity_tokens(adapter, None if clip is None else torch.zeros_like(clip),
                                               shots=shots, module=module)
        person_kv.append((layer_kv(adapter, cond), layer_kv(adapter, uncond),
                          p, _sigma(model, p.start), _sigma(model, p.end)))

    style_kv = None
    if style is not None:
        map_adapter_layers(style_adapter, cross_attention_positions(model))
        smodule = projection_for(style_adapter)
        features = (style.image_embeds if style_adapter.kind is AdapterKind.IMAGE_PROMPT
                    else style.penultimate_hidden_states)[:1].float().cpu()
        zero = None if style_adapter.kind is AdapterKind.IMAGE_PROMPT else torch.zeros_like(features)
        style_kv = (layer_kv(style_adapter, style_tokens(style_adapter, features, smodule)),
                    layer_kv(style_adapter, unconditional_style_tokens(style_adapter, zero, smodule)))

    clone = model.clone()
    existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for n, layer in enumerate(mapped):
        people = [PersonLayer(cond[n], uncond[n], p.weight, s_start, s_end, p.mask)
                  for cond, uncond, p, s_start, s_end in person_kv]
        style_n = None if style_kv is None else StyleLayer(style_kv[0][n], style_kv[1][n], float(style_weight))
        patch = FaceStudioAttention(people, style_n, alpha)
        key = layer.position.patch_key
        previous = existing.get(key, existing.get(key[:2]))
        if getattr(previous, "is_facestudio_attention", False):
            patch = previous.merged_with(patch)
        elif previous is not None:
            patch = patch.wrapping(previous)
        clone.set_model_attn2_replace(patch, *key)
    return clone
