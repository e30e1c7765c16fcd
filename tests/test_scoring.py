"""Identity scoring (inspection/scoring.py, FaceStudio Identity Score) on real photos and real models.

The faces come from the trained YuNet + SFace pair (see facestudio_testing/face_models.py) on
insightface's six-person photo; the node tests run the host's real executor, photos through its
LoadImage and identities through FaceStudio Encode / Mix Identity.
"""
from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest

from facestudio_testing import face_models as fm
from facestudio_testing import face_photos as fp
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


# ------------------------------------------------------------------------------------------------
# Fixtures and oracles
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scoring(booted):
    return booted.pack_module("inspection.scoring")


@pytest.fixture(scope="module")
def identity(booted):
    return identity_modules(booted)


@pytest.fixture(scope="module")
def tiny(faces):
    return faces.load_face_analyzer(fm.tiny_pack(), providers="cpu")


@pytest.fixture(scope="module")
def people(identity, real, t1):
    """One identity per person of t1, from that photo, in left-to-right order."""
    return [identity.multishot.encode_identity(real, [t1], select="index", index=i, cache=None) for i in range(6)]


def greedy(matrix) -> list[tuple[int, int]]:
    """The best remaining pair first: what the scorer must not do."""
    matrix = np.array(matrix, np.float64)
    pairs = []
    for _ in range(min(matrix.shape)):
        f, r = np.unravel_index(int(np.argmax(matrix)), matrix.shape)
        pairs.append((int(f), int(r)))
        matrix[f, :] = -np.inf
        matrix[:, r] = -np.inf
    return sorted(pairs, key=lambda p: p[1])


def brute_force_best(matrix) -> float:
    """The highest summed similarity of any one-to-one pairing of min(F, R) pairs."""
    matrix = np.asarray(matrix, np.float64)
    faces, refs = matrix.shape
    if faces >= refs:
        return max(sum(matrix[f, r] for r, f in enumerate(chosen))
                   for chosen in itertools.permutations(range(faces), refs))
    return max(sum(matrix[f, r] for f, r in enumerate(chosen)) for chosen in itertools.permutations(range(refs), faces))


def total(matrix, pairs) -> float:
    return float(sum(np.asarray(matrix)[f, r] for f, r in pairs))


