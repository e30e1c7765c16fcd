"""Identity mixing follows its weights for every adapter kind, Portrait included: Portrait takes every
shot as tokens, so a mix that only concatenated the shots weighed the people by their shot counts
(0.3 / 0.7 of a 3-shot and a 2-shot person gave them 3/5 and 2/5 of the tokens, whatever the weights)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from facestudio_testing import adapter_files as af
from facestudio_testing import face_models as fm
from facestudio_testing.identity_modules import identity_modules


def comfy_float(rgb_uint8: np.ndarray) -> np.ndarray:
    return rgb_uint8.astype(np.float32) / 255.0


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def mods(booted):
    return identity_modules(booted), booted.pack_module("attention.patch")


def variants(photo: np.ndarray, count: int) -> list[np.ndarray]:
    """The photo, mirrored, and 3/4 the size: `count` shots of one person."""
    small = cv2.resize(photo, (photo.shape[1] * 3 // 4, photo.shape[0] * 3 // 4), interpolation=cv2.INTER_AREA)
    return [comfy_float(p) for p in [photo, np.ascontiguousarray(photo[:, ::-1]), small][:count]]


@pytest.fixture(scope="module")
def two_people(booted, mods):
    """Two of t1's real people through the real YuNet + SFace (128-d): three shots of one, two of the other."""
    import insightface

    analyzer = booted.pack_module("encoders.faces").load_face_analyzer(fm.real_pack(), providers="cpu")
    t1 = np.ascontiguousarray(insightface.data.get_image("t1")[:, :, ::-1])
    third = t1.shape[1] // 3
    a, b = (mods[0].multishot.encode_identity(analyzer, variants(np.ascontiguousarray(t1[:, c * third:(c + 1) * third]), n),
                                    outlier_threshold=-1.0) for c, n in ((0, 3), (2, 2)))
    assert (a.shot_count, b.shot_count) == (3, 2)
    return a, b


@pytest.fixture(scope="module")
def two_512_people(booted, mods):
    """The same shot counts with the tiny 512-d recognizer the FaceID adapters' width needs."""
    analyzer = booted.pack_module("encoders.faces").load_face_analyzer(fm.tiny_pack(), providers="cpu")
    a, b = (mods[0].multishot.encode_identity(analyzer, variants(fm.tiny_face_image(((6, 6, colour),)), n),
                                    outlier_threshold=-1.0) for colour, n in (("white", 3), ("green", 2)))
    assert (a.shot_count, b.shot_count) == (3, 2)
    return a, b


@pytest.fixture(scope="module")
def portrait(booted, tmp_path_factory):
    adapters = booted.pack_module("attention.adapters")
    folder = tmp_path_factory.mktemp("mix_adapters")
    return {kind: adapters.load_adapter(str(af.write_adapter(folder / f"{kind}.safetensors",
                                                             af.shared_state_dict(kind, af.SD15))))
            for kind in ("faceid-portrait", "faceid-portrait-unnorm")}


def test_portrait_rows_of_a_mix_are_the_weighted_blend_of_the_people(mods, two_people):
    ident = mods[0]
    a, b = two_people
    mix = ident.mixing.mix_identities([(a, 0.3), (b, 0.7)])
    rows = mix.shot_rows(normed=True)
    assert rows.shape == (3, a.embedding_dim)  # as many as the larger person has shots
    for k in range(3):
        expected = unit(0.3 * a.normed_embeddings[k].astype(np.float64) + 0.7 * b.normed_embeddings[k % 2])
        np.testing.assert_allclose(rows[k], expected, atol=1e-6)
        raw_norm = 0.3 * np.linalg.norm(a.embeddings[k]) + 0.7 * np.linalg.norm(b.embeddings[k % 2])  # |w| sum 1
        np.testing.assert_allclose(mix.shot_rows(normed=False)[k], expected * raw_norm, rtol=1e-5)
    # One person, or a person mixed with themselves, keeps their own shots.
    np.testing.assert_array_equal(a.shot_rows(), a.normed_embeddings)
    np.testing.assert_allclose(ident.mixing.mix_identities([(a, 0.3), (a, 0.7)]).shot_rows(), a.normed_embeddings,
                               atol=1e-6)


@pytest.mark.parametrize("kind", ["faceid-portrait", "faceid-portrait-unnorm"])
def test_portrait_tokens_follow_the_mix_weights_not_the_shot_counts(mods, two_512_people, portrait, kind):
    """Through the adapter's own inputs and projection: the identity side of a 0.3 / 0.7 mix is closer to
    the person weighted 0.7, and swapping the weights swaps that; with weights 1 / 0 it is that person."""
    ident, patch = mods
    adapter = portrait[kind]
    a, b = two_512_people

    def rows(identity):
        return patch._identity_inputs(adapter, identity)[0]

    def closeness(mixed, person):  # mean cosine of the mix's rows to the person's combined embedding
        x = torch.nn.functional.normalize(rows(mixed).double(), dim=-1)
        return float((x @ torch.from_numpy(person.embedding).double()).mean())

    toward_b = ident.mixing.mix_identities([(a, 0.3), (b, 0.7)])
    toward_a = ident.mixing.mix_identities([(a, 0.7), (b, 0.3)])
    assert not torch.allclose(rows(toward_a), rows(toward_b))
    assert closeness(toward_b, b) > closeness(toward_b, a)
    assert closeness(toward_a, a) > closeness(toward_a, b)
    assert torch.equal(rows(ident.mixing.mix_identities([(a, 1.0), (b, 0.0)])), rows(a))


def test_a_saved_mix_keeps_its_portrait_rows(mods, two_people, tmp_path):
    ident = mods[0]
    mix = ident.mixing.mix_identities([(two_people[0], 0.3), (two_people[1], 0.7)])
    loaded = ident.files.load_identity(ident.files.save_identity(mix, tmp_path / "mix.safetensors"))
    for normed in (True, False):
        assert loaded.shot_rows(normed).tobytes() == mix.shot_rows(normed).tobytes()
