"""No host/device traffic while sampling: FaceStudio's attention replacement, once warm, makes no copy
between devices at any call, whether the host has the token store on the compute device or leaves it
offloaded (low VRAM), with persons that start and end mid-sampling, masks, and unfold_batch.

No GPU here: the compute device is `meta` (shapes only, and a device other than the CPU where the
store and the patch's constants live). A TorchDispatchMode records every copy whose source and
destination devices differ, as a CUDA run would show them as host-to-device / device-to-host copies.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from facestudio_testing.sd15_apply import faceid_adapter_and_person

META = torch.device("meta")
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten._copy_from.default,
          torch.ops.aten._copy_from_and_resize.default}


class CrossDeviceCopies(TorchDispatchMode):
    """Records (op, from devices, to device) of every copy between devices run inside the mode."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in COPIES:
            sources = {a.device for a in args if isinstance(a, torch.Tensor)}
            targets = {o.device for o in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(o, torch.Tensor)}
            if len(sources | targets) > 1:
                self.copies.append((str(func), sorted(map(str, sources)), sorted(map(str, targets))))
        return out


@pytest.fixture(scope="module")
def parts(booted, tiny_sd15_file, tmp_path_factory):
    import comfy.sd

    adapter, person = faceid_adapter_and_person(booted, tmp_path_factory.mktemp("adapters"),
                                                "fs_copies_faceid_sd15.safetensors")
    unet = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_vae=False, output_clip=False)[0]
    return booted.pack_module("attention.patch"), adapter, person, unet


def patched_layers(parts, unfold_batch: bool, masked: bool):
    patch, adapter, person, unet = parts
    mask = None
    if masked:
        mask = torch.zeros(1, 32, 32)
        mask[:, :, :16] = 1.0
    persons = patch.add_person(None, person, start=0.2, end=0.8)  # maskless, acting mid-sampling only
    persons = patch.add_person(persons, person, mask=mask, weight=0.7, start=0.0, end=0.5)
    model = patch.apply_facestudio(unet, adapter, persons, lora_strength=0.0, unfold_batch=unfold_batch)
    return list(model.model_options["transformer_options"]["patches_replace"]["attn2"].values())


def call(layer, sigmas: list[float], batch: int = 2):
    heads = layer.store.groups(layer.index)[0].heads
    width = heads * layer.store.groups(layer.index)[0].keys.shape[-1]
    nq = 16  # the latent 4x4 at this layer
    q = torch.empty(2 * batch, nq, width, device=META)
    k = v = torch.empty(2 * batch, 77, width, device=META)
    extra = {"n_heads": heads, "cond_or_uncond": [0, 1], "original_shape": [2 * batch, 4, 4, 4],
             "sigmas": torch.tensor(sigmas * 2, device=META)}
    return layer(q, k, v, extra)


@pytest.mark.parametrize("unfold_batch, masked", [(False, False), (False, True), (True, True)])
def test_no_copies_between_devices_once_warm_with_the_store_offloaded(parts, unfold_batch, masked):
    """The store stays on the CPU (the host did not load it) and the compute device is another one:
    the first call may copy each layer's K/V and constants up; later calls copy nothing, at any sigma."""
    layers = patched_layers(parts, unfold_batch, masked)
    assert all(p.store.tensors[0].device.type == "cpu" for p in layers)
    on_device = [layer.to(META) for layer in layers]
    for layer in on_device:
        out = call(layer, [3.0, 3.0])
        assert out.device == META and out.shape == (4, 16, layer.store.groups(layer.index)[0].keys.shape[-1]
                                                    * layer.store.groups(layer.index)[0].heads)
    for sigmas in ([3.0, 3.0], [0.5, 0.5], [14.0, 14.0], [3.0, 0.5]):  # steps later in sampling
        with CrossDeviceCopies() as recorded:
            for layer in on_device:
                call(layer, sigmas)
        assert recorded.copies == [], recorded.copies[:5]


def test_no_copies_once_warm_with_the_store_on_the_compute_device(parts):
    """As the host runs it with enough VRAM: the store's tensors on the compute device, read in place."""
    layers = patched_layers(parts, unfold_batch=False, masked=True)
    store = layers[0].store
    replica = store.replica(META)  # what the host's load would leave on the device (see test_host_memory)
    on_device = [layer.to(META) for layer in layers]
    for layer in on_device:
        assert layer.token_groups(layer.store.groups(layer.index)[0].heads)[0].keys.device == META
        call(layer, [3.0, 3.0])
    with CrossDeviceCopies() as recorded:
        for layer in on_device:
            call(layer, [0.5, 0.5])
    assert recorded.copies == [], recorded.copies[:5]
    del replica


def test_the_store_holds_the_only_copy_of_the_kv_and_a_chained_apply_reads_them_back_exactly(parts):
    patch, adapter, person, unet = parts
    first = patch.apply_facestudio(unet, adapter, patch.add_person(None, person, weight=0.8), lora_strength=0.0)
    chained = patch.apply_facestudio(first, adapter, patch.add_person(None, person, weight=0.5), lora_strength=0.0)
    both = patch.apply_facestudio(unet, adapter, patch.add_person(patch.add_person(None, person, weight=0.8),
                                                                   person, weight=0.5), lora_strength=0.0)
    for model in (first, chained, both):
        for layer in model.model_options["transformer_options"]["patches_replace"]["attn2"].values():
            assert all(p.cond is None and p.uncond is None for p in layer.persons)  # nothing kept beside the store
    stores = [m.get_additional_models_with_key(patch.STORE_KEY)[0].model for m in (chained, both)]
    for a, b in zip(*(s.tensors for s in stores), strict=True):
        assert torch.equal(a, b)  # the chain rebuilt the first Apply's K/V bit for bit