def strict_json(text: str):
    """json.loads refusing NaN / Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} in JSON output")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------------------
# Matching
# ------------------------------------------------------------------------------------------------
def test_optimal_assignment_is_not_greedy(scoring):
    # Face 0 looks most like identity 0, but face 1 only looks like identity 0: the optimum gives
    # identity 0 to face 1 and identity 1 to face 0.
    matrix = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert greedy(matrix) == [(0, 0), (1, 1)]  # 1.0 in all: the trap
    assert scoring.optimal_assignment(matrix) == [(1, 0), (0, 1)]  # 1.65

    # Rectangular traps, more faces than identities and the other way round.
    more_faces = np.array([[0.9, 0.8], [0.85, 0.1], [0.2, 0.3]])
    assert greedy(more_faces) == [(0, 0), (2, 1)]
    assert scoring.optimal_assignment(more_faces) == [(1, 0), (0, 1)]
    fewer_faces = more_faces.T.copy()  # face 0 looks like identities 0 and 1, face 1 only like identity 0
    assert greedy(fewer_faces) == [(0, 0), (1, 2)]
    assert scoring.optimal_assignment(fewer_faces) == [(1, 0), (0, 1)]
    assert scoring.optimal_assignment(np.zeros((0, 3))) == [] and scoring.optimal_assignment(np.zeros((2, 0))) == []
    with pytest.raises(scoring.ScoringError, match="NaN"):
        scoring.optimal_assignment(np.array([[0.5, np.nan]]))


def test_optimal_assignment_equals_brute_force_on_random_matrices(scoring):
    rng = np.random.default_rng(0)
    greedy_worse = 0
    for _ in range(300):
        shape = tuple(int(v) for v in rng.integers(1, 6, size=2))
        matrix = rng.uniform(-0.2, 1.0, size=shape)
        pairs = scoring.optimal_assignment(matrix)
        assert len(pairs) == min(shape)
        assert len({f for f, _ in pairs}) == len({r for _, r in pairs}) == len(pairs)
        assert total(matrix, pairs) == pytest.approx(brute_force_best(matrix), abs=1e-12)
        greedy_worse += total(matrix, greedy(matrix)) < total(matrix, pairs) - 1e-9
    assert greedy_worse > 20  # the random cases do include greedy traps


def test_similarity_matrix(scoring):
    a = np.array([[3.0, 0.0], [0.0, -2.0]])
    b = np.array([[1.0, 1.0], [0.0, 5.0]])
    np.testing.assert_allclose(scoring.similarity_matrix(a, b), [[2 ** -0.5, 0.0], [-(2 ** -0.5), -1.0]])
    assert scoring.similarity_matrix(np.zeros((0, 2)), b).shape == (0, 2)
    with pytest.raises(scoring.ScoringError, match="different recognizers"):
        scoring.similarity_matrix(np.ones((1, 3)), b)


# ------------------------------------------------------------------------------------------------
# Real faces
# ------------------------------------------------------------------------------------------------
def test_six_people_are_matched_to_their_own_shuffled_references(scoring, real, people, t1):
    order = [int(i) for i in np.random.default_rng(7).permutation(6)]
    assert order != list(range(6))
    named = [(f"identity_{k + 1}", people[person]) for k, person in enumerate(order)]
    result = scoring.score_images(real, [fp.comfy_float(t1)], named)
    (image,) = result.images
    assert image.status == scoring.OK and len(image.faces) == 6 and not image.unmatched_faces
    assert [(m.face, m.reference) for m in image.matches] == [(person, k) for k, person in enumerate(order)]
    matched = image.matched_matrix()
    diagonal = np.diag(matched)
    off = matched[~np.eye(6, dtype=bool)]
    assert diagonal.min() > 0.999  # the same photo: the same embedding
    assert off.max() < 0.5 and diagonal.min() - off.max() > 0.5
    data = strict_json(result.json_text())
    assert data["all_found"] and data["all_above_threshold"] and data["images"][0]["status"] == "ok"
    assert [m["face"] for m in data["images"][0]["matches"]] == order
    np.testing.assert_allclose(data["images"][0]["matched_matrix"], matched, atol=1e-6)

    # The same people in a mirrored, smaller copy: left-to-right order reversed, embeddings moved.
    mirrored = cv2.resize(t1[:, ::-1], (960, 664), interpolation=cv2.INTER_AREA)
    (image,) = scoring.score_images(real, [fp.comfy_float(mirrored)], named).images
    assert [(m.face, m.reference) for m in image.matches] == [(5 - person, k) for k, person in enumerate(order)]
    matched = image.matched_matrix()
    for k in range(6):
        others = np.delete(matched[k], k)
        assert matched[k, k] > 0.6 and matched[k, k] - others.max() > 0.25, (k, matched[k])


def test_no_face_more_faces_and_fewer_faces_are_stated(scoring, real, people, t1):
    named = [("identity_1", people[0]), ("identity_2", people[1]), ("identity_3", people[4])]
    photos = [fp.comfy_float(t1), fp.comfy_float(fp.t1_left(t1)), fp.comfy_float(fp.faceless(300, 400))]
    result = scoring.score_images(real, photos, named)
    full, left, empty = result.images
    data = strict_json(result.json_text())
    report = result.report()

    assert full.status == scoring.MORE_FACES and full.unmatched_faces == (2, 3, 5)
    assert data["images"][0]["status"] == "more_faces_than_identities"
    assert data["images"][0]["unmatched_faces"] == [2, 3, 5] and data["images"][0]["unmatched_identities"] == []
    assert "6 face(s) for 3 identities: more faces than identities, 3 face(s) left unmatched" in report
    assert "face 2: matched to no identity" in report

    assert left.status == scoring.FEWER_FACES and [(m.face, m.reference) for m in left.matches] == [(0, 0), (1, 1)]
    assert data["images"][1]["status"] == "fewer_faces_than_identities"
    assert data["images"][1]["unmatched_identities"] == ["identity_3"] and data["images"][1]["unmatched_faces"] == []
    assert data["images"][1]["per_identity"]["identity_3"] is None
    assert "identity_3: NOT FOUND (fewer faces than identities)" in report

    assert empty.status == scoring.NO_FACE and not empty.matches
    assert data["images"][2]["status"] == "no_face" and data["images"][2]["face_count"] == 0
    assert data["images"][2]["unmatched_identities"] == ["identity_1", "identity_2", "identity_3"]
    assert all(v is None for v in data["images"][2]["per_identity"].values())
    assert all(v is None for row in data["images"][2]["matched_matrix"] for v in row)
    assert "Image 2 (400x300): no face found" in report

    summary = data["summary"]
    assert summary["identity_3"]["found_in"] == [0] and summary["identity_3"]["missing_in"] == [1, 2]
    first = summary["identity_1"]
    assert first["found_in"] == [0, 1] and first["missing_in"] == [2]
    sims = [full.match_for(0).similarity, left.match_for(0).similarity]
    assert first["mean"] == pytest.approx(np.mean(sims), abs=1e-6)
    assert first["min"] == pytest.approx(min(sims), abs=1e-6)
    assert first["min"] < first["mean"] < 1.0  # the crop gives the face another embedding
    assert not data["all_found"]
    assert "identity_3: mean 1.000, min 1.000, found in 1 of 3 image(s); missing in image(s) 1, 2" in report


def test_threshold_only_labels(scoring, real, people, t1):
    named = [(f"identity_{k + 1}", people[k]) for k in range(2)]
    photo = [fp.comfy_float(fp.t1_left(t1))]
    loose = scoring.score_images(real, photo, named, threshold=0.4)
    strict = scoring.score_images(real, photo, named, threshold=0.95)
    pairs = [(m.face, m.reference) for m in loose.images[0].matches]
    assert pairs == [(m.face, m.reference) for m in strict.images[0].matches] == [(0, 0), (1, 1)]
    assert 0.4 < min(m.similarity for m in loose.images[0].matches) < 0.95
    assert loose.to_json()["all_above_threshold"] and "BELOW THRESHOLD" not in loose.report()
    assert not strict.to_json()["all_above_threshold"] and "BELOW THRESHOLD 0.95" in strict.report()
    assert strict.to_json()["summary"]["identity_1"]["below_threshold_in"] == [0]


def test_identities_of_another_recognizer_are_refused(scoring, faces, identity, real, tiny, people, tmp_path):
    tiny_person = identity.multishot.encode_identity(tiny, [fm.tiny_face_image()], cache=None)
    with pytest.raises(scoring.ScoringError) as error:
        scoring.score_images(real, [fp.faceless(64, 64)], [("identity_1", people[0]), ("identity_2", tiny_person)])
    message = str(error.value)
    assert "identity_2" in message and fm.TINY_RECOGNIZER in message and fm.REAL_RECOGNIZER in message
    assert "cannot be compared" in message and isinstance(error.value, ValueError)
    with pytest.raises(scoring.ScoringError, match="identity_1 was encoded with the face recognizer rec_sface"):
        scoring.score_images(tiny, [fp.faceless(64, 64)], [("identity_1", people[0])])

    # Same file name and width, other weights: refused by the file hash, not only the width.
    folder = tmp_path / "other_weights"
    folder.mkdir()
    (folder / fm.TINY_DETECTOR).write_bytes(fm.tiny_detector_model().SerializeToString())
    (folder / fm.TINY_RECOGNIZER).write_bytes(fm.tiny_recognizer_model(seed=1).SerializeToString())
    other = faces.load_face_analyzer(folder, providers="cpu")
    assert other.recognizer_id.file_name == tiny.recognizer_id.file_name
    assert other.recognizer_id.embedding_dim == tiny.recognizer_id.embedding_dim
    with pytest.raises(scoring.ScoringError, match=other.recognizer_id.sha256_16):
        scoring.score_images(other, [fp.faceless(64, 64)], [("identity_1", tiny_person)])
    # ... and the same pack scores it.
    result = scoring.score_images(tiny, [fm.tiny_face_image()], [("identity_1", tiny_person)])
    assert result.images[0].match_for(0).similarity > 0.999


# ------------------------------------------------------------------------------------------------
# The node, in the host's executor
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packs(comfy_host, booted):
    return fp.install_packs(booted.models)


@pytest.fixture(scope="module")
def photos(booted, t1):
    images = {"fs_t1.png": t1, "fs_t1_two.png": fp.t1_two(t1), "fs_t1_left.png": fp.t1_left(t1),
              "fs_faceless.png": fp.faceless()}
    fp.save_inputs(booted.base / "input", images)
    return images


def score_node(analyzer: str, image: str, identities: dict[str, str], threshold: float = 0.4) -> dict:
    inputs = {"image": [image, 0], "face_analyzer": [analyzer, 0], "threshold": threshold}
    inputs.update({name: [node, 0] for name, node in identities.items()})
    return {"class_type": "FaceStudioIdentityScore", "inputs": inputs}


def test_schemas(comfy_host):
    import nodes

    expected = {
        "FaceStudioIdentityScore": ["IMAGE", "STRING", "STRING"],
        "FaceStudioFacePreview": ["IMAGE"],
    }
    for node_id, outputs in expected.items():
        info = nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        assert info["category"] == "FaceStudio/faces" and info["output"] == outputs and info["output_node"], node_id
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in inputs.values()), node_id
    info = nodes.NODE_CLASS_MAPPINGS["FaceStudioIdentityScore"].GET_NODE_INFO_V1()
    assert info["input"]["required"]["identity_1"][0] == "FACESTUDIO_IDENTITY"
    assert sorted(info["input"]["optional"]) == [f"identity_{i}" for i in range(2, 9)]


def test_score_node_on_a_batch_in_the_executor(comfy_host, packs, photos, booted):
    real_pack, _ = packs
    order = [int(i) for i in np.random.default_rng(3).permutation(6)]
    prompt = {"1": fp.analyzer_node(real_pack), "2": fp.load_image("fs_t1.png")}
    for person in range(6):
        prompt[f"e{person}"] = fp.encode_node("1", "2", person)
    prompt["3"] = fp.load_image("fs_t1_two.png")
    prompt["4"] = fp.load_image("fs_faceless.png")
    prompt["5"] = fp.batch_node("2", "3")
    prompt["6"] = fp.batch_node("5", "4")
    prompt["7"] = score_node("1", "6", {f"identity_{k + 1}": f"e{person}" for k, person in enumerate(order)})
    result = comfy_host.run(prompt)
    assert result.success, result.error

    batch = comfy_host.output(result, "6")
    annotated, report, text = (comfy_host.output(result, "7", i) for i in range(3))
    assert tuple(annotated.shape) == tuple(batch.shape) == (3, 886, 1280, 3)
    assert not np.array_equal(annotated[0].numpy(), batch[0].numpy())
    data = strict_json(text)
    assert data["recognizer"]["file"] == fm.REAL_RECOGNIZER
    assert data["identities"] == [f"identity_{k}" for k in range(1, 7)]
    full, two, empty = data["images"]
    assert full["status"] == "ok"
    expected = [(f"identity_{k + 1}", person) for k, person in enumerate(order)]
    assert [(m["identity"], m["face"]) for m in full["matches"]] == expected
    matched = np.array(full["matched_matrix"], np.float64)
    assert np.diag(matched).min() > 0.999 and matched[~np.eye(6, dtype=bool)].max() < 0.5
    assert np.array(full["similarity"]).shape == (6, 6)

    assert two["status"] == "fewer_faces_than_identities" and two["face_count"] == 2
    found = {m["identity"]: m["face"] for m in two["matches"]}
    assert found == {f"identity_{order.index(0) + 1}": 0, f"identity_{order.index(1) + 1}": 1}
    assert sorted(two["unmatched_identities"]) == sorted(f"identity_{order.index(p) + 1}" for p in range(2, 6))
    assert empty["status"] == "no_face" and len(empty["unmatched_identities"]) == 6

    leftmost = data["summary"][f"identity_{order.index(0) + 1}"]
    assert leftmost["found_in"] == [0, 1] and leftmost["missing_in"] == [2]
    assert leftmost["mean"] == pytest.approx(np.mean(leftmost["similarities"][:2]), abs=1e-6)
    assert leftmost["min"] == pytest.approx(min(leftmost["similarities"][:2]), abs=1e-6)
    assert "Image 2 (1280x886): no face found" in report and "NOT FOUND (fewer faces than identities)" in report
    assert result.ui["7"]["text"] == [report] and len(result.ui["7"]["images"]) == 3


def test_score_node_pairs_by_optimal_assignment(comfy_host, packs, photos, booted):
    """Two mixed identities that make greedy pairing fail: identity_1 leans to person 0 but has some
    of person 1; identity_3 (identity_2 left unconnected) is person 0 with some of person 2 (absent
    from the photo)."""
    drawing = booted.pack_module("inspection.drawing")
    real_pack, _ = packs
    mix = lambda a, b, w: {"class_type": "FaceStudioIdentityMix",  # noqa: E731
                           "inputs": {"identity_a": [a, 0], "identity_b": [b, 0], "weight": w,
                                      "weight_c": 0.0, "weight_d": 0.0}}
    prompt = {
        "1": fp.analyzer_node(real_pack), "2": fp.load_image("fs_t1.png"),
        "e0": fp.encode_node("1", "2", 0), "e1": fp.encode_node("1", "2", 1), "e2": fp.encode_node("1", "2", 2),
        "m1": mix("e0", "e1", 0.4), "m2": mix("e0", "e2", 0.45),
        "3": fp.load_image("fs_t1_left.png"),
        "4": score_node("1", "3", {"identity_1": "m1", "identity_3": "m2"}),
    }
    result = comfy_host.run(prompt)
    assert result.success, result.error
    data = strict_json(comfy_host.output(result, "4", 2))
    assert data["identities"] == ["identity_1", "identity_3"]
    (image,) = data["images"]
    matrix = np.array(image["similarity"], np.float64)
    pairs = sorted(((m["face"], m["identity_index"]) for m in image["matches"]), key=lambda p: p[1])
    assert greedy(matrix) == [(0, 0), (1, 1)]  # the premise: the best single pair is face 0 - identity_1
    assert pairs == [(1, 0), (0, 1)]
    assert total(matrix, pairs) == pytest.approx(brute_force_best(matrix), abs=1e-5)
    assert total(matrix, pairs) > total(matrix, greedy(matrix)) + 0.1
    assert [m["identity"] for m in image["matches"]] == ["identity_1", "identity_3"]
    # The annotated image: each face boxed in its identity's colour, by socket (identity_3: the third).
    annotated = comfy_host.output(result, "4").numpy()[0]
    for face, colour in ((1, 0), (0, 2)):
        x1, y1, _, y2 = image["faces"][face]["bbox"]
        pixel = annotated[int(round((y1 + y2) / 2)), int(round(x1))]
        assert np.rint(pixel * 255).astype(int).tolist() == list(drawing.person_colour(colour)), face


def test_score_node_refuses_identities_of_another_recognizer(comfy_host, packs, photos):
    real_pack, tiny_pack = packs
    prompt = {
        "1": fp.analyzer_node(real_pack), "2": fp.load_image("fs_t1.png"), "e0": fp.encode_node("1", "2", 0),
        "8": fp.analyzer_node(tiny_pack),
        "9": score_node("8", "2", {"identity_1": "e0"}),
    }
    result = comfy_host.run(prompt)
    assert not result.success and result.error_node == "9"
    assert fm.REAL_RECOGNIZER in result.error and fm.TINY_RECOGNIZER in result.error
    assert "identity_1" in result.error and "cannot be compared" in result.error
