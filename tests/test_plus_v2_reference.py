"""FaceID Plus v2, stage by stage against the official pipeline run on the same inputs and weights.

The official path (tencent-ailab/IP-Adapter ip_adapter/ip_adapter_faceid.py, IPAdapterFaceIDPlus
.get_image_embeds:325-337, inherited unchanged by IPAdapterFaceIDPlusXL:474; the model card's demo):
insightface FaceAnalysis -> face_align.norm_crop(image, kps, image_size=224) -> CLIPImageProcessor()
-> CLIPVisionModelWithProjection(..., output_hidden_states=True).hidden_states[-2]; the uncond side
encodes torch.zeros_like(pixel_values); ProjPlusModel(normed_embedding, hidden states, shortcut, s_scale).
Here each stage runs with the official component: insightface's own FaceAnalysis and norm_crop,
transformers' CLIPImageProcessor and CLIPVisionModelWithProjection loaded with the test CLIP's
weights, and the ProjPlusModel formula through cubiq's line-for-line copy (image_proj_models.py
ProjModelFaceIdPlus:229-260 = ip_adapter_faceid.py:85-117). One deliberate difference: the demo
hands the BGR crop to CLIPImageProcessor (tencent-ailab/IP-Adapter#430); the pack and these tests
use RGB.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facestudio_testing import adapter_files as af
from facestudio_testing import clip_models, face_photos, reference_projection
from facestudio_testing import face_models as fm
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

FACE = 2  # a face of t1 well inside the photo


@pytest.fixture(scope="module")
def ident(booted):
    return identity_modules(booted)


@pytest.fixture(scope="module")
def official_clip(tiny_clip):
    """transformers' CLIPVisionModelWithProjection with the tiny CLIP's config and weights (its own
    key names: every key must load, none may be left over)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = {k: v for k, v in clip_models.TINY_CLIP_CONFIG.items() if k not in ("model_type", "torch_dtype")}
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tiny_clip.get_sd().items()}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def official_hidden(model, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values, output_hidden_states=True).hidden_states[-2]


def processor_pixels(rgb_crop) -> torch.Tensor:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor()(images=np.array(rgb_crop), return_tensors="pt").pixel_values  # a writable copy


@pytest.fixture(scope="module")
def reference_face(real):
    """insightface's own FaceAnalysis on the trained pack, and its face FACE of t1 (BGR photo, as cv2.imread)."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=fm.REAL_PACK, root=str(fm.insightface_root()), allowed_modules=["detection", "recognition"],
                       providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    bgr = np.ascontiguousarray(face_photos.t1()[:, :, ::-1])
    found = sorted(app.get(bgr), key=lambda f: float(f.bbox[0]))
    return bgr, found[FACE]


@pytest.fixture(scope="module")
def identity(ident, real, tiny_clip):
    photo = face_photos.comfy_float(face_photos.t1())
    return ident.multishot.encode_identity(real, [photo], select="index", index=FACE, outlier_threshold=-1.0, cache=None,
                                 clip_vision=tiny_clip)


def official_crop(bgr, face, size=224) -> np.ndarray:
    from insightface.utils import face_align

    return np.ascontiguousarray(face_align.norm_crop(bgr, landmark=face.kps, image_size=size)[:, :, ::-1])


def test_crop_is_insightface_norm_crop_at_224(identity, reference_face):
    bgr, face = reference_face
    np.testing.assert_allclose(identity.bboxes[0], face.bbox[:4], atol=1e-3)
    assert identity.crops.shape == (1, 224, 224, 3)
    np.testing.assert_array_equal(identity.crops[0], official_crop(bgr, face))


def test_embedding_is_faceanalysis_normed_embedding(identity, reference_face):
    np.testing.assert_allclose(identity.embedding, reference_face[1].normed_embedding, atol=1e-5)


def test_clip_input_is_clip_image_processors(identity):
    import comfy.clip_model

    crop = identity.crops[0]
    host = comfy.clip_model.clip_preprocess(torch.from_numpy(crop[None].astype(np.float32) / 255.0))
    torch.testing.assert_close(host.float(), processor_pixels(crop), atol=1e-6, rtol=0)


def test_features_are_the_official_penultimate_hidden_states(identity, official_clip):
    expected = official_hidden(official_clip, processor_pixels(identity.crops[0]))[0].numpy()
    np.testing.assert_allclose(identity.clip_features[0], expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(identity.combined_clip_features, expected, atol=1e-5, rtol=1e-5)  # one shot
    # not the last layer, nor after the post-layernorm: those differ
    with torch.no_grad():
        out = official_clip(processor_pixels(identity.crops[0]), output_hidden_states=True)
    assert np.abs(out.hidden_states[-1][0].numpy() - expected).max() > 0.1
    assert np.abs(out.last_hidden_state[0].numpy() - expected).max() > 0.1


def test_unconditional_features_are_zeros_after_normalization(identity, official_clip):
    pixels = processor_pixels(identity.crops[0])
    expected = official_hidden(official_clip, torch.zeros_like(pixels))[0].numpy()
    np.testing.assert_allclose(identity.unconditional_clip_features, expected, atol=1e-5, rtol=1e-5)
    # cubiq's black photo (IPAdapterPlus.py:382) normalizes to -mean/std: another input, other features
    black = processor_pixels(np.zeros((224, 224, 3), np.uint8))
    assert np.abs(official_hidden(official_clip, black)[0].numpy() - expected).max() > 0.1


def _plus_v2(booted, tmp_path, base):
    path = af.write_adapter(tmp_path / af.release_file_name("faceid-plus-v2", base, ".safetensors"),
                            af.adapter_state_dict("faceid-plus", base, clip_hidden=clip_models.TINY_CLIP_WIDTH,
                                                  dtype=torch.float32))
    return booted.pack_module("attention.adapters").load_adapter(str(path))


@pytest.mark.parametrize("base", [af.SD15, af.SDXL])
def test_sd15_and_sdxl_plus_v2_read_the_224_crop(booted, tmp_path, ident, tiny, tiny_clip, official_clip, base):
    """Both official demos crop 224 px (IPAdapterFaceIDPlusXL keeps get_image_embeds): Apply with either
    adapter reads the features of the 224 crop, not those of cubiq's 256 px crop resized (SDXL)."""
    patch = booted.pack_module("attention.patch")
    adapter = _plus_v2(booted, tmp_path, base)
    identity = ident.multishot.encode_identity(tiny, [fm.tiny_face_image().astype(np.float32) / 255.0], outlier_threshold=-1.0,
                                     cache=None, clip_vision=tiny_clip)
    _, clip, uncond, _ = patch._identity_inputs(adapter, identity)
    official = official_hidden(official_clip, processor_pixels(identity.crops[0]))
    torch.testing.assert_close(clip, official, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond, official_hidden(official_clip, torch.zeros_like(processor_pixels(
        identity.crops[0]))), atol=1e-5, rtol=1e-5)


