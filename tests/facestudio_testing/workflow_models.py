"""The small test models under the bundled workflows' public file names, in a server's models folder.

The files the workflows load (workflow_defs: checkpoints, adapters, CLIP vision, the insightface pack,
ControlNet, LoRA; FLUX.1 with its text encoders and VAE, PuLID-FLUX with EVA-CLIP and facexlib's files),
each generated small in the release's own format: a user who has the real files runs the same workflow
unchanged. One exception: FLUX's T5-XXL has no small form the host loads (its config is fixed at 4.7B
parameters), so the FLUX runs encode with CLIP-L alone (workflow_defs.TEST_SWAPS) and the T5 name holds
the CLIP-L file only so that the frontend lists it; nothing loads it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import adapter_files as af
from . import clip_models, pulid_files, tiny_controlnet, tiny_flux, tiny_models, tiny_sdxl
from . import face_models as fm
from . import workflow_defs as wd

# The test CLIP vision model is ViT-L (1024 hidden, 768 projected), not ViT-H: the adapters saved
# under the ViT-H adapters' names are made with the widths it gives.
VITL_HIDDEN, VITL_EMBEDS = 1024, 768


def install(models: Path, tiny_sd15_file: Path) -> None:
    tiny_models.link_model(tiny_sd15_file, models, "checkpoints", wd.CHECKPOINT)
    # Listed under SAM3's name so the frontend finds the file (the SAM3 workflow is loaded, never run).
    tiny_models.link_model(tiny_sd15_file, models, "checkpoints", wd.SAM3_CHECKPOINT)
    tiny_models.link_model(fm.tiny_pack(), models, "insightface/models", wd.FACE_PACK)
    clip_models.install_vitl(models, wd.CLIP_VISION)
    # FaceID Plus v2 (name says v2) with its LoRA in the file, as the release's .bin (torch.save, nested).
    af.write_adapter(models / "ipadapter" / wd.FACEID_PLUS_V2,
                     af.adapter_state_dict("faceid-plus", af.SD15, clip_hidden=VITL_HIDDEN))
    af.write_adapter(models / "ipadapter" / wd.STYLE_ADAPTER,
                     af.adapter_state_dict("image-prompt-plus", af.SD15, seed=3, clip_hidden=VITL_HIDDEN,
                                           image_embeds=VITL_EMBEDS))
    # The release's .pth is a pickled state dict: the tiny ControlNet's tensors saved that way.
    torch.save(load_file(str(tiny_controlnet.controlnet_file())), models / "controlnet" / wd.CONTROLNET_POSE)
    save_file(af.lora_like_state_dict(seed=4), str(models / "loras" / wd.STYLE_LORA))
    # SDXL: the tiny SDXL checkpoint (its UNet has SDXL's 70 cross-attention positions, 320 wide; full
    # text encoders) and FaceID Plus v2 for it, its LoRA in the file. The resampler keeps the 2048
    # width v2's shortcut needs and reads the test CLIP vision's ViT-L width.
    tiny_models.link_model(tiny_sdxl.checkpoint_file(), models, "checkpoints", wd.SDXL_CHECKPOINT)
    af.write_adapter(models / "ipadapter" / wd.FACEID_PLUS_V2_SDXL,
                     af.adapter_state_dict("faceid-plus", af.SDXL, seed=5, layer_widths=tiny_sdxl.WIDTHS,
                                           resampler_dim=tiny_sdxl.CONTEXT, clip_hidden=VITL_HIDDEN,
                                           resampler_depth=1, resampler_heads=1, ff_mult=1))
    # FLUX.1 and PuLID-FLUX: the tiny FLUX (CLIP-L's text widths), CLIP-L, a taef1-format VAE, PuLID-FLUX scaled
    # down to the tiny FLUX, the EVA-CLIP tower and facexlib's two files at their real sizes, the face pack as
    # antelopev2 (its recognizer is 512 wide, as glintr100).
    tiny_models.link_model(tiny_flux.tiny_flux_file(), models, "diffusion_models", wd.FLUX_UNET)
    tiny_models.link_model(tiny_flux.clip_l_file(), models, "text_encoders", wd.FLUX_CLIP_L)
    tiny_models.link_model(tiny_flux.clip_l_file(), models, "text_encoders", wd.FLUX_T5)  # listed, never loaded
    tiny_models.link_model(tiny_flux.vae_file(), models, "vae", wd.FLUX_VAE)
    tiny_models.link_model(tiny_flux.pulid_flux_file(), models, "pulid", wd.PULID_FLUX)
    tiny_models.link_model(pulid_files.eva_clip_file(), models, "clip_vision", wd.EVA_CLIP)
    for name in (pulid_files.DETECTOR_FILE, pulid_files.BISENET_FILE):
        tiny_models.link_model(pulid_files.facexlib_folder() / name, models, "facexlib", name)
    tiny_models.link_model(fm.tiny_pack(), models, "insightface/models", wd.FLUX_FACE_PACK)
