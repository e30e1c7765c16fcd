"""FaceID's companion LoRA on the MODEL: the attention LoRA each FaceID adapter was trained with.

The FaceID releases train a LoRA on every attention processor's q/k/v/out together with the adapter
(in the adapter's `ip_adapter` section: '<m>.to_q_lora.down.weight' ..., m = 2n for position n's
self-attention, 2n + 1 for its cross-attention) and ship the same weights as
'<adapter>_lora.safetensors' for LoRA loaders. We take them from the adapter file when it has them,
else from that paired file in models/loras, and hand them to the host's own LoRA code under its key
names, so the patches are ordinary host LoRA patches that combine with any other LoRA.
FaceID, FaceID Plus and Plus v2 get it (Apply's lora_strength, 1.0 as in the reference); when it is
in neither place the adapter runs without it and Apply reports where it looked. Portrait has none.
"""
from __future__ import annotations

import os

import torch

from .adapters import AdapterError, AdapterKind, IPAdapterWeights
from .layers import AttentionPosition
from ..startup.model_sources import paired_lora_file

# (the adapter's name, the host module's name) of each projection the LoRA changes.
LORA_PROJECTIONS = (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0"))
# The kinds trained with the LoRA (the reference applies it at lora_scale 1.0); Portrait has none by design.
LORA_KINDS = frozenset({AdapterKind.FACEID, AdapterKind.FACEID_PLUS, AdapterKind.FACEID_PLUS_V2})
# model_options entry naming the FaceID LoRAs an Apply already put on the MODEL ({key: strength}).
APPLIED_LORAS = "facestudio_loras"


def paired_lora_name(adapter: IPAdapterWeights) -> str:
    """The release name of the adapter's LoRA file: 'ip-adapter-faceid_sd15.bin' -> '..._sd15_lora.safetensors'."""
    return paired_lora_file(adapter.source)


def embedded_lora_state_dict(adapter: IPAdapterWeights,
                             positions: tuple[AttentionPosition, ...]) -> dict[str, torch.Tensor]:
    """The adapter file's LoRA under the host's 'lora_unet_<module path>' names ({} when it has none)."""
    if not adapter.lora:
        return {}
    state = {}
    for n, position in enumerate(positions):
        block = position.module_path.rsplit(".", 1)[0]  # "...transformer_blocks.<t>"
        for index, attn in ((2 * n, "attn1"), (2 * n + 1, "attn2")):
            for ours, host in LORA_PROJECTIONS:
                name = "lora_unet_" + f"{block}.{attn}.{host}".replace(".", "_")
                for part in ("down", "up"):
                    key = f"{index}.{ours}_lora.{part}.weight"
                    if key not in adapter.lora:
                        raise AdapterError(f"{adapter.source}: its LoRA has no '{key}' (layer {index} of "
                                           f"{2 * len(positions)}); the file is incomplete. Set lora_strength to 0, "
                                           f"or put the paired '{paired_lora_name(adapter)}' in models/loras.")
                    state[f"{name}.lora_{part}.weight"] = adapter.lora[key]
    return state


def find_paired_lora(adapter: IPAdapterWeights) -> str | None:
    """The full path of the adapter's paired LoRA file in the host's loras folders, or None."""
    import folder_paths

    wanted = paired_lora_name(adapter)
    for name in folder_paths.get_filename_list("loras"):
        if os.path.basename(name) == wanted:
            return folder_paths.get_full_path("loras", name)
    return None


def lora_patches(model, state_dict: dict[str, torch.Tensor], source: str) -> dict:
    """The host's LoRA patches for `state_dict` on `model`; AdapterError when any key or shape does not fit."""
    import comfy.lora
    import comfy.utils

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(state_dict, key_map, log_missing=False)
    modules = {k.rsplit(".lora_", 1)[0] for k in state_dict if ".lora_" in k}
    unmatched = sorted(m for m in modules if m not in key_map)
    if unmatched or len(patches) != len(modules):
        raise AdapterError(f"{source} does not fit this model: {len(unmatched) or len(modules) - len(patches)} of its "
                           f"{len(modules)} LoRA modules have no layer here (e.g. {(unmatched or ['?'])[0]}). Use the "
                           "LoRA made for this adapter and model base.")
    for module in modules:
        target = key_map[module]
        weight = comfy.utils.get_attr(model.model, target)
        up, down = state_dict[f"{module}.lora_up.weight"], state_dict[f"{module}.lora_down.weight"]
        if (up.shape[0], down.shape[-1]) != tuple(weight.shape[:2]) or up.shape[1] != down.shape[0]:
            raise AdapterError(f"{source}: its LoRA for {target} is {up.shape[0]}x{down.shape[-1]} (rank "
                               f"{down.shape[0]}) but the layer is {tuple(weight.shape)}: the LoRA was made for "
                               "another model.")
    return patches


def faceid_lora(model, adapter: IPAdapterWeights,
                positions: tuple[AttentionPosition, ...]) -> tuple[dict | None, str]:
    """(the host's patches, where they came from) for the adapter's LoRA: its own weights, else the paired
    file. (None, a report saying where we looked) when neither exists: the adapter then runs without it."""
    state = embedded_lora_state_dict(adapter, positions)
    source = f"the LoRA inside {adapter.source}"
    if not state:
        path = find_paired_lora(adapter)
        if path is None:
            return None, missing_lora_report(adapter)
        import comfy.utils

        state, source = comfy.utils.load_torch_file(path, safe_load=True), os.path.basename(path)
    return lora_patches(model, state, source), source


def missing_lora_report(adapter: IPAdapterWeights) -> str:
    """What FaceStudio Apply reports when a FaceID adapter's LoRA is nowhere to be found."""
    import folder_paths

    folders = ", ".join(folder_paths.get_folder_paths("loras")) or "(no loras folder configured)"
    return (f"FaceID LoRA not applied: {adapter.source} ({adapter.kind.label}) has no LoRA weights (no "
            f"'<n>.to_q_lora.down.weight' keys in its ip_adapter section) and '{paired_lora_name(adapter)}' is not "
            f"in the loras folders ({folders}). The adapter works without it, but the likeness is weaker: put the "
            "LoRA released with this adapter there under that name, or set lora_strength to 0 if you load it with "
            "a LoRA loader yourself.")


def applied_lora_key(adapter: IPAdapterWeights) -> str:
    """Which LoRA an Apply put on a MODEL (its release name, the same for the .bin and its conversions), so
    a chained Apply with the same adapter does not add it a second time."""
    return paired_lora_name(adapter)
