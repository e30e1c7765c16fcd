"""Install FaceStudio's routed attention (routing.py) on a ModelPatcher as attn2 replacements.

Per Apply, every person's identity tokens (and the style's) are projected once and turned into each
layer's K/V once (fp32, on the offload device), then laid out for `routing.route` (one TokenGroups
per layer and CFG side). Those tensors are the parameters of one `TokenStore` module that the MODEL
carries as an additional model (attention/token_store.py), so the host's model management loads it to
the compute device with the UNet (counted in its memory budget) and offloads it with it; nothing is
kept on a GPU behind the host's back. The attn2 replacement at a position computes A_text with the
host's attention (or a foreign replacement it wraps), zeroes the weights of persons outside their
[start, end] at each row's sigma, and calls `routing.route_chunks` (cond rows: each person's tokens;
uncond rows: their unconditional tokens).

The replacement objects are immutable, so ModelPatcher.clone() shares them (`__deepcopy__` returns
self); the host's `.to(device)` picks the one instance per device (multi-GPU worker threads). A
second Apply on a model already carrying ours builds merged replacements and one new store with both
person lists, so all persons share one A_text and one routed call.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .adapters import AdapterError, AdapterKind, IPAdapterWeights
from .controls import scale_kv, style_layer_scales
from .layers import cross_attention_positions, map_adapter_layers
from .lora import APPLIED_LORAS, LORA_KINDS, applied_lora_key, faceid_lora
from .projection import (
    identity_tokens,
    layer_kvs,
    projection_for,
    style_tokens,
    unconditional_identity_tokens,
    unconditional_style_tokens,
)
from .routing import TokenGroups, combine_regions, find_downscale, masks_to_tokens, route_chunks, text_gain
from .token_store import TokenStore, store_patcher
from ..encoders.recognizers import check_recognizer

KV = tuple[torch.Tensor, torch.Tensor]
STORE_KEY = "facestudio_tokens"  # the MODEL's additional_models entry for the TokenStore


@dataclass(frozen=True, eq=False)
class Person:
    """One person for FaceStudio Apply: an identity, where (mask), how strongly and when (0..1 of sampling).
    `negative`: an identity whose tokens replace the unconditional ones (CFG pushes away from it).
    `shortcut_scale`: FaceID Plus v2's s_scale for this person (cond and uncond tokens); other kinds ignore it."""

    identity: object  # encoders.identity.FaceIdentity
    mask: torch.Tensor | None = None  # [1, h, w] soft, or None for the whole image
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    negative: object | None = None
    shortcut_scale: float = 1.0  # FaceID Plus v2 only: out = x + shortcut_scale * resampler(x, clip)


def add_person(persons: Sequence[Person] | None, identity, mask: torch.Tensor | None = None, mask_index: int = 0,
               weight: float = 1.0, start: float = 0.0, end: float = 1.0, negative=None,
               shortcut_scale: float = 1.0) -> tuple[Person, ...]:
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
        if not bool(mask.max() > 0):
            raise ValueError(f"mask_index {mask_index} selects an all zero (empty) mask: this person would not appear "
                             "anywhere. Paint the person's region white, pick another mask_index, or disconnect the "
                             "mask to use the whole image.")
    return tuple(persons or ()) + (Person(identity, mask, float(weight), float(start), float(end), negative,
                                          float(shortcut_scale)),)


@dataclass(frozen=True, eq=False)
class PersonLayer:
    """A person's K/V at one layer (fp32, CPU, [1, T, inner]) and when/where it applies. In a patch bound
    to a TokenStore, cond/uncond are None: the store holds the only copy (`FaceStudioAttention.layers`)."""

    cond: KV | None
    uncond: KV | None
    weight: float
    sigma_start: float  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float
    mask: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class StyleLayer:
    cond: KV | None  # None when bound to a TokenStore, as in PersonLayer
    uncond: KV | None
    scale: float


def _build_groups(persons: Sequence[PersonLayer], style: StyleLayer | None, heads: int) -> tuple[TokenGroups, ...]:
    """(cond, uncond) TokenGroups of every person, then the style, at one layer."""
    return tuple(
        TokenGroups.build([(*getattr(p, side), p.weight) for p in persons], heads,
                          None if style is None else (*getattr(style, side), style.scale))
        for side in ("cond", "uncond"))


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


class PatchOrderError(RuntimeError):
    """Another pack tried to change FaceStudio's attention in place; the message says what order works."""


