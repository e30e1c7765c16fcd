"""encoders/identity.py on real ONNX files: multi-shot identities, outliers, mixing, files, the cache."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

from facestudio_testing import face_models as fm
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def faces(booted):
    return booted.pack_module("encoders.faces")


@pytest.fixture(scope="module")
def ident(booted):
    return identity_modules(booted)


@pytest.fixture(scope="module")
def tiny(faces):
    return faces.load_face_analyzer(fm.tiny_pack(), providers="auto")


@pytest.fixture(scope="module")
def real(faces):
    return faces.load_face_analyzer(fm.real_pack(), providers="auto")


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def t1_rgb():
    import insightface

    return np.ascontiguousarray(insightface.data.get_image("t1")[:, :, ::-1])


def comfy_float(rgb_uint8):
    return rgb_uint8.astype(np.float32) / 255.0


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def three_shots(astronaut, t1_rgb):
    """The astronaut, the astronaut mirrored and resized, and one of the six people of t1 (cropped)."""
    mirrored = cv2.resize(astronaut[:, ::-1], (300, 300), interpolation=cv2.INTER_AREA)
    stranger = np.ascontiguousarray(t1_rgb[:, : t1_rgb.shape[1] // 3])  # the leftmost people
    return [comfy_float(astronaut), comfy_float(mirrored), comfy_float(stranger)]


# ------------------------------------------------------------------------------------------------
# Multi-shot identities, real YuNet + SFace
# ------------------------------------------------------------------------------------------------
def test_outlier_shot_is_dropped_and_named(ident, faces, real, three_shots, caplog):
    with caplog.at_level(logging.WARNING, logger="FaceStudio.identity"):
        identity = ident.multishot.encode_identity(real, three_shots, cache=None)
    assert identity.used == (0, 1) and identity.photo_count == 3
    assert [d.image_index for d in identity.dropped] == [2] and "outlier" in identity.dropped[0].reason
    assert any("image 2" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # Threshold choice: the odd one is far below it, the two astronaut shots far above it.
    shots = [faces.detect_and_embed(real, p, image_index=i)[0] for i, p in enumerate(three_shots)]
    cosines = ident.multishot.outlier_cosines(np.stack([s.normed_embedding for s in shots]))
    assert cosines[2] < ident.multishot.DEFAULT_OUTLIER_THRESHOLD - 0.1 and min(cosines[:2]) > ident.multishot.DEFAULT_OUTLIER_THRESHOLD + 0.2
    # The combined embedding is the score-weighted mean of the kept shots, renormalized.
    expected = unit(sum(s.det_score * s.normed_embedding.astype(np.float64) for s in shots[:2]))
    np.testing.assert_allclose(identity.embedding, expected, atol=1e-6)
    np.testing.assert_array_equal(identity.normed_embeddings[1], shots[1].normed_embedding)
    np.testing.assert_array_equal(identity.embeddings[0], shots[0].embedding)
    assert identity.crops.shape == (2, 224, 224, 3) and identity.kps.shape == (2, 5, 2)
    np.testing.assert_allclose(identity.det_scores, [shots[0].det_score, shots[1].det_score])
    with pytest.raises(ValueError):
        identity.embedding[0] = 0  # a value
    assert "image 2 dropped" in identity.report()

    # Threshold -1 keeps everything; two shots are never judged.
    kept = ident.multishot.encode_identity(real, three_shots, outlier_threshold=-1.0)
    assert kept.used == (0, 1, 2) and not kept.dropped
    assert ident.multishot.encode_identity(real, three_shots[1:]).used == (0, 1)


def test_never_drops_below_one_shot(ident):
    rng = np.random.default_rng(0)
    rows = np.stack([unit(rng.standard_normal(64)) for _ in range(3)])
    dropped = ident.multishot.find_outliers(rows, 0.99)
    assert len(dropped) == 2


def test_score_weighted_mean(ident):
    a, b = np.eye(4, dtype=np.float32)[:2]
    combined = ident.value.combine_embeddings(np.stack([a, b]), np.array([0.9, 0.3], np.float32))
    np.testing.assert_allclose(combined, unit([0.9, 0.3, 0, 0]), atol=1e-7)


def test_missing_face_error_or_skip(ident, faces, real, astronaut, caplog):
    gradient = np.tile(np.linspace(0, 1, 256, dtype=np.float32)[None, :, None], (256, 1, 3))
    photos = [comfy_float(astronaut), gradient]
    with pytest.raises(faces.FaceNotFound) as error:
        ident.multishot.encode_identity(real, photos)
    assert error.value.image_index == 1
    with caplog.at_level(logging.WARNING, logger="FaceStudio.identity"):
        identity = ident.multishot.encode_identity(real, photos, on_missing="skip")
    assert identity.used == (0,) and identity.dropped[0].image_index == 1
    assert "no face" in identity.dropped[0].reason
    assert any("Skipping image 1" in r.getMessage() for r in caplog.records)
    with pytest.raises(ident.value.IdentityError, match="no usable face"):
        ident.multishot.encode_identity(real, [gradient, gradient], on_missing="skip")


def test_adding_shots_continues_the_numbering(ident, real, three_shots):
    first = ident.multishot.encode_identity(real, three_shots[:1])
    both = ident.multishot.encode_identity(real, three_shots[1:], base=first)  # photos of different sizes
    assert both.photo_count == 3 and both.used == (0, 1) and [d.image_index for d in both.dropped] == [2]
    whole = ident.multishot.encode_identity(real, three_shots)
    np.testing.assert_array_equal(both.embedding, whole.embedding)


# ------------------------------------------------------------------------------------------------
# Mixing
# ------------------------------------------------------------------------------------------------
def test_mix(ident, real, astronaut, t1_rgb):
    a = ident.multishot.encode_identity(real, [comfy_float(astronaut)])
    b = ident.multishot.encode_identity(real, [comfy_float(t1_rgb)], select="index", index=2)
    np.testing.assert_array_equal(ident.mixing.mix_identities([(a, 1.0), (b, 0.0)]).embedding, a.embedding)
    half = ident.mixing.mix_identities([(a, 0.5), (b, 0.5)])
    np.testing.assert_allclose(half.embedding, unit(a.embedding.astype(np.float64) + b.embedding), atol=1e-6)
    assert half.shot_count == 2 and half.used == (0, 1) and half.photo_count == 2
    with pytest.raises(ident.value.IdentityError, match="cancels"):
        ident.mixing.mix_identities([(a, 1.0), (a, -1.0)])
    with pytest.raises(ident.value.IdentityError, match="every mix weight is 0"):
        ident.mixing.mix_identities([(a, 0.0), (b, 0.0)])


def test_mixing_different_recognizers_is_refused(ident, real, tiny, astronaut):
    a = ident.multishot.encode_identity(real, [comfy_float(astronaut)])
    t = ident.multishot.encode_identity(tiny, [fm.tiny_face_image()])
    with pytest.raises(ident.value.IdentityError) as error:
        ident.mixing.mix_identities([(a, 0.5), (t, 0.5)])
    message = str(error.value)
    assert fm.REAL_RECOGNIZER in message and fm.TINY_RECOGNIZER in message and "different face recognizers" in message
    with pytest.raises(ident.value.IdentityError, match="cannot add shots"):
        ident.multishot.encode_identity(tiny, [fm.tiny_face_image()], base=a)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_exact(ident, real, three_shots, tmp_path):
    identity = ident.multishot.encode_identity(real, three_shots)
    path = ident.files.save_identity(identity, tmp_path / "me.safetensors")
    loaded = ident.files.load_identity(path)
    for name in ("embeddings", "normed_embeddings", "embedding", "crops", "det_scores", "bboxes", "kps"):
        a, b = getattr(identity, name), getattr(loaded, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    assert loaded.recognizer == identity.recognizer and loaded.used == identity.used
    assert [(d.image_index, d.reason) for d in loaded.dropped] == [(d.image_index, d.reason) for d in identity.dropped]
    assert loaded.photo_count == 3 and loaded.clip_features is None and loaded.clip_width is None


def _rewrite(path, tensors=None, metadata=None):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        meta = dict(handle.metadata())
    data = load_file(str(path))
    data.update(tensors or {})
    meta.update(metadata or {})
    save_file({k: v for k, v in data.items() if v is not None}, str(path), metadata=meta)


def test_bad_files_are_refused(ident, tiny, tmp_path):
    identity = ident.multishot.encode_identity(tiny, [fm.tiny_face_image()])
    good = ident.files.save_identity(identity, tmp_path / "good.safetensors")

    def variant(name, **changes):
        path = tmp_path / name
        path.write_bytes(good.read_bytes())
        _rewrite(path, **changes)
        return path

    with pytest.raises(ident.value.IdentityError, match="format version 3; this FaceStudio reads versions 1, 2"):
        ident.files.load_identity(variant("v3.safetensors", metadata={"format_version": "3"}))
    # Version 1 had no unconditional CLIP features: its files without CLIP features still read.
    old = ident.files.load_identity(variant("v1.safetensors", metadata={"format_version": "1"}))
    np.testing.assert_array_equal(old.embedding, identity.embedding)
    nan = identity.embedding.copy()
    nan[3] = np.nan
    with pytest.raises(ident.value.IdentityError, match="NaN or infinite values in 'embedding'"):
        ident.files.load_identity(variant("nan.safetensors", tensors={"embedding": nan}))
    missing = tmp_path / "missing.safetensors"
    from safetensors.numpy import load_file, save_file

    data = load_file(str(good))
    del data["kps"]
    save_file(data, str(missing), metadata={"format": "facestudio-identity", "format_version": "1"})
    with pytest.raises(ident.value.IdentityError, match="lacks .*kps"):
        ident.files.load_identity(missing)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ident.value.IdentityError, match="truncated or corrupt"):
        ident.files.load_identity(truncated)
    other = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(other))
    with pytest.raises(ident.value.IdentityError, match="not a FaceStudio identity file"):
        ident.files.load_identity(other)


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------
def test_second_encode_does_not_detect_again(ident, faces, tiny_pack_analyzer):
    analyzer = tiny_pack_analyzer
    calls = []
    real_detect = analyzer.detector.detect

    def counting(*args, **kwargs):
        calls.append(1)
        return real_detect(*args, **kwargs)

    analyzer.detector.detect = counting
    cache = ident.cache.FaceCache(max_entries=2)
    photos = [fm.tiny_face_image(), fm.tiny_face_image(((3, 9, "white"),))]
    first = ident.multishot.encode_identity(analyzer, photos, cache=cache)
    n = len(calls)
    assert n >= 2
    again = ident.multishot.encode_identity(analyzer, photos, cache=cache)
    assert len(calls) == n and cache.hits == 2
    np.testing.assert_array_equal(first.embedding, again.embedding)
    uncached = ident.multishot.encode_identity(analyzer, photos, cache=None)  # the cache changes nothing
    for name in ("embeddings", "crops", "bboxes", "kps", "det_scores"):
        np.testing.assert_array_equal(getattr(first, name), getattr(uncached, name))
    n = len(calls)
    # The same photo as float (what LoadImage gives) is the same content.
    ident.multishot.encode_identity(analyzer, [comfy_float(photos[0])], cache=cache)
    assert len(calls) == n
    # Bounded: a third photo evicts the least recently used one.
    ident.multishot.encode_identity(analyzer, [fm.tiny_face_image(((9, 9, "white"),))], cache=cache)
    assert len(cache) == 2
    ident.multishot.encode_identity(analyzer, photos[:1], cache=cache)  # photos[1] was evicted, photos[0] kept
    assert len(calls) == n + 1
    ident.multishot.encode_identity(analyzer, photos[1:], cache=cache)
    assert len(calls) == n + 2
    # A different detection setting is a different entry.
    analyzer.det_thresh = 0.6
    ident.multishot.encode_identity(analyzer, photos[:1], cache=cache)
    assert len(calls) == n + 3


@pytest.fixture
def tiny_pack_analyzer(faces):
    """A fresh analyzer: the cache test patches its detector."""
    return faces.load_face_analyzer(fm.tiny_pack(), providers="cpu")


def test_cached_faces_are_renumbered(ident, tiny):
    cache = ident.cache.FaceCache()
    photo = fm.tiny_face_image()
    identity = ident.multishot.encode_identity(tiny, [photo, photo, photo], cache=cache)
    assert identity.used == (0, 1, 2) and cache.hits == 2

