"""The face preview (inspection/drawing.py, FaceStudio Face Preview) on insightface's six-person photo
with the trained YuNet + SFace pack, and in the host's real executor."""
from __future__ import annotations

import numpy as np
import pytest

from facestudio_testing import face_models as fm
from facestudio_testing import face_photos as fp

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def drawing(booted):
    return booted.pack_module("inspection.drawing")


@pytest.fixture(scope="module")
def detected(faces, real, t1):
    bboxes, kpss, _ = faces.detect_faces(real, faces.to_bgr_uint8(t1))
    assert len(bboxes) == 6
    return bboxes, kpss


def as_bytes(pixels) -> np.ndarray:
    return np.rint(np.asarray(pixels, np.float64) * 255).astype(int)


def left_edge(bbox) -> tuple[int, int]:
    """(row, column) of the middle of a box's left edge, where draw_box's line runs."""
    return int(round((float(bbox[1]) + float(bbox[3])) / 2)), int(round(float(bbox[0])))


def half_size_masks() -> np.ndarray:
    """Three region masks at half the photo's size: mask 0 bottom left, mask 1 (at 0.5) bottom
    right, mask 2 empty. At full size: rows 520-800 of columns 0-300 and 900-1280."""
    masks = np.zeros((3, 443, 640), np.float32)
    masks[0, 260:400, 0:150] = 1.0
    masks[1, 260:400, 450:640] = 0.5
    return masks


# ------------------------------------------------------------------------------------------------
# Order
# ------------------------------------------------------------------------------------------------
def test_face_numbers_are_the_ones_encode_identity_uses(drawing, faces, real, t1, detected):
    bboxes, _ = detected
    ranked = [bboxes[i, :4] for i in faces.face_order(bboxes, "left-to-right")]
    embedded = faces.detect_and_embed(real, t1, select="left-to-right")
    np.testing.assert_allclose(np.stack(ranked), np.stack([f.bbox for f in embedded]), atol=1e-4)
    (largest,) = faces.detect_and_embed(real, t1, select="largest")
    np.testing.assert_allclose(bboxes[faces.face_order(bboxes, "largest")[0], :4], largest.bbox, atol=1e-4)
    for k in range(6):
        (chosen,) = faces.detect_and_embed(real, t1, select="index", index=k)
        np.testing.assert_allclose(ranked[k], chosen.bbox, atol=1e-4)
    # Equal areas: the higher detection score first, as Encode Identity's "largest" picks.
    boxes = np.array([[0, 0, 10, 10, 0.5], [20, 0, 30, 10, 0.9], [40, 0, 45, 5, 0.99]])
    assert faces.face_order(boxes, "left-to-right") == [0, 1, 2]
    assert faces.face_order(boxes, "largest") == [1, 0, 2]
    assert faces.face_order(np.zeros((0, 5)), "largest") == []
    with pytest.raises(faces.FaceError, match="order must be one of left-to-right, largest"):
        faces.face_order(boxes, "right-to-left")


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------
def test_each_face_is_drawn_in_its_numbers_colour(faces, drawing, t1, detected):
    bboxes, kpss = detected
    image = fp.comfy_float(t1)
    out = drawing.draw_preview(image, bboxes, kpss)
    assert out.shape == image.shape and out.dtype == np.float32
    for k, row in enumerate(faces.face_order(bboxes, "left-to-right")):
        colour = list(drawing.person_colour(k))
        assert as_bytes(out[left_edge(bboxes[row])]).tolist() == colour, k
        for x, y in kpss[row]:
            assert as_bytes(out[int(round(y)), int(round(x))]).tolist() == colour, k
    assert len({drawing.person_colour(k) for k in range(6)}) == 6
    # Below the faces (lowest box bottom: y = 472) nothing is drawn: the input's pixels, exactly.
    assert np.array_equal(out[520:], image[520:])
    assert not np.array_equal(out[:520], image[:520])

    by_size = drawing.draw_preview(image, bboxes, kpss, order="largest")
    largest = faces.face_order(bboxes, "largest")[0]
    assert as_bytes(by_size[left_edge(bboxes[largest])]).tolist() == list(drawing.person_colour(0))
    assert largest != faces.face_order(bboxes, "left-to-right")[0]


