"""PuLID-FLUX Apply: the routed identity cross-attention (flux_routing.py) installed on a FLUX MODEL.

Through the host's own patch points only:
- `patches_replace["dit"][("double_block", i)]` / `("single_block", i)`: FLUX's forward_orig calls these
  with the block's inputs and `{"original_block": ...}`; ours runs the original block (or another
  pack's replacement already there, which it wraps) and adds the routed CA to the image tokens.
- a DIFFUSION_MODEL wrapper (Flux.forward runs them around _forward) that records the latent's size and
  the text length in the call's transformer_options: no host gives the blocks the token grid, and in
  a single block `img` is [txt, img, reference latents]. Hosts before ComfyUI 0.3.52 run no wrapper
  there (Flux.forward was _forward itself): refused (`check_host`). Tested on 0.3.64 and v0.33.

Per Apply each person's K/V (every CA module's to_kv over its ID tokens) are made once. They and the
CA weights the blocks read at every call (norm2, to_q, to_out; norm1/to_kv are done with) are the
parameters of one PuLIDFluxStore that the MODEL carries as an additional model, so the host loads and
offloads it with FLUX (dynamic VRAM included): about 0.5 GB in bf16 for FLUX.1's 20 modules, plus
10 MB per person and CFG side (K/V in fp32).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .flux_routing import CallWeights, active_regions, ca_kv, person_activity, routed_ca
from .pulid_flux_adapter import PuLIDFluxError, PuLIDFluxWeights
from .routing import TokenGroups, masks_to_tokens, stack_masks, token_grid
from .token_store import store_patcher

__all__ = ["FluxPerson", "apply_pulid_flux", "check_host", "PuLIDFluxStore", "PuLIDFluxBlock", "TokenGridRecorder",
           "FluxTokenGrid", "GRID_KEY", "STORE_KEY"]

GRID_KEY = "facestudio_flux_token_grid"  # the transformer_options entry and the wrapper's key
STORE_KEY = "facestudio_pulid_flux"      # additional_models entries: STORE_KEY, STORE_KEY.1, ... per Apply


@dataclass(frozen=True, eq=False)
class FluxPerson:
    """One person for PuLID-FLUX: ID tokens (the IDFormer's output), how strongly, where and when.

    id_tokens: [1, T, 2048] (T = 32). uncond_tokens: the same from the unconditional input, used only
    where the host runs the negative (true CFG, cfg > 1); None when sampling with cfg 1 only.
    mask: [1, h, w] or [h, w] soft in [0, 1], or None for the whole image.
    start, end: the part of sampling it acts in (0..1, as FaceStudio Person's)."""

    id_tokens: torch.Tensor
    uncond_tokens: torch.Tensor | None = None
    weight: float = 1.0
    mask: torch.Tensor | None = None
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class FluxTokenGrid:
    """What the wrapper records per model call: the latent's (h, w), its token grid, the text length."""

    latent_hw: tuple[int, int]
    grid: tuple[int, int]
    text_tokens: int

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class TokenGridRecorder:
    """The DIFFUSION_MODEL wrapper: Flux._forward's arguments, with the call's token grid added to a copy of
    transformer_options (which forward_orig hands every block replacement)."""

    def __call__(self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):
        patch = executor.class_obj.patch_size
        h, w = int(x.shape[-2]), int(x.shape[-1])
        # Flux._forward's grid: pad to the patch size, then one token per patch.
        grid = ((h + patch // 2) // patch, (w + patch // 2) // patch)
        options = {**transformer_options, GRID_KEY: FluxTokenGrid((h, w), grid, int(context.shape[1]))}
        return executor(x, timestep, context, y, guidance, ref_latents, control, options, **kwargs)


# --- the host-managed store ---------------------------------------------------------------------

class _StoredCA(torch.nn.Module):
    """One CA module's per-call weights (file dtype) and the persons' K/V ([1, H, P*T, d] fp32), as parameters."""

    def __init__(self, weights: CallWeights, cond: TokenGroups, uncond: TokenGroups | None):
        super().__init__()
        frozen = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.norm_weight, self.norm_bias = frozen(weights.norm_weight), frozen(weights.norm_bias)
        self.to_q, self.to_out = frozen(weights.to_q), frozen(weights.to_out)
        self.cond_keys, self.cond_values = frozen(cond.keys), frozen(cond.values)
        self.uncond_keys = None if uncond is None else frozen(uncond.keys)
        self.uncond_values = None if uncond is None else frozen(uncond.values)
        self.heads, self.person_weights, self.lengths = weights.heads, cond.weights, cond.lengths


@dataclass(frozen=True, eq=False)
class StoredView:
    """One CA module as a block reads it: its per-call weights and the persons' K/V per CFG side."""

    weights: CallWeights
    cond: TokenGroups
    uncond: TokenGroups | None


class PuLIDFluxStore(torch.nn.Module):
    """Every CA module's per-call weights and K/V of one Apply. Parameters, not buffers: the host's
    ModelPatcher moves and sizes a module's parameters. `view(k)` reads whatever tensors the host put
    there (made again only when they change); `replica`/`on` serve multi-GPU as TokenStore's do."""

    def __init__(self, modules: Sequence[_StoredCA]):
        super().__init__()
        self.ca = torch.nn.ModuleList(modules)
        self._family = [weakref.ref(self)]  # this store, then its replicas; append-only
        self._views: dict = {}

    def view(self, k: int) -> StoredView:
        m = self.ca[k]
        tensors = (m.norm_weight, m.norm_bias, m.to_q, m.to_out, m.cond_keys, m.cond_values, m.uncond_keys,
                   m.uncond_values)
        seen = tuple(None if t is None else (t.device, t.dtype, t.data_ptr()) for t in tensors)
        cached = self._views.get(k)
        if cached is not None and cached[0] == seen:
            return cached[1]
        group = lambda keys, values: TokenGroups(keys.data, values.data, None, m.person_weights, m.lengths,  # noqa: E731
                                                 m.heads)
        view = StoredView(CallWeights(m.norm_weight.data, m.norm_bias.data, m.to_q.data, m.to_out.data, m.heads),
                          group(m.cond_keys, m.cond_values),
                          None if m.uncond_keys is None else group(m.uncond_keys, m.uncond_values))
        self._views[k] = (seen, view)  # one entry per module: a dict store is atomic, worker threads need no lock
        return view

    def replica(self, device: torch.device) -> "PuLIDFluxStore":
        """A copy with its own tensors on `device`, in this store's family."""
        copy = lambda t: None if t is None else t.detach().to(device, copy=True)  # noqa: E731
        twin = PuLIDFluxStore([])
        for m in self.ca:
            group = lambda keys, values: TokenGroups(copy(keys), copy(values), None, m.person_weights,  # noqa: E731
                                                     m.lengths, m.heads)
            twin.ca.append(_StoredCA(
                CallWeights(copy(m.norm_weight), copy(m.norm_bias), copy(m.to_q), copy(m.to_out), m.heads),
                group(m.cond_keys, m.cond_values),
                None if m.uncond_keys is None else group(m.uncond_keys, m.uncond_values)))
        twin._family = self._family
        self._family.append(weakref.ref(twin))
        return twin

    def on(self, device: torch.device) -> "PuLIDFluxStore":
        """The family member the host loaded on `device`, else this one (all hold the same values)."""
        for ref in self._family:
            store = ref()
            if store is not None and len(store.ca) and store.ca[0].to_q.device == device:
                return store
        return self


# --- the block replacement ----------------------------------------------------------------------

class _Persons:
    """The persons' weights, sigma bounds and masks, shared by every block of one Apply; caches their token
    masks per (latent size, batch, device): all blocks of a call share the grid."""

    def __init__(self, weights: torch.Tensor, bounds: torch.Tensor, masks: Sequence[torch.Tensor | None]):
        self.weights, self.bounds, self.masks = weights, bounds, tuple(masks)
        self.every_step = bool((bounds[:, 0] <= 0.0).all() and torch.isinf(bounds[:, 1]).all())
        self._stacked: dict = {}

    def regions(self, grid: FluxTokenGrid, batch: int, device, activity: torch.Tensor | None) -> torch.Tensor:
        key = (grid.latent_hw, batch, device)
        cached = self._stacked.get(key)
        if cached is None:
            if token_grid(grid.latent_hw, 2) != grid.grid:
                raise ValueError(f"FLUX token grid {grid.grid} of a {grid.latent_hw} latent is not its 2x2 patches")
            masks = [None if m is None else masks_to_tokens(m, grid.latent_hw, 2, batch).to(device) for m in self.masks]
            stacked = stack_masks(masks, device)
            cached = self._stacked[key] = (stacked, self.weights.to(device))
        stacked, weights = cached
        return active_regions(stacked, weights, activity)


class PuLIDFluxBlock:
    """The `("double_block", i)` / `("single_block", i)` replacement: the block (or the replacement it wraps),
    then image tokens + sum_i w_hat_i CA_k(id_i, image tokens) with CA module `index`. Immutable: clones of
    the MODEL share it (`__deepcopy__` returns self)."""

    is_facestudio_pulid_flux = True

    def __init__(self, kind: str, index: int, store: PuLIDFluxStore, persons: _Persons,
                 wrapped: Callable | None = None):
        if kind not in ("double", "single"):
            raise ValueError(f"kind must be 'double' or 'single', got {kind!r}")
        self.kind, self.index, self.store, self.persons, self.wrapped = kind, index, store, persons, wrapped

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def to(self, *args, **kwargs) -> "PuLIDFluxBlock":
        # The host calls .to on every patches_replace entry; the store is the host's to move, so only a
        # wrapped replacement's own .to matters.
        to = getattr(self.wrapped, "to", None)
        wrapped = to(*args, **kwargs) if callable(to) else self.wrapped
        return self if wrapped is self.wrapped else PuLIDFluxBlock(self.kind, self.index, self.store, self.persons,
                                                                   wrapped)

    def __call__(self, args: dict, extra: dict) -> dict:
        out = self.wrapped(args, extra) if self.wrapped is not None else extra["original_block"](args)
        options = args.get("transformer_options") or {}
        grid = options.get(GRID_KEY)
        if grid is None:
            raise RuntimeError("FaceStudio PuLID-FLUX: this FLUX call has no token grid: the model was called without "
                               "its DIFFUSION_MODEL wrappers (apply_pulid_flux adds one). Sample the MODEL through "
                               "the host's samplers.")
        img = out["img"]
        start = 0
        if self.kind == "single":  # [txt, img, reference latents]; v0.33 says where the text ends
            start = int(options["img_slice"][0]) if "img_slice" in options else grid.text_tokens
        end = start + grid.image_tokens
        if img.shape[1] < end:
            raise RuntimeError(f"FaceStudio PuLID-FLUX: a {self.kind} block has {img.shape[1]} tokens, fewer than the "
                               f"{end} its latent {grid.latent_hw} and text give: another patch changed the sequence.")
        chunks = list(options.get("cond_or_uncond") or [0])
        batch = img.shape[0] // len(chunks)
        persons = self.persons
        activity = None if persons.every_step else person_activity(options.get("sigmas"), persons.bounds, batch)
        if activity is not None and activity.device.type == "cpu" and not bool(activity.any()):
            return out
        view = self.store.on(img.device).view(self.index)
        if 1 in chunks and view.uncond is None:
            raise PuLIDFluxError("FaceStudio PuLID-FLUX: this sampler also runs FLUX on the negative prompt (true CFG, "
                                 "cfg > 1), which needs every person's unconditional ID tokens, and a person has none. "
                                 "Give each FluxPerson its uncond_tokens, or sample with cfg 1 (FLUX's guidance).")
        groups = [view.uncond if c == 1 else view.cond for c in chunks]
        regions = persons.regions(grid, batch, img.device, activity)
        x = img[:, start:end]
        x = x + routed_ca(x, view.weights, groups, regions)
        img = x if start == 0 and end == img.shape[1] else torch.slice_scatter(img, x, 1, start, end)
        return {**out, "img": img}


# --- Apply ----------------------------------------------------------------------------------------

def check_host() -> None:
    """PuLIDFluxError on hosts whose FLUX model runs no DIFFUSION_MODEL wrappers (before ComfyUI 0.3.52)."""
    import comfy.ldm.flux.model

    if not hasattr(comfy.ldm.flux.model.Flux, "_forward"):
        raise PuLIDFluxError("PuLID-FLUX needs ComfyUI 0.3.64 or newer: this host's FLUX model runs no "
                             "DIFFUSION_MODEL wrappers, through which FaceStudio learns the latent's size at each "
                             "step. Update ComfyUI.")


def _flux_model(model, weights: PuLIDFluxWeights):
    import comfy.ldm.flux.model

    diffusion = getattr(getattr(model, "model", None), "diffusion_model", None)
    config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) if diffusion is not None else {}
    image_model = config.get("image_model")
    if not isinstance(diffusion, comfy.ldm.flux.model.Flux) or image_model not in (None, "flux"):
        what = f"a {image_model} model" if image_model else f"a {type(diffusion).__name__} model"
        if image_model == "flux2":
            what = "FLUX.2"
        raise PuLIDFluxError(f"{weights.source} is PuLID for FLUX.1 (dev or schnell), but the MODEL is {what}: connect "
                             "a FLUX.1 model (UNETLoader / Load Diffusion Model).")
    params = diffusion.params
    layout = weights.layout
    expected = layout.modules_for(params.depth, params.depth_single_blocks)
    if params.hidden_size != layout.dim or expected != layout.modules or getattr(params, "global_modulation", False):
        raise PuLIDFluxError(f"{weights.source} has {layout.modules} identity cross-attentions {layout.dim} wide (the "
                             f"public PuLID-FLUX files: 20 at 3072, for FLUX.1's 19 double and 38 single blocks); this "
                             f"FLUX model is {params.hidden_size} wide with {params.depth} double and "
                             f"{params.depth_single_blocks} single blocks, which take {expected} at {params.hidden_size}. "
                             "Connect FLUX.1 dev (or schnell).")
    return diffusion


def _check_person(p: FluxPerson, n: int, id_dim: int) -> None:
    for name in ("id_tokens", "uncond_tokens"):
        t = getattr(p, name)
        if t is None and name == "uncond_tokens":
            continue
        if not torch.is_tensor(t) or t.ndim != 3 or t.shape[0] != 1 or t.shape[2] != id_dim or t.shape[1] < 1:
            raise ValueError(f"person {n}: {name} must be [1, T, {id_dim}] (the ID encoder's tokens), got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if p.uncond_tokens is not None and p.uncond_tokens.shape != p.id_tokens.shape:
        raise ValueError(f"person {n}: uncond_tokens {tuple(p.uncond_tokens.shape)} must match id_tokens "
                         f"{tuple(p.id_tokens.shape)}")
    if not 0.0 <= p.start <= p.end <= 1.0:
        raise ValueError(f"person {n}: start and end must satisfy 0 <= start <= end <= 1, got {p.start}, {p.end}")
    if p.mask is not None and (p.mask.ndim not in (2, 3) or (p.mask.ndim == 3 and p.mask.shape[0] != 1)):
        raise ValueError(f"person {n}: mask must be [1, h, w] or [h, w], got {tuple(p.mask.shape)}")


def _sigma_bounds(model, persons: Sequence[FluxPerson]) -> torch.Tensor:
    sampling = model.get_model_object("model_sampling")
    # start 0 is "from the first step" whatever the schedule's first sigma (percent_to_sigma(0) is its max).
    rows = [[float(sampling.percent_to_sigma(p.end)) if p.end < 1.0 else 0.0,
             math.inf if p.start <= 0.0 else float(sampling.percent_to_sigma(p.start))] for p in persons]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 2)


def block_modules(double_blocks: int, single_blocks: int, double_interval: int = 2,
                  single_interval: int = 4) -> list[tuple[str, int, int]]:
    """(kind, block index, CA module index) in the reference's order: the double blocks' CAs, then the singles'."""
    out = [("double", i, i // double_interval) for i in range(0, double_blocks, double_interval)]
    first = len(out)
    out += [("single", i, first + i // single_interval) for i in range(0, single_blocks, single_interval)]
    return out


def apply_pulid_flux(model, ca_weights: PuLIDFluxWeights, persons: Sequence[FluxPerson]):
    """A clone of the FLUX `model` with the persons' routed PuLID-FLUX identity attention after every double
    block 2k and single block 4k. Another pack's replacement on a block (or an earlier Apply's) is wrapped."""
    import comfy.patcher_extension

    check_host()
    diffusion = _flux_model(model, ca_weights)
    if not persons:
        raise ValueError("No persons: give at least one FluxPerson.")
    layout = ca_weights.layout
    for n, p in enumerate(persons):
        _check_person(p, n, layout.id_dim)
    with_uncond = all(p.uncond_tokens is not None for p in persons)
    person_weights = [float(p.weight) for p in persons]

    modules = []
    for ca in ca_weights.ca:
        sides = []
        for side in ("id_tokens", "uncond_tokens") if with_uncond else ("id_tokens",):
            kvs = [ca_kv(ca["norm1.weight"], ca["norm1.bias"], ca["to_kv.weight"], getattr(p, side)) for p in persons]
            sides.append(TokenGroups.build([(k, v, w) for (k, v), w in zip(kvs, person_weights)], layout.heads))
        call = CallWeights(ca["norm2.weight"], ca["norm2.bias"], ca["to_q.weight"], ca["to_out.weight"], layout.heads)
        modules.append(_StoredCA(call, sides[0], sides[1] if with_uncond else None))
    store = PuLIDFluxStore(modules)
    shared = _Persons(torch.tensor(person_weights), _sigma_bounds(model, persons),
                      [None if p.mask is None else p.mask.detach().float().cpu().reshape(1, *p.mask.shape[-2:])
                       for p in persons])

    clone = model.clone()
    existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for kind, i, k in block_modules(diffusion.params.depth, diffusion.params.depth_single_blocks,
                                    layout.double_interval, layout.single_interval):
        block_name = f"{kind}_block"
        clone.set_model_patch_replace(PuLIDFluxBlock(kind, k, store, shared, existing.get((block_name, i))),
                                      "dit", block_name, i)
    diffusion_model = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    if not clone.get_wrappers(diffusion_model, GRID_KEY):
        clone.add_wrapper_with_key(diffusion_model, GRID_KEY, TokenGridRecorder())
    # One store per Apply: a chained Apply's blocks wrap the earlier ones, whose store must stay managed too.
    key, n = STORE_KEY, 1
    while key in clone.additional_models:
        key, n = f"{STORE_KEY}.{n}", n + 1
    clone.set_additional_models(key, [store_patcher(store, model.load_device, model.offload_device)])
    return clone
