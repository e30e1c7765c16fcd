"""FaceStudio Apply and the host's model management: the token store's patcher under dynamic VRAM, and
multi-GPU (deep clones of the store, the replacement's `.to(device)` in every worker thread).

No GPU here: the stand-ins of facestudio_testing/host_devices.py (GPU_LIKE, DynamicPatcher).
"""
from __future__ import annotations

import collections
import inspect
import threading

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
from facestudio_testing.host_devices import CPU, GPU_LIKE, DynamicPatcher
from facestudio_testing.sd15_apply import faceid_adapter_and_person

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

needs_dynamic_vram = pytest.mark.skipif(
    "for_dynamic" not in inspect.signature(comfy.model_management.free_memory).parameters,
    reason="this host has no dynamic VRAM")
needs_multigpu = pytest.mark.skipif(not hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"),
                                    reason="this host has no multi-GPU sampling")


@pytest.fixture(scope="module")
def parts(booted, tiny_sd15_file, tmp_path_factory):
    adapter, person = faceid_adapter_and_person(booted, tmp_path_factory.mktemp("adapters"),
                                                "fs_memory_faceid_sd15.safetensors")
    return booted.pack_module("attention.patch"), adapter, person, tiny_sd15_file


@pytest.fixture
def unload_gpu_like():
    yield
    comfy.model_management.free_memory(1e30, GPU_LIKE)  # nothing of these tests stays resident


def load_unet(path):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]


def dynamic_unet(path, monkeypatch):
    """The UNet as a dynamic VRAM host makes it, on GPU_LIKE, with CoreModelPatcher rebound as main.py does.
    Loaded first: a dynamic loader assigns the file's fp16 weights for ModelPatcherDynamic to cast per op."""
    unet = load_unet(path)
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", DynamicPatcher)
    return DynamicPatcher(unet.model, load_device=GPU_LIKE, offload_device=unet.offload_device)


def apply(parts, model):
    patch, adapter, person, _ = parts
    return patch.apply_facestudio(model, adapter, patch.add_person(None, person))


def store_of(parts, model):
    (holder,) = model.get_additional_models_with_key(parts[0].STORE_KEY)
    return holder