def test_crops_at_another_size_are_refused(ident, tiny_clip):
    crops = np.zeros((1, 256, 256, 3), np.uint8)
    with pytest.raises(ident.value.IdentityError, match=r"\(256, 256, 3\).*224x224.*Load CLIP Vision"):
        ident.multishot.encode_clip_crops(tiny_clip, crops)


@pytest.fixture(scope="module")
def tiny(booted):
    return booted.pack_module("encoders.faces").load_face_analyzer(fm.tiny_pack(), providers="cpu")


@pytest.mark.parametrize("s_scale", [1.0, 0.5])
def test_tokens_follow_get_image_embeds(booted, tmp_path, ident, tiny, tiny_clip, official_clip, s_scale):
    """Photo -> tokens, cond and uncond, against the official get_image_embeds data flow with the
    reference ProjPlusModel (shortcut=True, scale=s_scale) on the adapter file's own tensors."""
    patch = booted.pack_module("attention.patch")
    projection = booted.pack_module("attention.projection")
    adapter = _plus_v2(booted, tmp_path, af.SD15)
    identity = ident.multishot.encode_identity(tiny, [fm.tiny_face_image().astype(np.float32) / 255.0], outlier_threshold=-1.0,
                                     cache=None, clip_vision=tiny_clip)
    person = patch.add_person(None, identity, shortcut_scale=s_scale)[0]
    cond, uncond = patch._person_tokens(adapter, projection.projection_for(adapter), person)

    sd = {k: v.float() for k, v in adapter.image_proj.items()}
    reference = reference_projection.cubiq_image_proj_models().ProjModelFaceIdPlus(
        cross_attention_dim=sd["norm.weight"].shape[0], id_embeddings_dim=512,
        clip_embeddings_dim=clip_models.TINY_CLIP_WIDTH, num_tokens=4)
    reference.load_state_dict(sd)
    reference.eval()
    pixels = processor_pixels(identity.crops[0])
    faceid = torch.from_numpy(np.array(identity.normed_embeddings[:1]))
    with torch.no_grad():
        expected = reference(faceid, official_hidden(official_clip, pixels), scale=s_scale, shortcut=True)
        expected_uncond = reference(torch.zeros_like(faceid), official_hidden(official_clip, torch.zeros_like(pixels)),
                                    scale=s_scale, shortcut=True)
    torch.testing.assert_close(cond, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(uncond, expected_uncond, atol=1e-4, rtol=1e-4)
