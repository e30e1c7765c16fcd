"""FaceStudio Person + Apply: the attn2 replacement on its own, then in the host's real executor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facestudio_testing import adapter_files as af
from facestudio_testing import face_models as fm
from facestudio_testing import graphs
from facestudio_testing.reference_attention import attend

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

FACEID = "fs_apply_faceid_sd15.safetensors"
STYLE = "fs_apply_image_prompt_sd15.safetensors"
PLUS = "fs_apply_" + af.release_file_name("faceid-plus", af.SD15, ".safetensors")
NARROW_PACK = "tiny_scrfd_narrow128"


# ---- the replacement object alone ----


def test_hard_left_right_masks_give_each_region_its_person_alone(booted):
    patch_mod = booted.pack_module("attention.patch")
    from comfy.ldm.modules import attention

    heads, c, hw = 4, 32, (8, 8)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 64, c, generator=gen) for _ in range(3))
    left = torch.zeros(1, *hw)
    left[..., :4] = 1.0
    people = []
    for mask in (left, 1.0 - left):
        cond = (torch.randn(1, 4, c, generator=gen), torch.randn(1, 4, c, generator=gen))
        uncond = (torch.randn(1, 4, c, generator=gen), torch.randn(1, 4, c, generator=gen))
        people.append(patch_mod.PersonLayer(cond, uncond, 1.0, 10.0, 1.0, mask))
    patch = patch_mod.FaceStudioAttention(people, None, 0.5)
    extra = {"n_heads": heads, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([5.0, 5.0]),
             "original_shape": [2, 4, *hw], "attn_precision": None}
    out = patch(q, k, v, extra)
    a_text = attention.optimized_attention(q, k, v, heads)
    cols = torch.arange(64) % 8
    for i, rows in enumerate((cols < 4, cols >= 4)):
        for chunk, side in ((0, "cond"), (1, "uncond")):
            kk, vv = getattr(people[i], side)
            alone = a_text[chunk:chunk + 1, rows] + attend(q[chunk:chunk + 1, rows], kk, vv, heads).float()
            torch.testing.assert_close(out[chunk:chunk + 1, rows], alone, atol=1e-5, rtol=0)

    # Outside [end, start] sigma: nobody is active and the output is exactly A_text.
    assert torch.equal(patch(q, k, v, {**extra, "sigmas": torch.tensor([20.0, 20.0])}), a_text)
    # Shared, never copied, between model clones.
    import copy
    assert copy.deepcopy({"p": patch})["p"] is patch


def test_a_foreign_replacement_is_wrapped_for_a_text_and_ours_are_merged(booted):
    patch_mod = booted.pack_module("attention.patch")
    heads, c = 2, 16
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 16, c, generator=gen) for _ in range(3))
    kv = (torch.randn(1, 4, c, generator=gen), torch.randn(1, 4, c, generator=gen))
    calls = []

    def foreign(q, k, v, extra):
        calls.append(extra)
        return torch.full_like(q, 0.25)

    layer = patch_mod.PersonLayer(kv, kv, 1.0, 10.0, 0.0, None)
    ours = patch_mod.FaceStudioAttention([layer], None, 0.5).wrapping(foreign)
    extra = {"n_heads": heads, "cond_or_uncond": [0], "sigmas": torch.tensor([1.0]), "original_shape": [1, 4, 4, 4]}
    out = ours(q, k, v, extra)
    assert len(calls) == 1
    torch.testing.assert_close(out, 0.25 + attend(q, *kv, heads).float(), atol=1e-5, rtol=0)
    merged = ours.merged_with(patch_mod.FaceStudioAttention([layer], None, 0.5))
    assert merged.wrapped is foreign and len(merged.persons) == 2
    with pytest.raises(ValueError, match="same alpha"):
        ours.merged_with(patch_mod.FaceStudioAttention([layer], None, 0.7))


def test_person_node_returns_a_new_list(booted):
    patch_mod = booted.pack_module("attention.patch")
    one = patch_mod.add_person(None, "a")
    two = patch_mod.add_person(one, "b", torch.ones(2, 4, 4), mask_index=1, weight=0.5)
    assert len(one) == 1 and len(two) == 2 and two[0] is one[0]
    assert two[1].mask.shape == (1, 4, 4)
    with pytest.raises(ValueError, match="mask_index 2 is out of range"):
        patch_mod.add_person(one, "b", torch.ones(2, 4, 4), mask_index=2)


# ---- in the executor ----


@pytest.fixture(scope="module")
def setup(comfy_host, booted, tiny_sd15):
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
               af.write_adapter(adapters / PLUS, af.shared_state_dict("faceid-plus", af.SD15))]
    folder_paths.filename_list_cache.pop("ipadapter", None)
    yield tiny_sd15
    for path in written:
        path.unlink()
    folder_paths.filename_list_cache.pop("ipadapter", None)


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


def apply(g: graphs.Graph, persons: list, adapter: str = FACEID) -> str:
    loader = g.add("FaceStudioAdapterLoader", {"adapter_name": adapter, "kind": "auto"})
    return g.insert_model_node("FaceStudioApply", {"adapter": [loader, 0], "persons": persons, "alpha": 0.5,
                                                   "style_weight": 1.0})


def run_latent(comfy_host, g: graphs.Graph, sampler: str = "sampler") -> torch.Tensor:
    result = comfy_host.run(g.prompt)
    assert result.success, result.error
    return comfy_host.output(result, g[sampler])["samples"]


def base(ckpt, seed=0):
    return graphs.txt2img(ckpt, output="latent", seed=seed)


def test_weight_zero_is_bit_identical_and_weight_one_changes_the_latent(comfy_host, setup):
    plain = run_latent(comfy_host, base(setup))
    latents = {}
    for weight in (0.0, 1.0):
        g = base(setup)
        apply(g, person(g, identity(g, "fs_apply_a.png", "a"), weight))
        latents[weight] = run_latent(comfy_host, g)
    assert torch.equal(latents[0.0], plain)
    assert (latents[1.0] - plain).abs().max() > 1e-3


def test_the_original_model_in_the_same_prompt_is_untouched(comfy_host, setup):
    g = base(setup, seed=11)
    apply(g, person(g, identity(g, "fs_apply_a.png", "a")))
    g.add("KSampler", {**g.prompt[g["sampler"]]["inputs"], "model": g.link("checkpoint", 0)}, "original")
    g.add("SaveLatent", {"samples": g.link("original"), "filename_prefix": "facestudio_test"})
    comfy_host.executor.reset()  # both computed here, neither taken from an earlier run's cache
    result = comfy_host.run(g.prompt)
    assert result.success, result.error
    original = comfy_host.output(result, g["original"])["samples"]
    patched = comfy_host.output(result, g["sampler"])["samples"]
    comfy_host.executor.reset()
    plain = run_latent(comfy_host, base(setup, seed=11))
    assert torch.equal(original, plain)
    assert not torch.equal(patched, plain)


def test_two_applies_equal_one_apply_with_both_persons(comfy_host, setup):
    chained = base(setup)
    apply(chained, person(chained, identity(chained, "fs_apply_a.png", "a")))
    apply(chained, person(chained, identity(chained, "fs_apply_b.png", "b"), 0.8))
    joint = base(setup)
    first = person(joint, identity(joint, "fs_apply_a.png", "a"))
    apply(joint, person(joint, identity(joint, "fs_apply_b.png", "b"), 0.8, persons=first))
    a, b = run_latent(comfy_host, chained), run_latent(comfy_host, joint)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.equal(a, run_latent(comfy_host, base(setup)))


@pytest.mark.parametrize("case, message", [
    ("narrow", "128-wide face recognizer"),
    ("style", "style (image-prompt) adapter"),
    ("plus", "connect a CLIP vision model (ViT-H) to FaceStudio Encode Identity"),
])
def test_wrong_identity_or_adapter_is_a_clear_error(comfy_host, setup, case, message):
    g = base(setup)
    if case == "narrow":
        node = apply(g, person(g, identity(g, "fs_apply_a.png", "n", pack=NARROW_PACK)))
    else:
        node = apply(g, person(g, identity(g, "fs_apply_a.png", "a")), adapter=STYLE if case == "style" else PLUS)
    result = comfy_host.run(g.prompt)
    assert not result.success
    assert result.error_node == node
    assert message in result.error


def test_a_masked_person_runs_and_a_missing_mask_index_is_a_clear_error(comfy_host, setup):
    plain = run_latent(comfy_host, base(setup))
    for index, ok in ((0, True), (1, False)):
        g = base(setup)
        mask = g.add("SolidMask", {"value": 1.0, "width": 32, "height": 64})
        node = g.add("FaceStudioPerson", {"identity": identity(g, "fs_apply_a.png", "a"), "weight": 1.0, "start": 0.0,
                                          "end": 1.0, "mask": [mask, 0], "mask_index": index})
        apply(g, [node, 0])
        if ok:
            assert not torch.equal(run_latent(comfy_host, g), plain)
        else:
            result = comfy_host.run(g.prompt)
            assert not result.success and result.error_node == node
            assert "mask_index 1 is out of range" in result.error
