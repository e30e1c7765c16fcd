"""SD1.5 / SDXL UNets on the meta device, as ComfyUI and diffusers build them: structure without weights.

For tests about layer layout (names, order, widths), where real-size models would cost gigabytes.
"""
from __future__ import annotations

import torch

# The unet_config ComfyUI's detection gives each model (comfy/model_detection.py), and the tiny test size.
_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
           "use_temporal_resblock": False}
_SD15 = {**_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "use_linear_in_transformer": False,
         "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
         "transformer_depth_middle": 1, "context_dim": 768, "num_heads": 8}
UNET_CONFIGS = {
    "tiny-sd15": {**_SD15, "channel_mult": [1, 1, 1, 1]},
    "sd15": {**_SD15, "channel_mult": [1, 2, 4, 4]},
    "sdxl": {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
             "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
             "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
}
# The same UNets in diffusers' UNet2DConditionModel terms.
DIFFUSERS_CONFIGS = {
    "tiny-sd15": dict(block_out_channels=(320, 320, 320, 320), layers_per_block=2, cross_attention_dim=768,
                      attention_head_dim=8),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


def comfy_model(name: str):
    """A MODEL as the host builds it (supported-model config -> BaseModel -> ModelPatcher), on the meta device."""
    import comfy.model_patcher
    import comfy.supported_models

    config_class = comfy.supported_models.SDXL if name == "sdxl" else comfy.supported_models.SD15
    base_model = config_class(dict(UNET_CONFIGS[name])).get_model({}, device="meta")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base_model, load_device=cpu, offload_device=cpu)


def diffusers_unet(name: str, **overrides):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**{**DIFFUSERS_CONFIGS[name], **overrides})