def sample(model, seed=0):
    import comfy.sample

    gen = torch.Generator().manual_seed(seed)
    positive, negative = ([[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(2))
    return comfy.sample.sample(model, torch.randn(1, 4, 8, 8, generator=gen), 2, 5.0, "euler", "normal", positive,
                               negative, torch.zeros(1, 4, 8, 8), disable_pbar=True)


def spy(monkeypatch, module, name, record):
    """Wraps module.name to record(arguments bound to its signature), then calls the original."""
    real = getattr(module, name)
    signature = inspect.signature(real)

    def spied(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        record(bound.arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spied)


def attention_inputs(width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, n, width, generator=gen) for n in (16, 77, 77))  # q, k, v


# ---- dynamic VRAM ----


@needs_dynamic_vram
@pytest.mark.parametrize("store_patcher, for_dynamic", [("FaceStudio's", True), ("a plain ModelPatcher", False)])
def test_a_facestudio_load_frees_memory_the_dynamic_way(parts, monkeypatch, unload_gpu_like, store_patcher,
                                                         for_dynamic):
    """One non-dynamic patcher among the models of a load makes load_models_gpu free memory the old way
    (for_dynamic=False: really unloading every other resident model). The plain ModelPatcher case is the
    store's patcher before it followed the host's CoreModelPatcher."""
    patched = apply(parts, dynamic_unet(parts[3], monkeypatch))
    holder = store_of(parts, patched)
    if store_patcher != "FaceStudio's":
        patched.set_additional_models(parts[0].STORE_KEY, [comfy.model_patcher.ModelPatcher(
            holder.model, load_device=holder.load_device, offload_device=holder.offload_device)])
    frees = []
    spy(monkeypatch, comfy.model_management, "free_memory",
        lambda a: frees.append(a["for_dynamic"]) if a["device"] == GPU_LIKE else None)
    sample(patched)
    assert frees and set(frees) == {for_dynamic}
    holder = store_of(parts, patched)
    assert holder.load_device == GPU_LIKE and (type(holder) is DynamicPatcher) == for_dynamic


@needs_dynamic_vram
def test_the_store_loads_and_offloads_with_the_unet(parts, monkeypatch, unload_gpu_like):
    patched = apply(parts, dynamic_unet(parts[3], monkeypatch))
    holder = store_of(parts, patched)
    store = holder.model
    loads, while_sampling = [], []
    spy(monkeypatch, comfy.model_management, "load_models_gpu", lambda a: loads.append(list(a["models"])))
    real_groups = store.groups

    def groups(n):
        # Where the host says the store is while the replacements read it.
        while_sampling.append((store.device, holder.loaded_size(), holder in comfy.model_management.loaded_models()))
        return real_groups(n)

    monkeypatch.setattr(store, "groups", groups)
    sample(patched)
    assert any(patched in models and holder in models for models in loads)  # one load with the UNet
    assert while_sampling and set(while_sampling) == {(GPU_LIKE, holder.model_size(), True)}
    comfy.model_management.free_memory(1e30, GPU_LIKE)  # making room on the device unloads both
    assert holder.loaded_size() == 0 and store.device == holder.offload_device
    assert not {patched, holder} & set(comfy.model_management.loaded_models())


# ---- multi-GPU ----


@needs_multigpu
def test_the_store_patcher_deep_clones_to_a_replica_that_attends_the_same(parts, monkeypatch, unload_gpu_like):
    patch = parts[0]
    unet = load_unet(parts[3])
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", DynamicPatcher)
    patched = apply(parts, unet)
    holder = store_of(parts, patched)
    clone = holder.deepclone_multigpu(new_load_device=GPU_LIKE)  # what the multi-GPU node does per device
    delegate = holder.clone(disable_dynamic=True)  # a dynamic patcher's non-dynamic delegate
    assert type(clone) is DynamicPatcher and clone.load_device == GPU_LIKE
    assert type(delegate) is comfy.model_patcher.ModelPatcher
    for replica in (clone.model, delegate.model):
        assert isinstance(replica, patch.TokenStore) and replica is not holder.model
        for mine, theirs in zip(holder.model.parameters(), replica.parameters(), strict=True):
            assert torch.equal(mine, theirs) and mine.data_ptr() != theirs.data_ptr()
    assert clone.deepclone_multigpu(new_load_device=GPU_LIKE).model is not clone.model  # again, from a clone

    # A replica the host loaded on another device ("meta" here) is what that device's replacement reads.
    clone.model.to("meta")
    for layer in list(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values())[:4]:
        mine = holder.model.groups(layer.index)[0]
        assert layer.to(torch.device("meta")).token_groups(mine.heads)[0].keys.device.type == "meta"
        assert layer.to(CPU).token_groups(mine.heads)[0].keys.data_ptr() == mine.keys.data_ptr()
        q, k, v = attention_inputs(mine.heads * mine.keys.shape[-1])
        extra = {"n_heads": mine.heads, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([5.0, 5.0]),
                 "original_shape": [2, 4, 4, 4]}
        expected = layer(q, k, v, extra)
        for twin in (layer.to(CPU), layer.to(torch.float16), layer.to(CPU).to(torch.float16), layer.to(GPU_LIKE),
                     layer.bound_to(delegate.model, layer.index)):
            assert torch.equal(twin(q, k, v, extra), expected)


@needs_multigpu
def test_to_gives_one_instance_per_device_ignores_dtypes_and_forwards_to_a_wrapped_replacement(parts):
    import comfy.samplers

    patched = apply(parts, load_unet(parts[3]))
    replacements = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    layer = next(iter(replacements.values()))
    on_cpu = layer.to(CPU)
    assert on_cpu is layer.to(CPU) is on_cpu.to(CPU) is layer.to("cpu") is layer.to(GPU_LIKE).to(CPU)
    assert layer.to(torch.float16) is layer and on_cpu.to(torch.float16) is on_cpu
    assert layer.to(GPU_LIKE) is not on_cpu and on_cpu.store is layer.store and on_cpu.index == layer.index

    # What samplers.py does to each batch's options in every worker thread.
    options = {"patches_replace": {"attn2": dict(replacements)}}
    comfy.samplers.cast_transformer_options(options, device=GPU_LIKE, dtype=torch.float16)
    assert options["patches_replace"]["attn2"] == {key: r.to(GPU_LIKE) for key, r in replacements.items()}

    class Foreign:
        """A wrapped replacement with its own per-device copies (as cubiq's Attn2Replace keeps)."""

        def __init__(self, device=None):
            self.device, self.casts, self.copies = device, [], {}

        def to(self, target):
            self.casts.append(target)
            if not isinstance(target, torch.device):
                return self
            return self.copies.setdefault(target, Foreign(target))

        def __call__(self, q, k, v, extra):
            return torch.zeros_like(q)

    foreign = Foreign()
    ours = layer.wrapping(foreign)
    moved = ours.to(GPU_LIKE)
    assert moved.wrapped.device == GPU_LIKE and foreign.casts == [GPU_LIKE] and ours.to(GPU_LIKE) is moved
    assert ours.to(torch.float16) is ours and foreign.casts[-1] is torch.float16
    assert moved.to(CPU).wrapped is moved.wrapped.copies[CPU]


@needs_multigpu
@pytest.mark.parametrize("order", ["apply, then multi-GPU", "multi-GPU, then apply"])
def test_multigpu_sampling_matches_one_device(parts, monkeypatch, unload_gpu_like, order):
    import comfy.multigpu

    patch = parts[0]
    unet = load_unet(parts[3])
    one = sample(apply(parts, unet))
    assert (one - sample(unet)).abs().max() > 1.0  # FaceStudio acts

    monkeypatch.setattr(comfy.model_management, "get_all_torch_devices",
                        lambda exclude_current=False: [CPU, GPU_LIKE])
    if order == "apply, then multi-GPU":
        many = comfy.multigpu.create_multigpu_deepclones(apply(parts, unet), max_gpus=2)
    else:
        many = apply(parts, comfy.multigpu.create_multigpu_deepclones(unet, max_gpus=2))
    calls = []
    real_call = patch.FaceStudioAttention.__call__

    def call(self, *args):
        calls.append((threading.current_thread(), self))
        return real_call(self, *args)

    monkeypatch.setattr(patch.FaceStudioAttention, "__call__", call)
    # Not bit-equal: split, each device runs batches of 1 where one device runs cond and uncond as a
    # batch of 2 (the plain UNet differs by about 3e-3 so; FaceStudio's effect is about 1e2).
    torch.testing.assert_close(sample(many), one, atol=1e-2, rtol=1e-3)
    (clone,) = many.get_additional_models_with_key("multigpu")
    assert clone.load_device == GPU_LIKE
    replica = store_of(parts, clone)
    assert replica.model is not store_of(parts, many).model and replica.load_device == GPU_LIKE
    # Each device's worker thread called its own instances: no shared region caches between threads.
    devices = collections.defaultdict(set)
    for thread, instance in calls:
        devices[instance.device].add(thread)
    assert set(devices) == {CPU, GPU_LIKE} and not devices[CPU] & devices[GPU_LIKE]
    assert threading.main_thread() not in devices[CPU] | devices[GPU_LIKE]
