"""FaceID Plus v2's shortcut scale per person (FaceStudio Person's faceid_v2_weight): the reference's
s_scale in out = x + s * resampler(x, clip), on the cond and the unconditional tokens alike."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facestudio_testing import adapter_files as af
from facestudio_testing import clip_models
from facestudio_testing import face_models as fm

from facestudio_testing.sd15_apply import apply, base, identity, person, run_latent
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

V2 = "fs_scale_faceid-plus-v2_sd15.safetensors"  # 'v2' in the name: auto picks Plus v2
VITL_HIDDEN = 1024                                 # the test ViT-L's hidden width, which this adapter reads


def _identity(booted, seed: int, clip_tokens: int = 9, width: int = af.VIT_H_HIDDEN):
    """A one-shot FaceIdentity (the pack's own type) with a seeded embedding and CLIP features."""
    ident, faces = identity_modules(booted), booted.pack_module("encoders.faces")
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal(512).astype(np.float32)
    unit = emb / np.linalg.norm(emb)
    features = rng.standard_normal((1, clip_tokens, width)).astype(np.float32)
    return ident.value.FaceIdentity(
        embeddings=emb[None], normed_embeddings=unit[None], embedding=unit,
        recognizer=faces.RecognizerIdentity(fm.TINY_RECOGNIZER, "%016x" % seed, 512),
        crops=np.zeros((1, 224, 224, 3), np.uint8), det_scores=np.ones(1, np.float32),
        bboxes=np.array([[0, 0, 10, 10]], np.float32), kps=np.zeros((1, 5, 2), np.float32), used=(0,),
        photo_count=1, clip_features=features, clip_width=width, combined_clip_features=features[0],
        unconditional_clip_features=rng.standard_normal((clip_tokens, width)).astype(np.float32))


@pytest.fixture(scope="module")
def v2_adapter(booted, tmp_path_factory):
    path = af.write_adapter(tmp_path_factory.mktemp("v2") / "ip-adapter-faceid-plusv2_sd15.safetensors",
                            af.shared_state_dict("faceid-plus-v2", af.SD15))
    return booted.pack_module("attention.adapters").load_adapter(str(path))


def test_person_tokens_follow_the_reference_formula_on_both_sides(booted, v2_adapter):
    patch, projection = booted.pack_module("attention.patch"), booted.pack_module("attention.projection")
    module = projection.projection_for(v2_adapter)
    ident, negative = _identity(booted, 1), _identity(booted, 2)
    emb = torch.from_numpy(ident.embedding)[None]
    clip = torch.from_numpy(ident.combined_clip_features)[None]
    zero_clip = torch.from_numpy(ident.unconditional_clip_features)[None]
    with torch.no_grad():  # independently: x = the ID MLP's tokens, r = the resampler over them
        x, x0 = module.id_tokens(emb), module.id_tokens(torch.zeros(1, 512))
        r, r0 = module.perceiver_resampler(x, clip), module.perceiver_resampler(x0, zero_clip)
    tokens = {s: patch._person_tokens(v2_adapter, module, patch.add_person(None, ident, shortcut_scale=s)[0])
              for s in (0.0, 1.0, 2.0, -0.5)}
    for s, (cond, uncond) in tokens.items():
        torch.testing.assert_close(cond, x + s * r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(uncond, x0 + s * r0, atol=1e-5, rtol=1e-5)  # the same s, as the reference
    for side in (0, 1):  # linear in s: tokens(2) = tokens(0) + 2 (tokens(1) - tokens(0))
        t0, t1 = tokens[0.0][side], tokens[1.0][side]
        torch.testing.assert_close(tokens[2.0][side], t0 + 2 * (t1 - t0), atol=1e-5, rtol=1e-5)
    # a negative identity takes the person's scale too
    neg = patch.add_person(None, ident, negative=negative, shortcut_scale=2.0)[0]
    n_emb = torch.from_numpy(negative.embedding)[None]
    n_clip = torch.from_numpy(negative.combined_clip_features)[None]
    with torch.no_grad():
        xn = module.id_tokens(n_emb)
        expected = xn + 2.0 * module.perceiver_resampler(xn, n_clip)
    torch.testing.assert_close(patch._person_tokens(v2_adapter, module, neg)[1], expected, atol=1e-5, rtol=1e-5)


def test_other_kinds_ignore_the_scale(booted, tmp_path):
    patch, adapters = booted.pack_module("attention.patch"), booted.pack_module("attention.adapters")
    projection = booted.pack_module("attention.projection")
    for kind in ("faceid", "faceid-plus"):
        adapter = adapters.load_adapter(str(af.write_adapter(tmp_path / f"{kind}.safetensors",
                                                             af.shared_state_dict(kind, af.SD15))), kind)
        module = projection.projection_for(adapter)
        ident = _identity(booted, 3)
        one, five = (patch._person_tokens(adapter, module, patch.add_person(None, ident, shortcut_scale=s)[0])
                     for s in (1.0, 5.0))
        for a, b in zip(one, five):
            assert torch.equal(a, b), kind


def test_person_schema_has_the_scale_as_its_last_widget(booted):
    nodes = booted.pack_module("nodes.apply")
    inputs = nodes.FaceStudioPerson.define_schema().inputs
    last = inputs[-1]
    assert last.id == "faceid_v2_weight" and last.optional
    assert (last.default, last.min, last.max) == (1.0, -1.0, 5.0)
    assert "FaceID Plus v2" in last.tooltip


@pytest.fixture(scope="module")
def v2_setup(booted, setup):
    import folder_paths

    clip_models.install_vitl(booted.models)
    written = af.write_adapter(booted.models / "ipadapter" / V2,
                               af.adapter_state_dict("faceid-plus-v2", af.SD15, seed=7, clip_hidden=VITL_HIDDEN))
    folder_paths.filename_list_cache.pop("ipadapter", None)
    yield setup
    written.unlink()
    folder_paths.filename_list_cache.pop("ipadapter", None)


def _clip_identity(g, photo: str, name: str) -> list:
    ident = identity(g, photo, name)
    clip = g.add("CLIPVisionLoader", {"clip_name": clip_models.VITL_NAME}, f"{name}_clip")
    g.prompt[g[name]]["inputs"]["clip_vision"] = [clip, 0]
    return ident


def _scaled(g, ident: list, scale: float, persons: list | None = None) -> list:
    link = person(g, ident, persons=persons)
    g.prompt[link[0]]["inputs"]["faceid_v2_weight"] = scale
    return link


def test_in_the_executor_each_person_keeps_its_own_scale(comfy_host, v2_setup):
    def latent(scales, chained=False, adapter=V2):
        g = base(v2_setup, seed=2)
        a, b = _clip_identity(g, "fs_apply_a.png", "a"), _clip_identity(g, "fs_apply_b.png", "b")
        if chained:
            apply(g, _scaled(g, a, scales[0]), adapter=adapter)
            apply(g, _scaled(g, b, scales[1]), adapter=adapter)
        else:
            apply(g, _scaled(g, b, scales[1], persons=_scaled(g, a, scales[0])), adapter=adapter)
        return run_latent(comfy_host, g)

    same = latent((1.0, 1.0))
    mixed = latent((0.0, 3.0))
    assert (mixed - same).abs().max() > 1e-4
    assert (latent((0.0, 1.0)) - mixed).abs().max() > 1e-4  # person b's scale acts on its own
    torch.testing.assert_close(latent((0.0, 3.0), chained=True), mixed, atol=1e-5, rtol=0)
    faceid = latent((1.0, 1.0), adapter="fs_apply_faceid_sd15.safetensors")
    assert torch.equal(latent((0.0, 3.0), adapter="fs_apply_faceid_sd15.safetensors"), faceid)