def test_region_masks_are_tinted_in_their_persons_colour(drawing, faces, t1, detected):
    bboxes, kpss = detected
    image = fp.comfy_float(t1)
    out = drawing.draw_preview(image, bboxes, kpss, masks=half_size_masks(), opacity=0.4)
    assert out.shape == image.shape

    def tinted(y, x, colour, alpha):
        return (t1[y, x].astype(np.float64) * (1 - alpha) + np.asarray(colour) * alpha) / 255.0

    # Inside mask 0 (value 1) and mask 1 (value 0.5), away from their labels; resized to full size.
    for y, x in ((525, 5), (795, 295), (790, 10)):
        np.testing.assert_allclose(out[y, x], tinted(y, x, drawing.person_colour(0), 0.4), atol=0.6 / 255)
    for y, x in ((525, 905), (795, 1275)):
        np.testing.assert_allclose(out[y, x], tinted(y, x, drawing.person_colour(1), 0.2), atol=0.6 / 255)
    # Between the masks and above them: untouched.
    assert np.array_equal(out[520:, 320:880], image[520:, 320:880])
    assert np.array_equal(out[480:510, 300:900], image[480:510, 300:900])
    # "mask 0" is written on a label of mask 0's colour, centred deep inside it (about 660, 150).
    window = as_bytes(out[620:700, 60:240])
    assert (window == drawing.person_colour(0)).all(axis=2).sum() > 200
    # Mask 2 is empty: said in the banner at the top left.
    assert as_bytes(out[2, 2]).tolist() == list(drawing.BANNER)
    # No masks: nothing of that.
    plain = drawing.draw_preview(image, bboxes, kpss)
    assert np.array_equal(plain[520:], image[520:]) and as_bytes(plain[2, 2]).tolist() == t1[2, 2].tolist()

    one = drawing.draw_preview(image, bboxes, kpss, masks=half_size_masks()[0], opacity=0.4)  # a single [H, W] mask
    np.testing.assert_array_equal(one[790, 10], out[790, 10])
    with pytest.raises(faces.FaceError, match=r"expected a MASK batch \[M, H, W\]"):
        drawing.draw_preview(image, bboxes, kpss, masks=np.zeros((2, 3, 4, 5), np.float32))


def test_no_face_is_said_on_the_image(drawing, faces, real):
    image = fp.comfy_float(fp.faceless(300, 400))
    bboxes, kpss, _ = faces.detect_faces(real, faces.to_bgr_uint8(image))
    assert len(bboxes) == 0
    (out,) = drawing.preview_batch(real, image[None])
    assert out.shape == image.shape
    assert as_bytes(out[2, 2]).tolist() == list(drawing.BANNER)
    assert np.array_equal(out[100:], image[100:])


def test_pixels_not_drawn_keep_their_values_and_alpha(faces, drawing, t1, detected):
    bboxes, kpss = detected
    rng = np.random.default_rng(0)
    rgba = np.concatenate([fp.comfy_float(t1), rng.uniform(0, 1, t1.shape[:2] + (1,)).astype(np.float32)], axis=2)
    rgba[..., :3] = np.clip(rgba[..., :3] + 0.0007, 0, 1)  # off the 8-bit grid, as a generated image is
    out = drawing.draw_preview(rgba, bboxes, kpss)
    assert out.shape == rgba.shape
    np.testing.assert_array_equal(out[..., 3], rgba[..., 3])
    np.testing.assert_array_equal(out[520:], rgba[520:])
    first = left_edge(bboxes[faces.face_order(bboxes)[0]])
    assert as_bytes(out[first][:3]).tolist() == list(drawing.person_colour(0))


# ------------------------------------------------------------------------------------------------
# The node, in the host's executor
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packs(comfy_host, booted):
    return fp.install_packs(booted.models)


@pytest.fixture(scope="module")
def photos(booted, t1):
    masks = (half_size_masks() * 255).astype(np.uint8)
    images = {"fs_t1.png": t1, "fs_t1_two.png": fp.t1_two(t1),
              "fs_mask_0.png": np.repeat(masks[0][:, :, None], 3, axis=2),
              "fs_mask_1.png": np.repeat(masks[1][:, :, None], 3, axis=2)}
    fp.save_inputs(booted.base / "input", images)
    return images


def test_preview_node_in_the_executor(comfy_host, packs, photos, drawing, faces, real):
    real_pack, _ = packs
    prompt = {
        "1": fp.analyzer_node(real_pack),
        "2": fp.load_image("fs_t1.png"), "3": fp.load_image("fs_t1_two.png"), "4": fp.batch_node("2", "3"),
        "5": fp.load_image("fs_mask_0.png"), "6": fp.load_image("fs_mask_1.png"), "7": fp.batch_node("5", "6"),
        "8": {"class_type": "ImageToMask", "inputs": {"image": ["7", 0], "channel": "red"}},
        "9": {"class_type": "FaceStudioFacePreview",
              "inputs": {"image": ["4", 0], "face_analyzer": ["1", 0], "order": "left-to-right",
                         "masks": ["8", 0], "mask_opacity": 0.4}},
    }
    result = comfy_host.run(prompt)
    assert result.success, result.error
    batch, masks, out = comfy_host.output(result, "4"), comfy_host.output(result, "8"), comfy_host.output(result, "9")
    assert tuple(out.shape) == tuple(batch.shape) == (2, 886, 1280, 3) and tuple(masks.shape) == (2, 443, 640)
    for i in range(2):
        photo = batch[i].numpy()
        bboxes, kpss, _ = faces.detect_faces(real, faces.to_bgr_uint8(photo))
        assert len(bboxes) == (6 if i == 0 else 2)
        expected = drawing.draw_preview(photo, bboxes, kpss, masks=masks.numpy(), opacity=0.4)
        np.testing.assert_array_equal(out[i].numpy(), expected)
        first = faces.face_order(bboxes)[0]
        assert as_bytes(out[i, left_edge(bboxes[first])[0], left_edge(bboxes[first])[1]].numpy()).tolist() == \
            list(drawing.person_colour(0))
    assert len(result.ui["9"]["images"]) == 2
