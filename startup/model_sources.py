"""Where each model file the pack and its workflows name comes from: one table, used by the loaders'
messages for a file that is not there and by the workflow generator's model metadata.

Every entry is a public release: its file name as the workflows and the loaders use it, the host's
model folder it goes in (a `folder_paths` name) and a public download URL. Standard library only and
no relative imports: `scripts/make_workflows.py` loads this file on its own, without the host.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSource:
    name: str         # the file name (an insightface pack: its folder name)
    folder: str       # the host's model folder name: checkpoints, loras, ipadapter, insightface, ...
    url: str          # a public download
    subfolder: str = ""  # inside the folder: insightface packs go in insightface/models/<name>
    how: str = ""     # what to do with the download when it is not the file itself (rename, unzip)

    @property
    def place(self) -> str:
        """Where it goes, as the user sees it: 'models/ipadapter', 'models/insightface/models/buffalo_l'."""
        parts = ["models", self.folder] + ([self.subfolder] if self.subfolder else [])
        return "/".join(parts + ([self.name] if self.is_pack else []))

    @property
    def is_pack(self) -> bool:
        return self.folder == "insightface"

    def metadata(self) -> dict[str, str]:
        """The entry of a workflow's `models` list (ComfyUI's template format)."""
        return {"name": self.name, "url": self.url, "directory": self.folder}

    def how_to_get(self) -> str:
        """One sentence: where to download it and where to put it."""
        if self.is_pack:
            return (f"Download {self.url} and unzip it so that {self.place}/ holds its .onnx files"
                    f"{self.how and ' (' + self.how + ')'}.")
        if os.path.basename(self.url.split("?")[0]) != self.name:
            return f"Download {self.url} and save it as {self.name} in {self.place}/."
        return f"Download it from {self.url} into {self.place}/."


_HF_FACEID = "https://huggingface.co/h94/IP-Adapter-FaceID/resolve/main/"
_HF_IPADAPTER = "https://huggingface.co/h94/IP-Adapter/resolve/main/"

# The IP-Adapter FaceID releases (each FaceID / Plus / Plus v2 .bin carries its LoRA; the
# `_lora.safetensors` files are the same LoRA for LoRA loaders and for .safetensors conversions).
_FACEID = ("ip-adapter-faceid_sd15.bin", "ip-adapter-faceid-plus_sd15.bin", "ip-adapter-faceid-plusv2_sd15.bin",
           "ip-adapter-faceid-portrait_sd15.bin", "ip-adapter-faceid-portrait-v11_sd15.bin",
           "ip-adapter-faceid_sdxl.bin", "ip-adapter-faceid-plusv2_sdxl.bin",
           "ip-adapter-faceid-portrait_sdxl.bin", "ip-adapter-faceid-portrait_sdxl_unnorm.bin")
_FACEID_LORAS = ("ip-adapter-faceid_sd15_lora.safetensors", "ip-adapter-faceid-plus_sd15_lora.safetensors",
                 "ip-adapter-faceid-plusv2_sd15_lora.safetensors", "ip-adapter-faceid_sdxl_lora.safetensors",
                 "ip-adapter-faceid-plusv2_sdxl_lora.safetensors")
# The image-prompt (style) adapters, as h94/IP-Adapter lays them out.
_IMAGE_PROMPT = {"ip-adapter_sd15.safetensors": "models/", "ip-adapter-plus_sd15.safetensors": "models/",
                 "ip-adapter_sdxl_vit-h.safetensors": "sdxl_models/",
                 "ip-adapter-plus_sdxl_vit-h.safetensors": "sdxl_models/",
                 "ip-adapter_sdxl.safetensors": "sdxl_models/"}

SOURCES: dict[str, ModelSource] = {s.name: s for s in (
    *(ModelSource(name, "ipadapter", _HF_FACEID + name) for name in _FACEID),
    *(ModelSource(name, "loras", _HF_FACEID + name) for name in _FACEID_LORAS),
    *(ModelSource(name, "ipadapter", _HF_IPADAPTER + path + name) for name, path in _IMAGE_PROMPT.items()),
    # The ViT-H and ViT-bigG image encoders, named as cubiq's ComfyUI_IPAdapter_plus README names them.
    ModelSource("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_vision",
                _HF_IPADAPTER + "models/image_encoder/model.safetensors"),
    ModelSource("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", "clip_vision",
                _HF_IPADAPTER + "sdxl_models/image_encoder/model.safetensors"),
    ModelSource("buffalo_l", "insightface", "https://github.com/deepinsight/insightface/releases/download/v0.7/"
                "buffalo_l.zip", subfolder="models", how="det_10g.onnx and w600k_r50.onnx are the ones used"),
    # PuLID-FLUX (FaceStudio Load PuLID-FLUX) and what its identity needs besides.
    ModelSource("pulid_flux_v0.9.1.safetensors", "pulid",
                "https://huggingface.co/guozinan/PuLID/resolve/main/pulid_flux_v0.9.1.safetensors"),
    ModelSource("EVA02_CLIP_L_336_psz14_s6B.pt", "clip_vision",
                "https://huggingface.co/QuanSun/EVA-CLIP/resolve/main/EVA02_CLIP_L_336_psz14_s6B.pt"),
    ModelSource("detection_Resnet50_Final.pth", "facexlib",
                "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"),
    ModelSource("parsing_bisenet.pth", "facexlib",
                "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth"),
    ModelSource("antelopev2", "insightface", "https://github.com/deepinsight/insightface/releases/download/v0.7/"
                "antelopev2.zip", subfolder="models", how="scrfd_10g_bnkps.onnx and glintr100.onnx are the ones used"),
    # FLUX.1 dev as ComfyUI's FLUX examples load it (the dev weights are gated: accept the licence on the page
    # first); the VAE is the same file in the Apache-2.0 schnell release, which is not gated.
    ModelSource("flux1-dev.safetensors", "diffusion_models",
                "https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"),
    ModelSource("t5xxl_fp16.safetensors", "text_encoders",
                "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    ModelSource("clip_l.safetensors", "text_encoders",
                "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    ModelSource("ae.safetensors", "vae",
                "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors"),
    ModelSource("v1-5-pruned-emaonly.safetensors", "checkpoints",
                "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                "v1-5-pruned-emaonly.safetensors"),
    ModelSource("sd_xl_base_1.0.safetensors", "checkpoints",
                "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                "sd_xl_base_1.0.safetensors"),
    ModelSource("control_v11p_sd15_openpose.pth", "controlnet",
                "https://huggingface.co/lllyasviel/ControlNet-v1-1/resolve/main/control_v11p_sd15_openpose.pth"),
    # Detail Tweaker (civitai.com/models/58390), the example style LoRA of the ControlNet workflow.
    ModelSource("add_detail.safetensors", "loras", "https://civitai.com/api/download/models/62833"),
    ModelSource("sam3.1_multiplex_fp16.safetensors", "checkpoints",
                "https://huggingface.co/Comfy-Org/sam3.1/resolve/main/checkpoints/sam3.1_multiplex_fp16.safetensors"),
)}

LORA_SUFFIX = "_lora.safetensors"


def source(name: str) -> ModelSource | None:
    """The public release named `name` (a file name, possibly in a sub-folder), or None."""
    return SOURCES.get(os.path.basename((name or "").replace("\\", "/")))


def paired_lora_file(adapter_name: str) -> str:
    """The file name of the LoRA released with a FaceID adapter: 'ip-adapter-faceid-plusv2_sd15.bin' ->
    'ip-adapter-faceid-plusv2_sd15_lora.safetensors' (attention/lora.py looks for it under that name)."""
    return os.path.splitext(os.path.basename((adapter_name or "").replace("\\", "/")))[0] + LORA_SUFFIX


def paired_lora(adapter_name: str) -> ModelSource | None:
    """The public release of that LoRA, or None when the adapter's release has none (Portrait)."""
    return SOURCES.get(paired_lora_file(adapter_name))


AFTER = "Then refresh the node list (press R) and queue again."


def missing_file_message(what: str, name: str, folder_label: str, folders: list[str],
                         found: list[str] | None = None, also: str = "") -> str:
    """What a loader says when `name` is not in its folder: the file, the folders searched, where to
    download it (when it is a public release this table knows), `also` (e.g. a companion file) and
    what to do after."""
    where = " or ".join(folders) if folders else f"any folder: none is configured for {folder_label}"
    entry = source(name)
    text = f"No {what} '{name}' in models/{folder_label} (not in {where})."
    if entry is not None:
        text += " " + entry.how_to_get()
    else:
        text += f" Put it there, or pick one that is there{_found(found)}."
    return " ".join(part for part in (text, also, AFTER) if part)


def _found(found: list[str] | None) -> str:
    if not found:
        return ""
    shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
    return f" ({shown})"
