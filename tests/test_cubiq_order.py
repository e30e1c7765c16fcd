"""cubiq's real ComfyUI_IPAdapter_plus (scripts/ipadapter-plus.pin) chained with FaceStudio Apply, in both
orders, on SD1.5 and SDXL, in a real server whose custom_nodes hold both packs (facestudio_testing.peer_packs).

cubiq's IPAdapterAdvanced installs its Attn2Replace at ("input"/"output", id) on SD1.5 and at
(block, id, index) on SDXL (IPAdapterPlus.py:509-537 at 9d076a3), and calls .add() on an entry already at
that key (:222-226). The host calls (block, id, index) first, then (block, id) (comfy/ldm/modules/
attention.py, BasicTransformerBlock). So before FaceStudio Apply both effects must act (FaceStudio wraps
cubiq's replacement); after it, either both act or the prompt fails with FaceStudio's error naming the
order, never one effect silently. Each graph samples one step from the same seed; latents are compared.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facestudio_testing import adapter_files as af
from facestudio_testing import clip_models, graphs, tiny_models, tiny_sdxl
from facestudio_testing import face_models as fm
from facestudio_testing.peer_packs import PeerServer
from facestudio_testing.server import execution_error

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

ORDER_ERROR = "An IPAdapter node comes after FaceStudio Apply on this model"
FACE, REFERENCE = "fs_cubiq_face.png", "fs_cubiq_reference.png"
# FaceStudio's FaceID adapter and a plain image-prompt adapter for cubiq's node, per base (layers 320 wide:
# the tiny UNets'; cubiq reads the CLIP width from proj.weight, here the test ViT-L's 768).
FILES = {
    af.SD15: ("fs_cubiq_faceid_sd15.safetensors", "fs_cubiq_ip-adapter_sd15.safetensors"),
    af.SDXL: (af.release_file_name("faceid", af.SDXL, ".safetensors"), "fs_cubiq_ip-adapter_sdxl.safetensors"),
}


@pytest.fixture(scope="module")
def server(booted):
    """The server with both packs, the tiny SD1.5 checkpoint and SDXL UNet, the test ViT-L, the tiny face pack,
    the adapters and the two input photos."""
    srv = PeerServer()
    try:
        srv.start()
        failures = srv.import_failures()
        assert not failures, "a custom node pack failed to import:\n" + "\n".join(failures) + srv.log()[-3000:]
        assert {"IPAdapterAdvanced", "IPAdapterModelLoader", "FaceStudioApply",
                tiny_sdxl.RandomSDXLConditioning.NODE_ID} <= srv.node_types()
        models = srv.models
        tiny_models.install_checkpoint(models)
        tiny_sdxl.install_unet(models)
        clip_models.install_vitl(models)
        tiny_models.link_model(fm.tiny_pack(), models, "insightface/models", fm.TINY_PACK)
        sd15_widths = (320,) * len(tiny_models.SD15_CROSS_ATTENTION_BLOCKS)
        ipadapter = models / "ipadapter"
        af.write_adapter(ipadapter / FILES[af.SD15][0], af.adapter_state_dict(
            "faceid", af.SD15, layer_widths=sd15_widths, lora_rank=None))
        af.write_adapter(ipadapter / FILES[af.SD15][1], af.adapter_state_dict(
            "image-prompt", af.SD15, seed=1, layer_widths=sd15_widths, image_embeds=768))
        af.write_adapter(ipadapter / FILES[af.SDXL][0], tiny_sdxl.adapter_state_dict("faceid"))
        af.write_adapter(ipadapter / FILES[af.SDXL][1], tiny_sdxl.adapter_state_dict(
            "image-prompt", seed=2, layers_seed=1, image_embeds=768))
        Image.fromarray(fm.tiny_face_image()).save(srv.base / "input" / FACE)
        reference = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
        Image.fromarray(reference).save(srv.base / "input" / REFERENCE)
        yield srv
    finally:
        srv.cleanup()


def base_graph(base: str, prefix: str) -> graphs.Graph:
    """Loader -> KSampler (one Euler step with CFG, seed 0) -> SaveLatent; SDXL with seeded conditioning (no
    text encoders)."""
    if base == af.SD15:
        return graphs.txt2img(tiny_models.CHECKPOINT_NAME, steps=1, output="latent", filename_prefix=prefix)
    g = graphs.Graph()
    g.add("UNETLoader", {"unet_name": tiny_sdxl.UNET_NAME, "weight_dtype": "default"}, "checkpoint")
    g.add(tiny_sdxl.RandomSDXLConditioning.NODE_ID, {"seed": 1}, "positive")
    g.add(tiny_sdxl.RandomSDXLConditioning.NODE_ID, {"seed": 2}, "negative")
    g.add("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}, "latent")
    g.add("KSampler", {"model": g.link("checkpoint"), "positive": g.link("positive"), "negative": g.link("negative"),
                       "latent_image": g.link("latent"), "seed": 0, "steps": 1, "cfg": 5.0, "sampler_name": "euler",
                       "scheduler": "normal", "denoise": 1.0}, "sampler")
    g.add("SaveLatent", {"samples": g.link("sampler"), "filename_prefix": prefix}, "save")
    return g


def add_facestudio(g: graphs.Graph, base: str) -> str:
    analyzer = g.add("FaceStudioFaceAnalyzerLoader", {"pack": fm.TINY_PACK, "provider": "CPU", "det_size": 640})
    photo = g.add("LoadImage", {"image": FACE})
    identity = g.add("FaceStudioIdentityEncode", {"face_analyzer": [analyzer, 0], "image": [photo, 0],
                                                  "face": "largest", "index": 0, "on_missing": "error",
                                                  "outlier_threshold": 0.4})
    person = g.add("FaceStudioPerson", {"identity": [identity, 0], "weight": 1.0, "start": 0.0, "end": 1.0,
                                        "mask_index": 0})
    loader = g.add("FaceStudioAdapterLoader", {"adapter_name": FILES[base][0], "kind": "auto"})
    return g.insert_model_node("FaceStudioApply", {"adapter": [loader, 0], "persons": [person, 0], "alpha": 0.5,
                                                   "style_weight": 1.0, "lora_strength": 0.0})


def add_cubiq(g: graphs.Graph, base: str) -> str:
    """cubiq's plain IPAdapterAdvanced with its own model loader and the host's CLIPVisionLoader."""
    ipadapter = g.add("IPAdapterModelLoader", {"ipadapter_file": FILES[base][1]})
    clip = g.add("CLIPVisionLoader", {"clip_name": clip_models.VITL_NAME})
    image = g.add("LoadImage", {"image": REFERENCE})
    return g.insert_model_node("IPAdapterAdvanced", {
        "ipadapter": [ipadapter, 0], "image": [image, 0], "clip_vision": [clip, 0], "weight": 1.0,
        "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
        "embeds_scaling": "V only"})


def graph(base: str, chain: tuple[str, ...]) -> graphs.Graph:
    """The MODEL passes through the nodes of `chain` ("cubiq", "facestudio") in that order."""
    g = base_graph(base, "fs_cubiq_" + base.replace(".", "") + "_" + "_".join(chain))
    for name in chain:
        {"cubiq": add_cubiq, "facestudio": add_facestudio}[name](g, base)
    return g


def latent(server, g: graphs.Graph) -> torch.Tensor:
    from safetensors.torch import load_file

    entry = server.run(g.prompt, timeout=600)
    assert execution_error(entry) is None, execution_error(entry)
    prefix = g.prompt[g["save"]]["inputs"]["filename_prefix"]
    (path,) = (server.base / "output").glob(prefix + "_*.latent")
    return load_file(str(path))["latent_tensor"]


# The random UNets' latents reach hundreds after a CFG step: "changed" is judged against their scale.
def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 0.01 * b.abs().max())


@pytest.fixture(scope="module")
def latents(server):
    """Per base: each pack alone. A pack that did nothing would fail the tests below (the chain would equal
    the other pack alone), so no plain latent is needed."""
    out = {}
    for base in (af.SD15, af.SDXL):
        out[base] = {chain: latent(server, graph(base, chain)) for chain in (("facestudio",), ("cubiq",))}
        assert changed(out[base][("cubiq",)], out[base][("facestudio",)]), base
    return out


@pytest.mark.parametrize("base", [af.SD15, af.SDXL])
def test_cubiq_before_facestudio_keeps_both_effects(server, latents, base):
    both = latent(server, graph(base, ("cubiq", "facestudio")))
    assert changed(both, latents[base][("facestudio",)]), "cubiq's IPAdapter was dropped"
    assert changed(both, latents[base][("cubiq",)]), "FaceStudio's persons were dropped"


@pytest.mark.parametrize("base", [af.SD15, af.SDXL])
def test_cubiq_after_facestudio_keeps_both_or_fails_naming_the_order(server, latents, base):
    g = graph(base, ("facestudio", "cubiq"))
    cubiq_node = g.model[0]
    entry = server.run(g.prompt, timeout=600)
    error = execution_error(entry)
    if error is not None:
        assert error.startswith(f"IPAdapterAdvanced (node {cubiq_node}): "), error
        assert ORDER_ERROR in error and "Connect the IPAdapter nodes first and FaceStudio Apply after them" in error
        return
    from safetensors.torch import load_file

    (path,) = (server.base / "output").glob(g.prompt[g["save"]]["inputs"]["filename_prefix"] + "_*.latent")
    both = load_file(str(path))["latent_tensor"]
    assert changed(both, latents[base][("facestudio",)]), "cubiq's IPAdapter after FaceStudio Apply was silently dropped"
    assert changed(both, latents[base][("cubiq",)]), "FaceStudio's persons were silently dropped"
