"""A trained FaceStudio adapter as a file, and back: IP-Adapter's key layout plus FaceStudio's header.

`image_proj.<key>` holds the fusion (attention/facestudio_fusion.py: image_in, text_in, path_norm,
face_norm, fusion, norm), `ip_adapter.<2n+1>.to_k_ip.weight` / `.to_v_ip.weight` cross-attention
position n's decoupled K/V, as every IP-Adapter file numbers them; the header is
attention/facestudio_metadata.py's. FaceStudio Load Adapter recognises the file by its fusion keys
(attention/adapters.py), so a saved adapter is loaded like any other. Written whole or not at all.
"""
from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch

from ..attention.adapters import AdapterError, AdapterKind, IPAdapterWeights, recognise, split_sections
from ..attention.facestudio_metadata import FaceStudioMetadata
from ..attention.layers import cross_attention_positions, map_adapter_layers
from ..attention.facestudio_fusion import FaceStudioFusion
from .trainable_adapter import TrainableAdapter

__all__ = ["adapter_tensors", "save_adapter", "save_weights", "adapter_weights", "trainable_from_weights"]


def adapter_tensors(adapter: TrainableAdapter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The flat state dict of the file (contiguous CPU copies in `dtype`)."""
    out = {f"image_proj.{k}": v.detach().to("cpu", dtype).contiguous().clone()
           for k, v in adapter.fusion.state_dict().items()}
    for n in range(len(adapter.positions)):
        out[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = adapter.to_k_ip[n].weight.detach().to("cpu", dtype).contiguous().clone()
        out[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = adapter.to_v_ip[n].weight.detach().to("cpu", dtype).contiguous().clone()
    return out


def adapter_weights(adapter: TrainableAdapter, metadata: FaceStudioMetadata, source: str) -> IPAdapterWeights:
    """The adapter as Load Adapter would read it back from its file: FaceStudio Apply takes it directly."""
    image_proj, ip_adapter = split_sections(adapter_tensors(adapter), source)
    return recognise(image_proj, ip_adapter, source, AdapterKind.FACESTUDIO.value, metadata.to_header())


def save_adapter(adapter: TrainableAdapter, metadata: FaceStudioMetadata, path: str | os.PathLike,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Writes the adapter to `path` (.safetensors) through a temporary file in the same folder, so a
    reader never sees half a file and a failed write leaves the old one in place."""
    return _write(adapter_tensors(adapter, dtype), metadata.to_header(), Path(path))


def _write(tensors: dict[str, torch.Tensor], header: dict[str, str], path: Path) -> Path:
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: a FaceStudio adapter is saved as .safetensors (its header holds the metadata).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def trainable_from_weights(weights: IPAdapterWeights, model) -> TrainableAdapter:
    """A TrainableAdapter holding a saved adapter's weights (fp32), for `model`, to train further:
    AdapterError when the file is not a FaceStudio adapter or was made for another UNet."""
    if weights.kind is not AdapterKind.FACESTUDIO:
        raise AdapterError(f"{weights.source} is {weights.kind.label}; only a FaceStudio adapter can be trained further.")
    positions = cross_attention_positions(model)
    map_adapter_layers(weights, positions)  # says which model it fits when it does not fit this one
    sd = weights.image_proj
    fusion = FaceStudioFusion(weights.clip_width, weights.text_width, weights.context_dim, weights.num_tokens,
                              sd["image_in.weight"].shape[0], weights.id_embedding_width)
    fusion.load_state_dict({k: v.float() for k, v in sd.items()})
    adapter = TrainableAdapter(fusion, positions)
    with torch.no_grad():
        for n, (k, v) in enumerate(weights.layers):
            adapter.to_k_ip[n].weight.copy_(k.float())
            adapter.to_v_ip[n].weight.copy_(v.float())
    return adapter


def save_weights(weights: IPAdapterWeights, path: str | os.PathLike) -> Path:
    """Writes a loaded FaceStudio adapter (from Train Adapter or Load Adapter) to `path`, as save_adapter
    would have written it: its tensors as they are, its header as recorded."""
    if weights.kind is not AdapterKind.FACESTUDIO or weights.facestudio is None:
        raise AdapterError(f"{weights.source} is {weights.kind.label}: FaceStudio saves only the adapters it trained.")
    tensors = {f"image_proj.{k}": v.contiguous() for k, v in weights.image_proj.items()}
    for n, (k, v) in enumerate(weights.layers):
        tensors[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = k.contiguous()
        tensors[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = v.contiguous()
    return _write(tensors, weights.facestudio.to_header(), Path(path))
