"""attention/layers.py: a ComfyUI UNet's cross-attention positions, in the order adapters number them."""
from __future__ import annotations

import pytest
import torch

from facestudio_testing import adapter_files as af
from facestudio_testing.meta_models import DIFFUSERS_CONFIGS, UNET_CONFIGS, comfy_model, diffusers_unet

EXPECTED = {"tiny-sd15": (16, af.TINY_SD15_WIDTHS), "sd15": (16, af.SD15_WIDTHS), "sdxl": (70, af.SDXL_WIDTHS)}


@pytest.fixture(scope="module")
def layers(booted):
    return booted.pack_module("attention.layers")


@pytest.fixture(scope="module")
def adapters(booted):
    return booted.pack_module("attention.adapters")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = comfy_model(name)
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_positions_follow_diffusers_attn_processors_order(layers, models, name):
    import comfy.utils

    model = models(name)
    positions = layers.cross_attention_positions(model)

    reference = diffusers_unet(name)
    attn2 = [n[: -len(".processor")] for n in reference.attn_processors if n.endswith("attn2.processor")]
    to_comfy = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    expected_paths = [to_comfy[f"{n}.to_k.weight"][: -len(".to_k.weight")] for n in attn2]

    assert [p.module_path for p in positions] == expected_paths
    count, widths = EXPECTED[name]
    assert len(positions) == count
    assert tuple(p.inner_width for p in positions) == widths
    assert {p.context_width for p in positions} == {DIFFUSERS_CONFIGS[name]["cross_attention_dim"]}
    # The patch key repeats the path in ComfyUI's terms: (block, index in input/output_blocks, transformer index).
    for p in positions:
        if p.block == "middle":
            assert p.module_path.startswith("middle_block.1.transformer_blocks.") and p.block_index == 0
        else:
            assert p.module_path.startswith(f"{p.block}_blocks.{p.block_index}.")
        assert p.module_path.endswith(f"transformer_blocks.{p.transformer_index}.attn2")


def test_accepts_model_base_model_and_unet_alike(layers, models):
    model = models("tiny-sd15")
    from_patcher = layers.cross_attention_positions(model)
    assert layers.cross_attention_positions(model.model) == from_patcher
    assert layers.cross_attention_positions(model.model.diffusion_model) == from_patcher
    with pytest.raises(layers.AdapterError, match="IP-Adapter layers fit UNet models.*Linear"):
        layers.cross_attention_positions(torch.nn.Linear(2, 2))


