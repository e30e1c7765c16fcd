"""The attn2 replacement FaceStudio installs at every cross-attention position: FaceStudioAttention.

At each call it computes A_text with the host's attention (or a foreign replacement it wraps), decides
on the compute device which persons act at each row's sigma, and calls `routing.route_chunks` with the
layer's tokens, which it reads from the Apply's TokenStore (attention/token_store.py). The objects are
immutable, so ModelPatcher.clone() shares them (`__deepcopy__` returns self); the host's `.to(device)`
picks one instance per device (multi-GPU worker threads). attention/patch.py builds and installs them.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .routing import (TokenGroups, combine_regions, find_downscale, masks_to_tokens, route_chunks, stack_masks,
                      text_gain)
from .token_store import TokenStore

KV = tuple[torch.Tensor, torch.Tensor]


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


def layer_token_groups(persons: Sequence[PersonLayer], style: StyleLayer | None, heads: int) -> tuple[TokenGroups, ...]:
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

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


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
            groups = self._groups[heads] = layer_token_groups(*self.layers(), heads)
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
            stacked = stack_masks(masks, device)
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
