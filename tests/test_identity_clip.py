"""CLIP vision features of the face crops (FaceID Plus): encode_identity(clip_vision=...), mixing,
files and the Encode Identity node's optional clip_vision input, on the tiny face pack and a tiny
seeded CLIP vision model built by the host's own class. The node is run through its execute method
(as tests/test_style.py does), not through the executor: no CLIP vision file is built for the
host's loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facestudio_testing import clip_models
from facestudio_testing import face_models as fm
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def ident(booted):
    return identity_modules(booted)


@pytest.fixture(scope="module")
def tiny(booted):
    return booted.pack_module("encoders.faces").load_face_analyzer(fm.tiny_pack(), providers="cpu")


@pytest.fixture(scope="module")
def other_clip(booted, tmp_path_factory):
    return clip_models.tiny_clip_vision(tmp_path_factory.mktemp("clip_other"), seed=1)


def photo(cells):
    return fm.tiny_face_image(cells).astype(np.float32) / 255.0


PHOTOS = [photo(((6, 6, "white"),)), photo(((4, 9, "white"),)), photo(((8, 5, "green"),))]


def encode(ident, tiny, photos=PHOTOS, **kwargs):
    return ident.multishot.encode_identity(tiny, photos, outlier_threshold=-1.0, cache=None, **kwargs)


def separately(clip, crops):
    """Each crop through the CLIP model on its own."""
    rows = [clip.encode_image(torch.from_numpy(c[None].astype(np.float32) / 255.0))["penultimate_hidden_states"]
            for c in crops]
    return torch.cat(rows).detach().float().numpy()


def weighted_mean(features, scores):
    w = np.asarray(scores, np.float64)
    return np.tensordot(w, np.asarray(features, np.float64), axes=1) / w.sum()


def test_features_are_the_score_weighted_mean_of_each_crop(ident, tiny, tiny_clip):
    identity = encode(ident, tiny, clip_vision=tiny_clip)
    n = identity.shot_count
    assert n == 3 and identity.clip_width == clip_models.TINY_CLIP_WIDTH
    assert identity.clip_features.shape == (n, clip_models.TINY_CLIP_TOKENS, clip_models.TINY_CLIP_WIDTH)
    assert identity.combined_clip_features.shape == identity.clip_features.shape[1:]
    assert identity.clip_features.dtype == np.float32 and not identity.clip_features.flags.writeable
    per_crop = separately(tiny_clip, identity.crops)
    np.testing.assert_allclose(identity.clip_features, per_crop, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(identity.combined_clip_features, weighted_mean(per_crop, identity.det_scores),
                               rtol=1e-4, atol=1e-5)
    # The crop is square at the model's size: crop and no-crop preprocessing agree.
    batch = torch.from_numpy(identity.crops.astype(np.float32) / 255.0)
    torch.testing.assert_close(tiny_clip.encode_image(batch, crop=False)["penultimate_hidden_states"],
                               tiny_clip.encode_image(batch)["penultimate_hidden_states"])
    assert "CLIP" in identity.report()
    # Without a CLIP model: none, and the rest is unchanged.
    plain = encode(ident, tiny)
    assert plain.clip_features is None and plain.clip_width is None and plain.combined_clip_features is None
    np.testing.assert_array_equal(plain.embedding, identity.embedding)


def test_unequal_scores_weigh_the_shots(ident):
    features = np.stack([np.full((2, 3), 1.0), np.full((2, 3), 4.0)]).astype(np.float32)
    np.testing.assert_allclose(ident.value.combine_clip_features(features, np.array([0.75, 0.25])), np.full((2, 3), 1.75))


def test_adding_shots_needs_the_clip_model_again(ident, tiny, tiny_clip):
    first = encode(ident, tiny, PHOTOS[:1], clip_vision=tiny_clip)
    with pytest.raises(ident.value.IdentityError, match="CLIP vision"):
        encode(ident, tiny, PHOTOS[1:], base=first)
    both = encode(ident, tiny, PHOTOS[1:], base=first, clip_vision=tiny_clip)
    whole = encode(ident, tiny, clip_vision=tiny_clip)
    assert both.used == whole.used and both.clip_features.shape == whole.clip_features.shape
    np.testing.assert_allclose(both.clip_features, whole.clip_features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both.combined_clip_features, whole.combined_clip_features, rtol=1e-5, atol=1e-6)
    # A base without CLIP features gets them for its shots too.
    late = encode(ident, tiny, PHOTOS[1:], base=encode(ident, tiny, PHOTOS[:1]), clip_vision=tiny_clip)
    np.testing.assert_allclose(late.clip_features, whole.clip_features, rtol=1e-5, atol=1e-6)
    with pytest.raises(ident.value.IdentityError, match="CLIP vision model"):
        encode(ident, tiny, PHOTOS[:1], clip_vision=object())


def test_mixing_clip_features(ident, tiny, tiny_clip):
    a = encode(ident, tiny, PHOTOS[:2], clip_vision=tiny_clip)
    b = encode(ident, tiny, PHOTOS[2:], clip_vision=tiny_clip)
    kept = ident.mixing.mix_identities([(a, 1.0), (b, 0.0)])
    np.testing.assert_array_equal(kept.combined_clip_features, a.combined_clip_features)
    np.testing.assert_array_equal(kept.clip_features, a.clip_features)
    mixed = ident.mixing.mix_identities([(a, 0.7), (b, 0.3)])
    assert mixed.clip_width == a.clip_width and mixed.clip_features.shape[0] == 3
    np.testing.assert_allclose(mixed.combined_clip_features,
                               0.7 * a.combined_clip_features.astype(np.float64) + 0.3 * b.combined_clip_features,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mixed.clip_features, np.concatenate([a.clip_features, b.clip_features]))
    without = encode(ident, tiny, PHOTOS[2:])
    with pytest.raises(ident.value.IdentityError, match="with and without CLIP"):
        ident.mixing.mix_identities([(a, 0.5), (without, 0.5)])
    assert ident.mixing.mix_identities([(a, 1.0), (without, 0.0)]) is a  # a weight-0 identity is left out
    narrow = ident.value.FaceIdentity(**{**{f: getattr(b, f) for f in (
        "embeddings", "normed_embeddings", "embedding", "recognizer", "crops", "det_scores", "bboxes", "kps",
        "used", "dropped", "photo_count")}, "clip_features": b.clip_features[:, :, :16].copy(), "clip_width": 16,
        "combined_clip_features": b.combined_clip_features[:, :16].copy(),
        "unconditional_clip_features": b.unconditional_clip_features[:, :16].copy()})
    with pytest.raises(ident.value.IdentityError, match="differ in shape"):
        ident.mixing.mix_identities([(a, 0.5), (narrow, 0.5)])


def test_save_load_round_trip(ident, tiny, tiny_clip, tmp_path):
    identity = encode(ident, tiny, clip_vision=tiny_clip)
    loaded = ident.files.load_identity(ident.files.save_identity(identity, tmp_path / "clip.safetensors"))
    assert loaded.clip_width == identity.clip_width
    np.testing.assert_array_equal(loaded.clip_features, identity.clip_features)
    np.testing.assert_array_equal(loaded.combined_clip_features, identity.combined_clip_features)
    np.testing.assert_array_equal(loaded.embedding, identity.embedding)
    # A file with per-shot features but not the combined ones is refused.
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    path = tmp_path / "clip.safetensors"
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    del tensors["combined_clip_features"]
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=metadata)
    with pytest.raises(ident.value.IdentityError, match="combined_clip_features"):
        ident.files.load_identity(tmp_path / "broken.safetensors")


def test_node_clip_input(comfy_host, ident, tiny, tiny_clip):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["FaceStudioIdentityEncode"]
    optional = cls.GET_NODE_INFO_V1()["input"]["optional"]
    assert optional["clip_vision"][0] == "CLIP_VISION" and "FaceID Plus" in optional["clip_vision"][1]["tooltip"]
    images = torch.from_numpy(np.stack(PHOTOS[:2]))
    args = dict(face_analyzer=tiny, image=images, face="largest", index=0, on_missing="error", outlier_threshold=-1.0)
    out, report = cls.execute(**args, clip_vision=tiny_clip).result
    assert isinstance(out, ident.value.FaceIdentity) and out.clip_width == clip_models.TINY_CLIP_WIDTH and "CLIP" in report
    np.testing.assert_allclose(out.combined_clip_features,
                               weighted_mean(separately(tiny_clip, out.crops), out.det_scores), rtol=1e-4, atol=1e-5)
    plain = cls.execute(**args).result[0]
    assert plain.clip_features is None
    with pytest.raises(ident.value.IdentityError, match="CLIP vision"):
        cls.execute(**args, identity=out)