def test_patch_keys_are_the_keys_comfyui_looks_up(layers):
    """Run a small real UNet with an attn2 replace patch at every position: each key must be hit, once."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops

    torch.manual_seed(0)
    unet = openaimodel.UNetModel(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
        transformer_depth=[1, 2], transformer_depth_output=[1, 1, 2, 2], transformer_depth_middle=2,
        context_dim=64, num_head_channels=16, use_spatial_transformer=True, legacy=False,
        use_linear_in_transformer=True, operations=comfy.ops.disable_weight_init)
    positions = layers.cross_attention_positions(unet)
    calls = []

    def record(key):
        def patch(q, k, v, extra_options):
            calls.append(key)
            return q
        return patch

    options = {"patches_replace": {"attn2": {p.patch_key: record(p.patch_key) for p in positions}}}
    with torch.no_grad():
        unet(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), context=torch.zeros(1, 3, 64), transformer_options=options)
    assert len(positions) == (1 + 2) + (2 * 2 + 2 * 1) + 2  # down, up (one more block per level), middle
    assert sorted(calls) == sorted(p.patch_key for p in positions)


# --- mapping an adapter onto the positions ------------------------------------------------------------

def _adapter(adapters, tmp_path, kind, base, **sizes):
    path = af.write_adapter(tmp_path / af.release_file_name(kind, base, ".safetensors"),
                            af.adapter_state_dict(kind, base, **sizes) if sizes else af.shared_state_dict(kind, base))
    try:
        return adapters.load_adapter(str(path))
    finally:
        path.unlink()  # tens of MB, and pytest keeps tmp dirs


def test_adapter_layer_n_goes_to_position_n(layers, adapters, models, tmp_path):
    adapter = _adapter(adapters, tmp_path, "faceid-plus-v2", af.SD15)
    positions = layers.cross_attention_positions(models("tiny-sd15"))
    mapped = layers.map_adapter_layers(adapter, positions)
    assert [m.position for m in mapped] == list(positions)
    assert [m.adapter_key for m in mapped] == list(range(1, 32, 2))
    nested = af.shared_state_dict("faceid-plus-v2", af.SD15)["ip_adapter"]
    for m in mapped:
        assert torch.equal(m.to_k_ip, nested[f"{m.adapter_key}.to_k_ip.weight"])
        assert torch.equal(m.to_v_ip, nested[f"{m.adapter_key}.to_v_ip.weight"])


def test_real_width_sdxl_layers_fit_sdxl(layers, adapters, models):
    """The SDXL structure at full width; expanded (stride-0) tensors keep the 341M-parameter layers free."""
    image_proj = af.shared_state_dict("image-prompt", af.SDXL)["image_proj"]
    ip_adapter = {}
    for n, width in enumerate(af.SDXL_WIDTHS):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{2 * n + 1}.{name}.weight"] = torch.full((1, 2048), float(n)).expand(width, 2048)
    adapter = adapters.recognise(image_proj, ip_adapter, "ip-adapter_sdxl.safetensors")
    mapped = layers.map_adapter_layers(adapter, layers.cross_attention_positions(models("sdxl")))
    assert len(mapped) == 70
    assert [int(m.to_k_ip[0, 0]) for m in mapped] == list(range(70))


def test_sdxl_adapter_on_sd15_model(layers, adapters, models, tmp_path):
    adapter = _adapter(adapters, tmp_path, "faceid", af.SDXL)
    with pytest.raises(layers.AdapterError) as e:
        layers.map_adapter_layers(adapter, layers.cross_attention_positions(models("tiny-sd15")))
    message = str(e.value)
    assert "is an SDXL adapter (context width 2048) and cannot be used on an SD1.5 model (context width 768" in message
    assert "ip-adapter-faceid_sdxl.safetensors" in message


def test_sd15_adapter_on_sdxl_model(layers, adapters, models, tmp_path):
    adapter = _adapter(adapters, tmp_path, "image-prompt", af.SD15)
    with pytest.raises(layers.AdapterError, match="is an SD1.5 adapter .* cannot be used on an SDXL model"):
        layers.map_adapter_layers(adapter, layers.cross_attention_positions(models("sdxl")))


def test_layer_count_mismatch(layers, adapters, models, tmp_path):
    adapter = _adapter(adapters, tmp_path, "faceid", af.SD15, layer_widths=af.TINY_SD15_WIDTHS[:15], lora_rank=None)
    with pytest.raises(layers.AdapterError, match="has 15 cross-attention layers but the model has 16"):
        layers.map_adapter_layers(adapter, layers.cross_attention_positions(models("tiny-sd15")))


def test_inner_width_mismatch_names_the_layer_and_position(layers, adapters, models, tmp_path):
    # Real SD1.5 widths (320/640/1280) on the tiny UNet (320 everywhere): layer 2 is the first 640.
    adapter = _adapter(adapters, tmp_path, "image-prompt", af.SD15, layer_widths=af.SD15_WIDTHS)
    with pytest.raises(layers.AdapterError) as e:
        layers.map_adapter_layers(adapter, layers.cross_attention_positions(models("tiny-sd15")))
    message = str(e.value)
    assert "layer 2 ('5.to_k_ip.weight') makes 640 channels" in message
    assert "input_blocks.4.1.transformer_blocks.0.attn2 (patch ('input', 4, 0)) is 320 wide" in message


def test_model_without_cross_attention(layers, adapters, tmp_path):
    adapter = _adapter(adapters, tmp_path, "faceid", af.SD15)
    with pytest.raises(layers.AdapterError, match="no cross-attention layers"):
        layers.map_adapter_layers(adapter, ())
