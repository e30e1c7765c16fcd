"""The SD1.5 FaceStudio Apply set-up shared by the test modules that build Apply graphs
(test_apply, test_controls, test_controlnet, test_lora, test_shortcut_scale): the files it installs
(fixtures `setup` and `loaded` in tests/conftest.py) and the graph pieces those tests put together."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from . import adapter_files as af
from . import clip_models
from . import face_models as fm
from . import graphs
from .identity_modules import identity_modules

FACEID = "fs_apply_faceid_sd15.safetensors"
STYLE = "fs_apply_image_prompt_sd15.safetensors"
STYLE_VITL = "fs_apply_image_prompt_vitl_sd15.safetensors"  # reads ViT-L's 768-wide image embeds
PLUS = "fs_apply_" + af.release_file_name("faceid-plus", af.SD15, ".safetensors")
NARROW_PACK = "tiny_scrfd_narrow128"


def installed_apply_models(booted, tiny_sd15: str):
    """The tiny face packs, photos, adapters and CLIP vision ViT-L the SD1.5 Apply tests use, in the host's
    folders; yields the checkpoint name and removes the adapters afterwards (the `setup` fixture)."""
    import folder_paths

    folder = booted.models / "insightface" / "models"
    folder.mkdir(parents=True, exist_ok=True)
    narrow = fm.ensure_pack(NARROW_PACK, {fm.TINY_DETECTOR: fm.tiny_detector_model,
                                          fm.TINY_RECOGNIZER: lambda: fm.tiny_recognizer_model(width=128)})
    for name, target in ((fm.TINY_PACK, fm.tiny_pack()), (NARROW_PACK, narrow)):
        link = folder / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    inputs = booted.base / "input"
    inputs.mkdir(exist_ok=True)
    Image.fromarray(fm.tiny_face_image()).save(inputs / "fs_apply_a.png")
    Image.fromarray(fm.tiny_face_image(((6, 6, "green"),))).save(inputs / "fs_apply_b.png")
    adapters = booted.models / "ipadapter"
    written = [af.write_adapter(adapters / FACEID, af.shared_state_dict("faceid", af.SD15)),
               af.write_adapter(adapters / STYLE, af.shared_state_dict("image-prompt", af.SD15)),
               af.write_adapter(adapters / PLUS, af.shared_state_dict("faceid-plus", af.SD15)),
               af.write_adapter(adapters / STYLE_VITL, af.adapter_state_dict("image-prompt", af.SD15, seed=5,
                                                                             image_embeds=768))]
    clip_models.install_vitl(booted.models)
    Image.fromarray((np.random.default_rng(0).random((96, 80, 3)) * 255).astype(np.uint8)).save(
        inputs / "fs_apply_style.png")
    folder_paths.filename_list_cache.pop("ipadapter", None)
    yield tiny_sd15
    for path in written:
        path.unlink()
    folder_paths.filename_list_cache.pop("ipadapter", None)


def loaded_apply_parts(booted, tiny_sd15_file):
    """(MODEL, the FaceID adapter, two identities) for apply_facestudio called directly (the `loaded` fixture;
    needs installed_apply_models first)."""
    import comfy.sd

    faces, ident = booted.pack_module("encoders.faces"), identity_modules(booted)
    analyzer = faces.load_face_analyzer(fm.tiny_pack(), providers="cpu")
    people = [ident.multishot.encode_identity(analyzer, [fm.tiny_face_image(cells).astype(np.float32) / 255.0], cache=None)
              for cells in (((6, 6, "white"),), ((8, 5, "green"),))]
    model = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_vae=False, output_clip=False)[0]
    adapter = booted.pack_module("attention.adapters").load_adapter(str(booted.models / "ipadapter" / FACEID))
    return model, adapter, people


def faceid_adapter_and_person(booted, folder, name: str):
    """A FaceID SD1.5 adapter (the real layout, seeded weights) written to folder/name and loaded, and one
    identity from the tiny face pack: what the tests that call apply_facestudio directly patch with."""
    faces, ident = booted.pack_module("encoders.faces"), identity_modules(booted)
    analyzer = faces.load_face_analyzer(fm.tiny_pack(), providers="cpu")
    person = ident.multishot.encode_identity(analyzer, [fm.tiny_face_image().astype(np.float32) / 255.0], cache=None)
    path = af.write_adapter(folder / name, af.shared_state_dict("faceid", af.SD15))
    return booted.pack_module("attention.adapters").load_adapter(str(path)), person


def replacements(model) -> dict:
    """The attn2 replacements by (block, index, transformer), one per position (on SD1.5 the same objects
    also sit under the (block, index) keys, where cubiq's IPAdapter looks)."""
    entries = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    return {key: patch for key, patch in entries.items() if len(key) == 3}


def identity(g: graphs.Graph, photo: str, name: str, pack: str = fm.TINY_PACK) -> list:
    g.add("FaceStudioFaceAnalyzerLoader", {"pack": pack, "provider": "CPU", "det_size": 640}, f"{name}_analyzer")
    g.add("LoadImage", {"image": photo}, f"{name}_photo")
    g.add("FaceStudioIdentityEncode", {"face_analyzer": g.link(f"{name}_analyzer"), "image": g.link(f"{name}_photo"),
                                       "face": "largest", "index": 0, "on_missing": "error",
                                       "outlier_threshold": 0.4}, name)
    return g.link(name)


def person(g: graphs.Graph, ident: list, weight: float = 1.0, persons: list | None = None, name=None) -> list:
    inputs = {"identity": ident, "weight": weight, "start": 0.0, "end": 1.0, "mask_index": 0}
    if persons is not None:
        inputs["persons"] = persons
    return [g.add("FaceStudioPerson", inputs, name), 0]


def apply(g: graphs.Graph, persons: list, adapter: str = FACEID, alpha: float = 0.5, style: bool = False,
          style_weight: float = 1.0, lora_strength: float | None = None) -> str:
    """lora_strength None leaves the node's default (1.0: the FaceID LoRA acts)."""
    loader = g.add("FaceStudioAdapterLoader", {"adapter_name": adapter, "kind": "auto"})
    inputs = {"adapter": [loader, 0], "persons": persons, "alpha": alpha, "style_weight": style_weight}
    if lora_strength is not None:
        inputs["lora_strength"] = lora_strength
    if style:
        clip = g.add("CLIPVisionLoader", {"clip_name": clip_models.VITL_NAME})
        image = g.add("LoadImage", {"image": "fs_apply_style.png"})
        encoded = g.add("FaceStudioStyleEncode", {"image": [image, 0], "clip_vision": [clip, 0], "mask_margin": 0.25})
        style_loader = g.add("FaceStudioAdapterLoader", {"adapter_name": STYLE_VITL, "kind": "auto"})
        inputs.update(style=[encoded, 0], style_adapter=[style_loader, 0])
    return g.insert_model_node("FaceStudioApply", inputs)


def run_latent(comfy_host, g: graphs.Graph, sampler: str = "sampler") -> torch.Tensor:
    result = comfy_host.run(g.prompt)
    assert result.success, result.error
    return comfy_host.output(result, g[sampler])["samples"]


def base(ckpt, seed=0):
    return graphs.txt2img(ckpt, output="latent", seed=seed)