class FaceStudioAttention:
    """The attn2 replacement at one position: `patch(q, k, v, extra_options)` -> [B, Nq, H*d] before to_out.

    Bound to a TokenStore (`store`, `index`) when installed by apply_facestudio; unbound (tests, or a
    head count the store was not built for) it lays its tokens out itself, once per head count.
    `.to(device)` gives the instance for one device (see `to`); `device` is None for the instance built.
    """

    is_facestudio_attention = True

    def __init__(self, persons: Sequence[PersonLayer], style: StyleLayer | None, alpha: float,
                 wrapped: Callable | None = None, store: TokenStore | None = None, index: int | None = None,
                 unfold_batch: bool = False):
        text_gain(alpha)  # validates alpha
        self.persons = tuple(persons)
        self.style = style
        self.alpha = float(alpha)
        self.wrapped = wrapped
        self.unfold_batch = bool(unfold_batch)  # latent b gets person b (mod the number of persons) only
        self.store, self.index = store, index
        self._sigma_bounds = torch.tensor([[p.sigma_end, p.sigma_start] for p in self.persons],
                                          dtype=torch.float64).reshape(-1, 2)
        # percent_to_sigma(0) is 999999999.9 and (1) is 0: persons from 0 to 1 act at every sigma.
        self._every_step = all(p.sigma_end <= 0.0 and p.sigma_start >= 999999999.0 for p in self.persons)
        self._groups: dict = {}   # heads -> (cond, uncond) TokenGroups, when unbound
        self._regions: dict = {}  # (latent hw, Nq, batch, device) -> (stacked masks, weights, region weights)
        self._on_device: dict = {}  # (what, device, ...) -> a small constant tensor moved there once
        self.device = None
        self._per_device: dict = {}  # device -> its instance; shared by every instance .to() derives
        self._per_device_lock = threading.Lock()

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def add(self, *args, **kwargs):
        # cubiq's ComfyUI_IPAdapter_plus calls .add() on whatever replacement sits on attn2, changing it in
        # place; ours is shared by every clone of the MODEL, so it must not change. Its own replacement
        # (installed first) is wrapped instead: text + IPAdapter attention, then our routed persons.
        raise PatchOrderError(
            "An IPAdapter node comes after FaceStudio Apply on this model, and it would change FaceStudio's "
            "attention in place. Connect the IPAdapter nodes first and FaceStudio Apply after them (FaceStudio "
            "keeps their effect and adds its persons on top).")

    def merged_with(self, other: "FaceStudioAttention") -> "FaceStudioAttention":
        """One (unbound) replacement with this one's persons, then other's (same A_text, one routed call)."""
        if self.style is not None and other.style is not None:
            raise ValueError("Both FaceStudio Apply nodes have a style: connect a style to only one of them.")
        if self.alpha != other.alpha:
            raise ValueError(f"Chained FaceStudio Apply nodes must use the same alpha (got {self.alpha} and "
                             f"{other.alpha}): alpha scales the shared text attention.")
        if self.unfold_batch != other.unfold_batch:
            raise ValueError("Chained FaceStudio Apply nodes must agree on unfold_batch: it deals the persons of "
                             "both lists to the latents of the batch together.")
        (mine, my_style), (theirs, their_style) = self.layers(), other.layers()
        return FaceStudioAttention(mine + theirs, my_style or their_style, self.alpha, self.wrapped,
                                   unfold_batch=self.unfold_batch)

    def layers(self) -> tuple[tuple[PersonLayer, ...], StyleLayer | None]:
        """(persons, style) with their K/V: this patch's own, or, bound to a store, read back from it
        (exactly: TokenGroups.segment_kv)."""
        if self.store is None or not self.persons and self.style is None:
            return self.persons, self.style
        cond, uncond = self.store.groups(self.index)
        kv = [tuple(tuple(t.cpu() for t in g.segment_kv(s)) for g in (cond, uncond)) for s in range(cond.segments)]
        persons = tuple(dataclasses.replace(p, cond=c, uncond=u) for p, (c, u) in zip(self.persons, kv))
        style = None if self.style is None else dataclasses.replace(self.style, cond=kv[-1][0], uncond=kv[-1][1])
        return persons, style

    def wrapping(self, wrapped: Callable) -> "FaceStudioAttention":
        return FaceStudioAttention(self.persons, self.style, self.alpha, wrapped, self.store, self.index,
                                   self.unfold_batch)

    def bound_to(self, store: TokenStore, index: int) -> "FaceStudioAttention":
        """This patch reading its tokens from `store` layer `index` (built from this patch's layers), which
        then holds the only copy of the K/V."""
        persons = tuple(dataclasses.replace(p, cond=None, uncond=None) for p in self.persons)
        style = None if self.style is None else dataclasses.replace(self.style, cond=None, uncond=None)
        return FaceStudioAttention(persons, style, self.alpha, self.wrapped, store, index, self.unfold_batch)

    def to(self, target, *args, **kwargs) -> "FaceStudioAttention":
        """The host calls this on every patches_replace entry: with the model's load device and dtype
        when loading it, and, with multi-GPU, with each worker thread's device for every batch.

        A device gets one instance, cached and shared by every clone of the MODEL (their patches_replace
        hold the same objects): it reads the store replica the host loaded on that device (each GPU's
        model clone carries its own) and keeps its own region cache, so worker threads share no mutable
        state. Dtype casts change nothing: the K/V stay fp32 and `route` casts them per call. A wrapped
        replacement's own `.to` is forwarded and its result wrapped."""
        to = getattr(self.wrapped, "to", None)
        wrapped = to(target, *args, **kwargs) if callable(to) else self.wrapped
        if not isinstance(target, (torch.device, str, int)):  # a dtype
            return self if wrapped is self.wrapped else self._derived(wrapped, self.device)
        device = torch.device(target)
        with self._per_device_lock:
            instance = self._per_device.get(device)
            if instance is None or instance.wrapped is not wrapped:
                instance = self._per_device[device] = self._derived(wrapped, device)
        return instance

    def _derived(self, wrapped: Callable | None, device) -> "FaceStudioAttention":
        instance = self.wrapping(wrapped)
        instance.device = device
        instance._per_device, instance._per_device_lock = self._per_device, self._per_device_lock  # one cache
        return instance

    def token_groups(self, heads: int) -> tuple[TokenGroups, TokenGroups]:
        if self.store is not None:
            store = self.store if self.device is None else self.store.on(self.device)
            groups = store.groups(self.index)
            if groups[0].heads == heads:
                return groups
        groups = self._groups.get(heads)
        if groups is None:
            groups = self._groups[heads] = _build_groups(*self.layers(), heads)
        return groups

    def _moved(self, what, make: Callable[[], torch.Tensor], device, dtype=None) -> torch.Tensor:
        """The constant `make()` on `device`, copied there once: a host-to-device copy at every call
        would make the sampler wait at every layer."""
        key = (what, device, dtype)
        moved = self._on_device.get(key)
        if moved is None:
            moved = self._on_device[key] = make().to(device, dtype)
        return moved

    def _region_weights(self, groups: TokenGroups, latent_hw, nq: int, batch: int, device,
                        activity: torch.Tensor | None):
        key = (latent_hw, nq, batch, device)
        cached = self._regions.get(key)
        if cached is None:
            masks = [p.mask for p in self.persons]
            if any(m is not None for m in masks):
                downscale = find_downscale(latent_hw, nq)
                masks = [None if m is None else masks_to_tokens(m, latent_hw, downscale, batch).to(device)
                         for m in masks]
            else:
                masks = [None] * len(masks)
            given = [m for m in masks if m is not None]
            shape = torch.broadcast_shapes((1, 1), *(m.shape for m in given))
            one = torch.ones((), device=device)
            stacked = (torch.stack([one.expand(shape) if m is None else m.float().expand(shape) for m in masks], -1)
                       if masks else torch.zeros(1, 1, 0, device=device))  # a style alone: no person columns
            weights = groups.weights.to(device)
            cached = self._regions[key] = (stacked, weights, combine_regions(stacked, weights))
        stacked, weights, regions = cached
        if activity is None:
            return regions
        # Everything on the compute device: the activity was decided there (see _activity).
        return combine_regions(stacked, weights, activity.to(device))

    def _activity(self, sigmas: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """[S, 1, P] 1/0: person p acts in latent row s (its sigma in [end, start], and with unfold_batch
        s mod P == p); S = 1 when all rows agree. None when every person acts everywhere."""
        if not self.persons:
            return None
        active = torch.ones(1, len(self.persons), dtype=torch.bool)
        if sigmas is not None and not self._every_step:
            s = sigmas.detach().reshape(-1)
            if s.shape[0] > batch and s.shape[0] % batch == 0:
                s = s[:batch]  # one per row of every CFG chunk: the chunks repeat the latents' sigmas
            if s.shape[0] not in (1, batch):
                raise ValueError(f"{s.shape[0]} sigmas for a latent batch of {batch}")
            if s.device.type != "cpu":
                # Decided on the device: reading the sigmas back would stall the GPU at every layer.
                bounds = self._moved("sigma bounds", lambda: self._sigma_bounds, s.device, s.dtype)
                active = (bounds[:, 0] <= s[:, None]) & (s[:, None] <= bounds[:, 1])
                if self.unfold_batch:
                    active = active & self._moved(("dealt", batch), lambda: self._dealt(batch), s.device)
                return active.float()[:, None, :]
            s = s.double()
            if (s == s[0]).all():
                s = s[:1]
            bounds = self._sigma_bounds
            active = (bounds[:, 0] <= s[:, None]) & (s[:, None] <= bounds[:, 1])  # [S, P]
        if self.unfold_batch:
            active = active & self._dealt(batch)
        return None if active.all() else active.float()[:, None, :]

    def _dealt(self, batch: int) -> torch.Tensor:
        return torch.arange(batch)[:, None] % len(self.persons) == torch.arange(len(self.persons))[None]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        # A wrapped foreign replacement's output (A_text + its own contribution) is passed on unscaled;
        # alpha only ever scales the plain text attention, and only where a style acts (routing.py).
        foreign = self.wrapped(q, k, v, extra_options) if self.wrapped is not None else None
        a_text = _host_attention(q, k, v, heads, extra_options) if foreign is None else None
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        batch = q.shape[0] // len(chunks)
        activity = self._activity(extra_options.get("sigmas"), batch)
        if self.style is None and (not self.persons or (activity is not None and activity.device.type == "cpu"
                                                        and not activity.any())):
            return a_text if foreign is None else foreign
        cond, uncond = self.token_groups(heads)
        groups = [uncond if c == 1 else cond for c in chunks]
        if foreign is not None and text_gain(self.alpha) != 1.0 and any(g.style_acts for g in groups):
            a_text = _host_attention(q, k, v, heads, extra_options)  # the text alone, for alpha to scale
        shape = extra_options.get("original_shape")
        latent_hw = tuple(int(x) for x in shape[-2:]) if shape is not None else (q.shape[1], 1)
        regions = self._region_weights(cond, latent_hw, q.shape[1], batch, q.device, activity)
        precision = extra_options.get("attn_precision") or torch.float32
        if precision not in (torch.float32, torch.float64):
            precision = torch.float32  # scores in fp32 at least: half-precision softmax over tokens overflows
        return route_chunks(q, a_text, groups, regions, alpha=self.alpha, precision=precision, wrapped=foreign)


# --- building from an adapter and identities ------------------------------------------------------

def _identity_inputs(adapter: IPAdapterWeights, identity, what: str = "The identity"):
    """(embeddings, clip features, unconditional clip features, shots) the adapter's projection takes."""
    width = adapter.id_embedding_width
    if identity.embedding_dim != width:
        raise AdapterError(
            f"{what} was made with a {identity.embedding_dim}-wide face recognizer ({identity.recognizer}), "
            f"but {adapter.source} reads {width}-wide ArcFace embeddings: encode the identity with the ArcFace "
            f"pack it was trained with (buffalo_l for the FaceID family).")
    # Same width is not the same embedding space (antelopev2's glintr100 is 512 wide too): check which
    # recognizer, by its file's hash, against the one this kind was trained on.
    problem = check_recognizer(adapter.kind, identity.recognizer, adapter.source, what)
    if problem is not None:
        raise AdapterError(problem)
    kind = adapter.kind
    if kind is AdapterKind.FACEID_PORTRAIT:
        emb = identity.shot_rows(normed=True)
    elif kind is AdapterKind.FACEID_PORTRAIT_UNNORM:
        emb = identity.shot_rows(normed=False)
    else:
        emb = identity.embedding[None]
    clip = uncond_clip = None
    if kind in (AdapterKind.FACEID_PLUS, AdapterKind.FACEID_PLUS_V2):
        if identity.combined_clip_features is None:
            raise AdapterError(f"{adapter.source} is {kind.label}, which also reads CLIP vision features of the face "
                               f"({what.lower()} has none): connect a CLIP vision model (ViT-H) to FaceStudio Encode "
                               "Identity and encode again.")
        if identity.clip_width != adapter.clip_width:
            raise AdapterError(f"{what} was encoded with a CLIP vision model whose hidden states are "
                               f"{identity.clip_width} wide, but {adapter.source} ({kind.label}) reads "
                               f"{adapter.clip_width}: connect the CLIP vision model the adapter was trained with "
                               "(ViT-H) to FaceStudio Encode Identity and encode again.")
        clip = torch.from_numpy(np.array(identity.combined_clip_features, np.float32))[None]
        uncond_clip = torch.from_numpy(np.array(identity.unconditional_clip_features, np.float32))[None]
    return torch.from_numpy(np.array(emb, np.float32)), clip, uncond_clip, emb.shape[0]


def _person_tokens(adapter: IPAdapterWeights, module, person: Person) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) identity tokens: uncond from a zero embedding (and zero-image CLIP features),
    or the person's negative identity. Both sides with the person's own shortcut scale (FaceID Plus v2;
    the reference's get_image_embeds passes the same s_scale to both)."""
    emb, clip, uncond_clip, shots = _identity_inputs(adapter, person.identity)
    scale = person.shortcut_scale
    cond = identity_tokens(adapter, emb, clip, scale, module=module)
    if person.negative is not None:
        n_emb, n_clip, _, _ = _identity_inputs(adapter, person.negative, "The negative identity")
        return cond, identity_tokens(adapter, n_emb, n_clip, scale, module=module)
    return cond, unconditional_identity_tokens(adapter, uncond_clip, scale, shots=shots, module=module)


def _style_features(adapter: IPAdapterWeights, style, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features the adapter takes, its zero-image features or None for plain image-prompt)."""
    if style.batch_size != 1:
        raise ValueError(f"{what} holds {style.batch_size} images; FaceStudio Apply takes one style image: encode "
                         "a single image (or pick one with an image batch node).")
    plain = adapter.kind is AdapterKind.IMAGE_PROMPT
    features = (style.image_embeds if plain else style.penultimate_hidden_states).float().cpu()
    if features.shape[-1] != adapter.clip_width:
        raise AdapterError(f"{what} was encoded with a CLIP vision model whose {'image embeds' if plain else 'hidden states'} "
                           f"are {features.shape[-1]} wide, but {adapter.source} reads {adapter.clip_width}: encode it "
                           "with the CLIP vision model the adapter was trained with (ViT-H for SD1.5 and most SDXL "
                           "adapters, ViT-bigG for the original SDXL one).")
    return features, None if plain else style.unconditional_hidden_states.float().cpu()


def _scaled_person(cond: KV, uncond: KV, person: Person, sigma_start: float, sigma_end: float,
                   embeds_scaling: str) -> PersonLayer:
    (cond, weight), (uncond, _) = (scale_kv(kv, person.weight, embeds_scaling) for kv in (cond, uncond))
    return PersonLayer(cond, uncond, weight, sigma_start, sigma_end, person.mask)


def _sigma(model, percent: float) -> float:
    return float(model.get_model_object("model_sampling").percent_to_sigma(percent))


def apply_facestudio(model, adapter: IPAdapterWeights, persons: Sequence[Person], alpha: float = 0.5,
                     style_adapter: IPAdapterWeights | None = None, style=None, style_weight: float = 1.0,
                     negative_style=None, lora_strength: float = 0.0, embeds_scaling: str = "V only",
                     style_blocks: str = "all", style_block_weights: str = "", unfold_batch: bool = False,
                     reports: list[str] | None = None):
    """A clone of `model` with FaceStudio's routed attention at every cross-attention position.

    negative_style: a StyleEncoding whose tokens replace the style's unconditional ones.
    lora_strength: above 0, the FaceID LoRA trained with `adapter` (FaceID, Plus, Plus v2) is added to the
    clone (attention/lora.py), once per MODEL: a chained Apply finding it there does not add it again. When
    it is nowhere to be found the clone runs without it, and the report is logged and appended to `reports`.
    embeds_scaling, style_blocks, style_block_weights: see attention/controls.py.
    unfold_batch: latent b of the batch gets person b (mod the number of persons) only."""
    if not adapter.is_identity:
        raise AdapterError(f"{adapter.source} is {adapter.kind.label}, a style (image-prompt) adapter: connect a "
                           "FaceID adapter as 'adapter' and this one as 'style_adapter'.")
    if style_adapter is not None and not style_adapter.is_style:
        raise AdapterError(f"{style_adapter.source} is {style_adapter.kind.label}, a face-identity adapter: "
                           "connect an image-prompt (style) adapter as 'style_adapter' and this one as 'adapter'.")
    if (style_adapter is None) != (style is None):
        raise ValueError("A style needs both 'style_adapter' and 'style' connected (or neither).")
    if negative_style is not None and style is None:
        raise ValueError("'negative_style' only acts on a style: connect 'style' and 'style_adapter' too, or "
                         "disconnect 'negative_style'.")
    if not persons:
        raise ValueError("No persons: add at least one with FaceStudio Person.")
    text_gain(alpha)
    positions = cross_attention_positions(model)
    mapped = map_adapter_layers(adapter, positions)
    style_scales = style_layer_scales(positions, (style_adapter or adapter).base_model, style_blocks,
                                      style_block_weights)
    scale_kv((torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)), 1.0, embeds_scaling)  # validates the mode early

    module = projection_for(adapter)
    tokens = [t for p in persons for t in _person_tokens(adapter, module, p)]  # cond, uncond per person
    kvs = layer_kvs(adapter, tokens)
    person_kv = [(kvs[2 * i], kvs[2 * i + 1], p, _sigma(model, p.start), _sigma(model, p.end))
                 for i, p in enumerate(persons)]

    style_kv = None
    if style is not None:
        map_adapter_layers(style_adapter, positions)
        smodule = projection_for(style_adapter)
        features, zero = _style_features(style_adapter, style, "The style")
        if negative_style is not None:
            uncond = style_tokens(style_adapter, _style_features(style_adapter, negative_style,
                                                                 "The negative style")[0], smodule)
        else:
            uncond = unconditional_style_tokens(style_adapter, zero, smodule)
        style_kv = tuple(layer_kvs(style_adapter, [style_tokens(style_adapter, features, smodule), uncond]))

    lora, lora_key = None, applied_lora_key(adapter)
    applied = model.model_options.get(APPLIED_LORAS, {})
    if lora_strength and adapter.kind in LORA_KINDS and lora_key not in applied:
        lora, lora_report = faceid_lora(model, adapter, positions)
        if lora is None:
            logging.getLogger(__name__).warning("FaceStudio Apply: %s", lora_report)
            if reports is not None:
                reports.append(lora_report)

    clone = model.clone()
    if lora is not None:
        clone.add_patches(lora, float(lora_strength))
        clone.model_options[APPLIED_LORAS] = {**applied, lora_key: float(lora_strength)}
    existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    patches = []
    for n, layer in enumerate(mapped):
        people = [_scaled_person(cond[n], uncond[n], p, s_start, s_end, embeds_scaling)
                  for cond, uncond, p, s_start, s_end in person_kv]
        style_n = None
        if style_kv is not None:
            (s_cond, scale), (s_uncond, _) = (scale_kv(kv[n], float(style_weight) * style_scales[n], embeds_scaling)
                                              for kv in style_kv)
            style_n = StyleLayer(s_cond, s_uncond, scale)
        patch = FaceStudioAttention(people, style_n, alpha, unfold_batch=unfold_batch)
        key = layer.position.patch_key
        previous = existing.get(key, existing.get(key[:2]))
        if getattr(previous, "is_facestudio_attention", False):
            patch = previous.merged_with(patch)
        elif previous is not None:
            patch = patch.wrapping(previous)
        patches.append(patch)

    # One store per MODEL: a chained Apply's merged store replaces the earlier one.
    store = TokenStore([_build_groups(p.persons, p.style, pos.heads) for p, pos in zip(patches, positions)])
    clone.set_additional_models(STORE_KEY, [store_patcher(store, model.load_device, model.offload_device)])
    # The host calls the (block, index, transformer) entry, else the (block, index) one; cubiq's IPAdapter
    # uses the 2-tuple on SD1.5 and .add()s to an entry already there. Where a block holds one transformer
    # both keys name the same attention, so ours goes at both: a later IPAdapter then finds it (and gets
    # PatchOrderError) instead of adding an entry the host never calls.
    blocks = [layer.position.patch_key[:2] for layer in mapped]
    for n, (patch, layer) in enumerate(zip(patches, mapped)):
        bound, key = patch.bound_to(store, n), layer.position.patch_key
        clone.set_model_attn2_replace(bound, *key)
        if blocks.count(key[:2]) == 1:
            clone.set_model_attn2_replace(bound, *key[:2])
    return clone
