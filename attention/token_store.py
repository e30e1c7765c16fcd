"""The token K/V of one Apply as a model the host manages: the TokenStore module and its patcher.

The MODEL carries the store as an additional model, so the host loads it to the compute device with
the UNet (counted in its memory budget) and offloads it with it. Its patcher must be the kind the
host makes its own models with: with dynamic VRAM (ComfyUI 0.33+ on NVIDIA, main.py rebinds
comfy.model_patcher.CoreModelPatcher to ModelPatcherDynamic), one non-dynamic patcher in a load makes
load_models_gpu free memory the old way, really unloading every other resident model.

Multi-GPU: the host deep-clones every additional model once per extra device through its
`cached_patcher_init` factory; ours makes a replica (same values, own tensors) in the store's
family, and `TokenStore.on(device)` finds the family member the host put on a device.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from .routing import TokenGroups


@dataclass(frozen=True)
class _StoredSide:
    """Where one TokenGroups (a layer's cond or uncond side) sits in the store's tensor list, and its
    small non-tensor fields: `tensors[first]` keys, `[first + 1]` values, `[first + 2]` the pad bias."""

    first: int
    padded: bool
    weights: torch.Tensor
    lengths: tuple[int, ...]
    heads: int
    style_scale: float | None

    @property
    def count(self) -> int:
        return 3 if self.padded else 2


class TokenStore(torch.nn.Module):
    """Every layer's (cond, uncond) TokenGroups tensors of one Apply, as frozen parameters.

    Parameters, not buffers: the host's ModelPatcher moves and sizes a module's parameters.
    `groups(n)` gives TokenGroups views of whatever tensors the host put there, made again only when
    those tensors change: a TokenGroups keeps its copies for the compute device (`TokenGroups.to`), so
    while the host leaves the store offloaded (low VRAM) each layer's K/V still goes up once, not at
    every call. The store is the only holder of the K/V once the patches are bound to it.
    """

    def __init__(self, layers: Sequence[tuple[TokenGroups, TokenGroups]]):
        super().__init__()
        self.tensors = torch.nn.ParameterList()
        self._layout: list[tuple[_StoredSide, ...]] = []  # per layer: its (cond, uncond) sides
        for pair in layers:
            entry = []
            for g in pair:
                entry.append(_StoredSide(len(self.tensors), g.pad_bias is not None, g.weights, g.lengths, g.heads,
                                         g.style_scale))
                for t in (g.keys, g.values) + (() if g.pad_bias is None else (g.pad_bias,)):
                    self.tensors.append(torch.nn.Parameter(t, requires_grad=False))
            self._layout.append(tuple(entry))
        # This store, then its replicas (the same values); append-only, so worker threads read it unlocked.
        self._family = [weakref.ref(self)]
        self._views: dict = {}  # layer -> (what its tensors were, its TokenGroups pair)

    def groups(self, n: int) -> tuple[TokenGroups, TokenGroups]:
        tensors = [[self.tensors[side.first + i].data for i in range(side.count)] for side in self._layout[n]]
        seen = tuple((t.device, t.dtype, t.data_ptr()) for pair in tensors for t in pair)
        cached = self._views.get(n)
        if cached is not None and cached[0] == seen:
            return cached[1]
        out = tuple(TokenGroups(ts[0], ts[1], ts[2] if side.padded else None, side.weights, side.lengths, side.heads,
                                side.style_scale)
                    for ts, side in zip(tensors, self._layout[n]))
        self._views[n] = (seen, out)  # one entry per layer: copies made for an older placement go with it
        return out

    def replica(self, device: torch.device) -> "TokenStore":
        """A copy with its own tensors on `device`, in this store's family."""
        twin = TokenStore(())
        twin.tensors.extend(torch.nn.Parameter(t.detach().to(device, copy=True), requires_grad=False)
                            for t in self.tensors)
        twin._layout, twin._family = self._layout, self._family
        self._family.append(weakref.ref(twin))
        return twin

    def on(self, device: torch.device) -> "TokenStore":
        """The family member whose tensors are on `device` (where the host loaded it), else this one:
        all hold the same values, so the choice only saves copies between devices."""
        for ref in self._family:
            store = ref()
            if store is not None and len(store.tensors) and store.tensors[0].device == device:
                return store
        return self


def store_patcher(store: TokenStore, load_device, offload_device, disable_dynamic: bool = False):
    """The store's patcher, of the class the host makes its own models with (host_patcher_class)."""
    patcher = host_patcher_class(disable_dynamic)(store, load_device=load_device, offload_device=offload_device)
    # What deepclone_multigpu and clone(disable_dynamic=True) rebuild the patcher from (they raise without).
    patcher.cached_patcher_init = (_replica_patcher, (store, load_device, offload_device))
    return patcher


def host_patcher_class(disable_dynamic: bool = False):
    """The ModelPatcher class the host makes its own models with: CoreModelPatcher, which main.py rebinds
    to ModelPatcherDynamic under dynamic VRAM (looked up per call: the rebinding happens at start-up;
    hosts before 0.33 have no CoreModelPatcher)."""
    import comfy.model_patcher

    cls = comfy.model_patcher.ModelPatcher
    return cls if disable_dynamic else getattr(comfy.model_patcher, "CoreModelPatcher", cls)


def _replica_patcher(store: TokenStore, load_device, offload_device, disable_dynamic: bool = False):
    return store_patcher(store.replica(offload_device), load_device, offload_device, disable_dynamic)
