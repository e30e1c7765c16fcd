"""Automatic regions (encoders/regions.py, FaceStudio Regions): from the faces of insightface's
six-person photo with the trained YuNet + SFace pack, from splits, feathered; and in the host's real
executor, feeding FaceStudio Person -> Apply -> KSampler and the host's ConditioningSetMask."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facestudio_testing import adapter_files as af
from facestudio_testing import face_models as fm
from facestudio_testing import face_photos as fp
from facestudio_testing import graphs

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

FACEID = "fs_regions_faceid_sd15.safetensors"


@pytest.fixture(scope="module")
def regions(booted):
    return booted.pack_module("encoders.regions")


@pytest.fixture(scope="module")
def drawing(booted):
    return booted.pack_module("inspection.drawing")


@pytest.fixture(scope="module")
def left_to_right(faces, real, t1):
    """The six face boxes in Encode Identity's left-to-right order (its `index`)."""
    embedded = faces.detect_and_embed(real, t1, select="left-to-right")
    assert len(embedded) == 6
    return np.stack([f.bbox for f in embedded])


@pytest.fixture(scope="module")
def on_t1(regions, real, t1):
    image = fp.comfy_float(t1)
    return {mode: regions.face_regions(real, image, 6, mode) for mode in ("grow", "partition")}


def centre(box) -> tuple[int, int]:
    """(row, column) of the pixel under a box's centre."""
    return int((box[1] + box[3]) / 2), int((box[0] + box[2]) / 2)


def interior(box) -> tuple[slice, slice]:
    """The pixels whose centres lie inside a box (x1 y1 x2 y2), as index slices."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return (slice(int(np.ceil(y1 - 0.5)), int(np.floor(y2 - 0.5)) + 1),
            slice(int(np.ceil(x1 - 0.5)), int(np.floor(x2 - 0.5)) + 1))


def borders(labels: np.ndarray, radius: int) -> np.ndarray:
    """True where a (2 radius + 1)^2 window around the pixel holds more than one label."""
    import cv2

    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    as_float = labels.astype(np.float32)
    return cv2.dilate(as_float, kernel, borderType=cv2.BORDER_REPLICATE) != \
        cv2.erode(as_float, kernel, borderType=cv2.BORDER_REPLICATE)


# ------------------------------------------------------------------------------------------------
# From faces
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["grow", "partition"])
def test_six_regions_left_to_right_each_holding_its_own_face_only(regions, on_t1, left_to_right, mode):
    result = on_t1[mode]
    masks = result.masks
    assert masks.shape == (6, 886, 1280) and masks.dtype == np.float32
    assert set(np.unique(masks)) <= {0.0, 1.0}  # unfeathered: hard
    np.testing.assert_allclose(result.faces[:, :4], left_to_right, atol=1e-4)  # Encode Identity's numbering
    total = masks.sum(axis=0)
    assert total.max() == 1.0  # never two regions on one pixel
    for i, box in enumerate(left_to_right):
        assert (masks[i][interior(box)] == 1.0).all(), i  # its whole face box
        for j, other in enumerate(left_to_right):
            assert masks[i][centre(other)] == (1.0 if i == j else 0.0), (i, j)
        assert np.array_equal(masks[i] == 1.0, result.labels == i)
    if mode == "partition":
        assert (total == 1.0).all()  # covers the image
    else:
        assert 0.1 < (total == 0.0).mean() < 0.5  # leaves the background to nobody


def test_partition_is_the_nearest_face_centre(regions, on_t1, left_to_right):
    labels = on_t1["partition"].labels
    centres = np.stack([(left_to_right[:, 0] + left_to_right[:, 2]) / 2,
                        (left_to_right[:, 1] + left_to_right[:, 3]) / 2], axis=1)
    rng = np.random.default_rng(0)
    for y, x in zip(rng.integers(0, 886, 400), rng.integers(0, 1280, 400)):
        inside = [i for i, b in enumerate(left_to_right) if b[0] <= x + 0.5 <= b[2] and b[1] <= y + 0.5 <= b[3]]
        distance = ((centres - (x + 0.5, y + 0.5)) ** 2).sum(axis=1)
        assert labels[y, x] == (inside[0] if inside else int(np.argmin(distance))), (y, x)
    # Size-weighted: the largest face (2) claims more, the smallest (5) less.
    weighted = regions.face_labels(left_to_right, 886, 1280, "partition", size_weighted=True)
    areas = [(weighted == i).sum() - (labels == i).sum() for i in range(6)]
    assert areas[2] > 0 and areas[5] < 0
    for i, box in enumerate(left_to_right):
        assert weighted[centre(box)] == i


def test_grow_reaches_down_the_body_inside_its_rectangle(regions, on_t1, left_to_right):
    labels = on_t1["grow"].labels
    grown = regions.GrowShape().boxes(left_to_right)
    ys, xs = np.mgrid[0:886, 0:1280] + 0.5
    for i, (box, (gx1, gy1, gx2, gy2)) in enumerate(zip(left_to_right, grown)):
        mine = labels == i
        assert ((xs[mine] >= gx1) & (xs[mine] <= gx2) & (ys[mine] >= gy1) & (ys[mine] <= gy2)).all(), i
        height = box[3] - box[1]
        row, column = int(box[3] + 2.9 * height), int((box[0] + box[2]) / 2)  # towards the waist
        assert labels[min(row, 885), column] == i, i
        below = int(box[3] + 3.2 * height)  # past grow_down = 3
        if below < 886:
            assert labels[below, column] != i, i
    # Wider with grow_width, and up to the image's bottom with a long grow_down.
    wide = regions.face_labels(left_to_right[:1], 886, 1280, "grow", regions.GrowShape(width=5.0, down=6.0))
    assert (wide == 0).sum() > (labels == 0).sum() and wide[885, 111] == 0
    with pytest.raises(regions.RegionError, match="grow width must be at least 1 face width"):
        regions.GrowShape(width=0.5)


def test_ties_go_to_the_face_further_left(regions):
    two = np.array([[10, 10, 21, 20], [30, 10, 41, 20]], np.float64)  # centres x = 15.5 and 35.5
    labels = regions.face_labels(two, 30, 50, "partition")
    assert (labels[:, :26] == 0).all() and (labels[:, 26:] == 1).all()  # pixel 25 (centre 25.5) ties: face 0
    overlapping = np.array([[10, 10, 30, 30], [20, 10, 40, 30]], np.float64)  # boxes overlap on x 20..30
    labels = regions.face_labels(overlapping, 40, 50, "grow")
    assert (labels[15, 20:25] == 0).all() and (labels[15, 25:30] == 1).all()  # nearer centre in the overlap


def test_more_faces_than_count_takes_the_largest_and_fewer_is_a_clear_error(drawing, regions, booted, real, t1,
                                                                            left_to_right):
    image = fp.comfy_float(t1)
    two = regions.face_regions(real, image, 2, "partition")
    areas = (left_to_right[:, 2] - left_to_right[:, 0]) * (left_to_right[:, 3] - left_to_right[:, 1])
    largest = sorted(np.argsort(-areas)[:2])  # faces 0 and 2, kept in left-to-right order
    assert largest == [0, 2]
    np.testing.assert_allclose(two.faces[:, :4], left_to_right[largest], atol=1e-4)
    assert len(two.unused) == 4 and two.masks.shape == (2, 886, 1280)
    assert (two.masks.sum(axis=0) == 1.0).all()
    drawn = drawing.draw_regions(two, image)  # the faces left out: boxed in grey
    for box in left_to_right[[1, 3, 4, 5]]:
        row, column = int(round((box[1] + box[3]) / 2)), int(round(box[0]))
        assert np.rint(drawn[row, column] * 255).tolist() == list(drawing.UNMATCHED)

    with pytest.raises(regions.RegionError) as error:
        regions.face_regions(real, image, 7, "grow")
    message = str(error.value)
    assert "The layout image (1280x886) has 6 faces but count asks for 7 persons" in message
    assert "Set count to 6 or fewer" in message and "Face Preview" in message
    with pytest.raises(regions.RegionError, match=r"The layout image \(400x300\) has no face the analyzer can find"):
        regions.face_regions(real, fp.comfy_float(fp.faceless(300, 400)), 1, "partition")
    with pytest.raises(regions.RegionError, match="a batch of 2 images; regions are made from one"):
        regions.face_regions(real, np.stack([image, image]), 2, "grow")


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------
def rectangles(masks: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each mask's support, checked to be a filled rectangle of 1s."""
    out = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert (mask[top:bottom, left:right] == 1.0).all() and mask.sum() == (bottom - top) * (right - left)
        out.append((int(top), int(bottom), int(left), int(right)))
    return out


@pytest.mark.parametrize("mode, count, columns, expected", [
    ("columns", 3, 0, [(0, 50, 0, 33), (0, 50, 33, 66), (0, 50, 66, 100)]),
    ("rows", 4, 0, [(0, 12, 0, 100), (12, 25, 0, 100), (25, 37, 0, 100), (37, 50, 0, 100)]),
    ("grid", 4, 0, [(0, 25, 0, 50), (0, 25, 50, 100), (25, 50, 0, 50), (25, 50, 50, 100)]),
    ("grid", 5, 0, [(0, 25, 0, 33), (0, 25, 33, 66), (0, 25, 66, 100), (25, 50, 0, 50), (25, 50, 50, 100)]),
    ("grid", 5, 2, [(0, 16, 0, 50), (0, 16, 50, 100), (16, 33, 0, 50), (16, 33, 50, 100), (33, 50, 0, 100)]),
    ("columns", 1, 0, [(0, 50, 0, 100)]),
])
def test_splits_are_the_expected_rectangles_and_sum_to_one(regions, mode, count, columns, expected):
    result = regions.split_regions(mode, count, 50, 100, columns=columns)
    assert result.masks.shape == (count, 50, 100) and result.masks.dtype == np.float32
    assert rectangles(result.masks) == expected
    assert (result.masks.sum(axis=0) == 1.0).all()


def test_bad_splits_are_clear_errors(regions):
    with pytest.raises(regions.RegionError, match="9 columns do not fit in a width of 8 pixels"):
        regions.split_regions("columns", 9, 8, 8)
    with pytest.raises(regions.RegionError, match="count must be a whole number of persons, 1 or more"):
        regions.split_regions("rows", 0, 8, 8)
    with pytest.raises(regions.RegionError, match="split mode must be one of columns, rows, grid"):
        regions.split_regions("diagonal", 2, 8, 8)


# ------------------------------------------------------------------------------------------------
# Feathering
# ------------------------------------------------------------------------------------------------
def test_linear_feathering_is_a_ramp_across_the_border(regions):
    feather = 6
    masks = regions.split_regions("columns", 2, 20, 64, feather=feather, feather_shape="linear").masks
    row = masks[0, 10].astype(np.float64)
    border = 32
    ramp = row[border - feather - 1:border + feather + 1]
    np.testing.assert_allclose(np.diff(ramp), -1.0 / (2 * feather + 1), atol=1e-5)
    assert (row[:border - feather] == 1.0).all() and (row[border + feather:] == 0.0).all()
    assert ((masks[0] + masks[1]) <= 1.0).all() and ((masks[0] + masks[1]) > 1.0 - 1e-5).all()
    assert (masks[:, :, :] == masks[:, :1, :]).all()  # a vertical border: every row the same


def test_gaussian_feathering_is_soft_symmetric_and_local(regions):
    feather = 8
    masks = regions.split_regions("columns", 2, 10, 64, feather=feather).masks
    row = masks[0, 5].astype(np.float64)
    assert 0.5 < row[31] < 1.0 and 0.0 < row[32] < 0.5
    np.testing.assert_allclose(row[31 - np.arange(feather)] + row[32 + np.arange(feather)], 1.0, atol=1e-5)
    assert (np.diff(row) <= 0).all()
    assert (row[:32 - feather] == 1.0).all() and (row[32 + feather:] == 0.0).all()


@pytest.mark.parametrize("mode", ["partition", "grow"])
@pytest.mark.parametrize("shape", ["gaussian", "linear"])
def test_feathered_face_regions_stay_in_range_and_sum_to_at_most_one(regions, real, t1, on_t1, mode, shape):
    feather = 24
    soft = regions.face_regions(real, fp.comfy_float(t1), 6, mode, feather=feather, feather_shape=shape)
    masks, hard = soft.masks, on_t1[mode]
    assert masks.dtype == np.float32 and masks.min() >= 0.0 and masks.max() <= 1.0
    total = masks.sum(axis=0)
    assert total.max() <= 1.0  # exactly: no rounding slack
    if mode == "partition":
        assert total.min() > 1.0 - 1e-4
    soft_pixels = (masks > 0) & (masks < 1)
    assert soft_pixels.any(axis=0).mean() > 0.05  # the borders really are soft
    far = ~borders(hard.labels, feather)  # farther than `feather` from every border: unchanged
    np.testing.assert_array_equal(masks[:, far], hard.masks[:, far])
    for i, box in enumerate(hard.faces):
        assert masks[i][centre(box)] == 1.0


def test_bad_feathering_is_a_clear_error(regions):
    with pytest.raises(regions.RegionError, match="feather shape must be one of gaussian, linear"):
        regions.split_regions("rows", 2, 8, 8, feather=2, feather_shape="cubic")
    with pytest.raises(regions.RegionError, match="feather must be a whole number of pixels"):
        regions.split_regions("rows", 2, 8, 8, feather=-1)


# ------------------------------------------------------------------------------------------------
# Preview
# ------------------------------------------------------------------------------------------------
def test_preview_tints_each_region_in_its_persons_colour(drawing, regions, booted, on_t1, t1):
    split = regions.split_regions("columns", 3, 60, 90)
    out = drawing.draw_regions(split)
    assert out.shape == (60, 90, 3) and out.dtype == np.float32
    for i, x in enumerate((2, 32, 62)):
        grey = drawing.SPLIT_CANVAS_GREY
        expected = np.rint(grey * (1 - drawing.DEFAULT_OPACITY) + np.asarray(drawing.person_colour(i)) *
                           drawing.DEFAULT_OPACITY)
        np.testing.assert_array_equal(np.rint(out[2, x] * 255), expected)

    result = on_t1["partition"]
    image = fp.comfy_float(t1)
    drawn = drawing.draw_regions(result, image)
    assert drawn.shape == image.shape
    for i, box in enumerate(result.faces):  # each face box in its person's colour
        row, column = int(round((box[1] + box[3]) / 2)), int(round(box[0]))
        assert np.rint(drawn[row, column] * 255).tolist() == list(drawing.person_colour(i)), i
    # Bottom left belongs to person 0, bottom right to person 5: tinted in their colours.
    for (y, x), i in (((880, 5), 0), ((880, 1275), 5)):
        assert result.labels[y, x] == i
        expected = (t1[y, x] * (1 - drawing.DEFAULT_OPACITY) + np.asarray(drawing.person_colour(i)) *
                    drawing.DEFAULT_OPACITY)
        np.testing.assert_allclose(drawn[y, x] * 255, expected, atol=0.6)


# ------------------------------------------------------------------------------------------------
# The node, in the host's executor
# ------------------------------------------------------------------------------------------------
def regions_node(mode: str, count: int, analyzer: str | None = None, image: str | None = None, **settings) -> dict:
    inputs = {"mode": mode, "count": count, "width": 64, "height": 64, "feather": 0, "feather_shape": "gaussian",
              "grow_width": 3.0, "grow_up": 0.5, "grow_down": 3.0, "size_weighted": False, "grid_columns": 0}
    inputs.update(settings)
    if analyzer is not None:
        inputs["face_analyzer"] = [analyzer, 0]
    if image is not None:
        inputs["image"] = [image, 0]
    return {"class_type": "FaceStudioRegions", "inputs": inputs}


def test_schema(comfy_host):
    import nodes
    from comfy_api.latest import io

    info = nodes.NODE_CLASS_MAPPINGS["FaceStudioRegions"].GET_NODE_INFO_V1()
    assert info["category"] == "FaceStudio/faces" and info["output"] == ["MASK", "IMAGE", "STRING"]
    assert info["output_node"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    boxes = ["boxes"] if hasattr(io, "BoundingBox") else []  # the host's BOUNDING_BOX type, where it has one
    assert sorted(info["input"]["optional"]) == sorted(["face_analyzer", "image", "segments"] + boxes)
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert inputs["mode"][1]["options"] == ["grow", "partition", "segments", "columns", "rows", "grid"]
    # New inputs are sockets after every widget: saved workflows' widget values keep their places.
    order = info["input_order"]["required"] + info["input_order"]["optional"]
    assert order[-1 - len(boxes):] == ["segments"] + boxes
    assert inputs["segments"][0] == "MASK"
    if boxes:
        assert inputs["boxes"][0] == "BOUNDING_BOX" and inputs["boxes"][1]["forceInput"]


def test_schema_defines_without_the_hosts_bounding_box_type(comfy_host, monkeypatch):
    """ComfyUI 0.3.64 and 0.3.50 have no io.BoundingBox: the node defines there, without boxes."""
    import nodes
    from comfy_api.latest import io

    if hasattr(io, "BoundingBox"):
        monkeypatch.delattr(io, "BoundingBox")
    schema = nodes.NODE_CLASS_MAPPINGS["FaceStudioRegions"].define_schema()
    assert [i.id for i in schema.inputs][-2:] == ["grid_columns", "segments"]


@pytest.fixture(scope="module")
def packs(comfy_host, booted):
    return fp.install_packs(booted.models)


@pytest.fixture(scope="module")
def t1_input(booted, t1):
    fp.save_inputs(booted.base / "input", {"fs_regions_t1.png": t1})
    return "fs_regions_t1.png"


@pytest.mark.parametrize("mode", ["grow", "partition"])
def test_node_from_faces_in_the_executor(drawing, comfy_host, packs, t1_input, regions, real, t1, mode):
    real_pack, _ = packs
    prompt = {"1": fp.analyzer_node(real_pack), "2": fp.load_image(t1_input),
              "3": regions_node(mode, 6, "1", "2", feather=4)}
    result = comfy_host.run(prompt)
    assert result.success, result.error
    masks, preview = comfy_host.output(result, "3", 0), comfy_host.output(result, "3", 1)
    expected = regions.face_regions(real, fp.comfy_float(t1), 6, mode, feather=4)
    assert masks.dtype == torch.float32 and tuple(masks.shape) == (6, 886, 1280)
    np.testing.assert_array_equal(masks.numpy(), expected.masks)
    assert tuple(preview.shape) == (1, 886, 1280, 3)
    np.testing.assert_array_equal(preview[0].numpy(), drawing.draw_regions(expected, fp.comfy_float(t1)))
    assert len(result.ui["3"]["images"]) == 1


def test_node_errors_in_the_executor(comfy_host, packs, t1_input):
    real_pack, _ = packs
    prompt = {"1": fp.analyzer_node(real_pack), "2": fp.load_image(t1_input), "3": regions_node("grow", 7, "1", "2")}
    result = comfy_host.run(prompt)
    assert not result.success and result.error_node == "3"
    assert "The layout image (1280x886) has 6 faces but count asks for 7 persons" in result.error
    result = comfy_host.run({"3": regions_node("partition", 2)})
    assert not result.success and result.error_node == "3"
    assert "connect a layout image and a face analyzer" in result.error


def test_split_node_takes_the_image_size_or_width_and_height(comfy_host, t1_input):
    result = comfy_host.run({"2": fp.load_image(t1_input), "3": regions_node("rows", 3, image="2"),
                             "4": regions_node("grid", 3, width=40, height=24)})
    assert result.success, result.error
    by_image, by_size = comfy_host.output(result, "3", 0), comfy_host.output(result, "4", 0)
    assert tuple(by_image.shape) == (3, 886, 1280) and tuple(by_size.shape) == (3, 24, 40)
    assert rectangles(by_size.numpy()) == [(0, 12, 0, 20), (0, 12, 20, 40), (12, 24, 0, 40)]
    assert tuple(comfy_host.output(result, "4", 1).shape) == (1, 24, 40, 3)


# ---- masks into FaceStudio Person -> Apply -> KSampler, and into ConditioningSetMask ----


@pytest.fixture(scope="module")
def sampling(comfy_host, booted, tiny_sd15, packs):
    import folder_paths

    fp.save_inputs(booted.base / "input", {"fs_regions_a.png": fm.tiny_face_image(),
                                           "fs_regions_b.png": fm.tiny_face_image(((6, 6, "green"),))})
    adapter = af.write_adapter(booted.models / "ipadapter" / FACEID, af.shared_state_dict("faceid", af.SD15))
    folder_paths.filename_list_cache.pop("ipadapter", None)
    yield tiny_sd15
    adapter.unlink()
    folder_paths.filename_list_cache.pop("ipadapter", None)


def region_mask_node(masks: list, index: int) -> dict:
    return {"class_type": "FaceStudioRegionMask", "inputs": {"masks": masks, "index": index}}


def one_mask(g: graphs.Graph, masks: list, index: int) -> list:
    """Mask `index` of a MASK batch (FaceStudio Region Mask)."""
    return [g.add(**region_mask_node(masks, index)), 0]


def two_person_graph(checkpoint: str, masks_to_persons: bool, swap: bool = False) -> graphs.Graph:
    """Two persons left and right (a columns split), each with its own prompt in its region through
    ConditioningSetMask, and (when `masks_to_persons`) its own identity region in FaceStudio Person."""
    g = graphs.txt2img(checkpoint, output="latent", seed=7, steps=1)
    g.add("FaceStudioRegions", regions_node("columns", 2, width=64, height=64)["inputs"], "regions")
    prompts = []
    for i, text in enumerate(("a woman with red hair", "a man with a beard")):
        encoded = g.add("CLIPTextEncode", {"text": text, "clip": g.clip})
        mask = one_mask(g, g.link("regions"), i)
        prompts.append(g.add("ConditioningSetMask", {"conditioning": [encoded, 0], "mask": mask, "strength": 1.0,
                                                     "set_cond_area": "default"}, f"prompt{i}"))
    combined = g.add("ConditioningCombine", {"conditioning_1": [prompts[0], 0], "conditioning_2": [prompts[1], 0]})
    g.prompt[g["sampler"]]["inputs"]["positive"] = [combined, 0]
    add_two_persons_and_apply(g, g.link("regions") if masks_to_persons else None, swap)
    return g


def add_two_persons_and_apply(g: graphs.Graph, masks: list | None, swap: bool) -> None:
    """Persons from fs_regions_a.png and fs_regions_b.png (mask_index 0 and 1 of `masks`, or 1 and 0 with
    `swap`; no region without masks), applied with FaceStudio Apply before the sampler."""
    persons = None
    for i, photo in enumerate(("fs_regions_a.png", "fs_regions_b.png")):
        g.add("FaceStudioFaceAnalyzerLoader", {"pack": fm.TINY_PACK, "provider": "CPU", "det_size": 640},
              f"analyzer{i}")
        g.add("LoadImage", {"image": photo}, f"photo{i}")
        g.add("FaceStudioIdentityEncode", {"face_analyzer": g.link(f"analyzer{i}"), "image": g.link(f"photo{i}"),
                                           "face": "largest", "index": 0, "on_missing": "error",
                                           "outlier_threshold": 0.4}, f"identity{i}")
        inputs = {"identity": g.link(f"identity{i}"), "weight": 1.0, "start": 0.0, "end": 1.0,
                  "mask_index": (1 - i) if swap else i}
        if masks is not None:
            inputs["mask"] = masks
        if persons is not None:
            inputs["persons"] = persons
        persons = [g.add("FaceStudioPerson", inputs), 0]
    loader = g.add("FaceStudioAdapterLoader", {"adapter_name": FACEID, "kind": "auto"})
    g.insert_model_node("FaceStudioApply", {"adapter": [loader, 0], "persons": persons, "alpha": 0.5,
                                            "style_weight": 1.0})


def test_split_regions_route_two_persons_and_per_person_prompts(comfy_host, sampling):
    latents = {}
    for case, kwargs in (("masked", {"masks_to_persons": True}), ("unmasked", {"masks_to_persons": False}),
                         ("swapped", {"masks_to_persons": True, "swap": True})):
        g = two_person_graph(sampling, **kwargs)
        result = comfy_host.run(g.prompt)
        assert result.success, (case, result.error)
        latents[case] = comfy_host.output(result, g["sampler"])["samples"]
        masks = comfy_host.output(result, g["regions"])
        assert rectangles(masks.numpy()) == [(0, 64, 0, 32), (0, 64, 32, 64)]
        for i in range(2):  # each prompt carries its person's region
            ((_, options),) = comfy_host.output(result, g[f"prompt{i}"])
            assert torch.equal(options["mask"], masks[i:i + 1]), (case, i)
    assert torch.isfinite(latents["masked"]).all()
    assert (latents["masked"] - latents["unmasked"]).abs().max() > 1e-3
    assert (latents["masked"] - latents["swapped"]).abs().max() > 1e-3


# ---- one person's mask: FaceStudio Region Mask ----
def test_region_mask_is_mask_i_as_a_batch_of_one_copied(regions):
    batch = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    for i in range(3):
        picked = regions.region_mask(batch, i)
        assert picked.shape == (1, 5, 7) and picked.dtype == torch.float32
        assert torch.equal(picked, batch[i:i + 1])
    regions.region_mask(batch, 1).fill_(2.0)  # a copy: the batch is never changed through it
    assert batch.max() < 1.0
    single = batch[2].numpy()  # one mask [H, W] is a batch of one, numpy stays numpy
    assert np.array_equal(regions.region_mask(single, 0), single[None])
    assert isinstance(regions.region_mask(single, 0), np.ndarray)


def test_region_mask_out_of_range_says_how_many_masks_there_are(regions):
    batch = torch.zeros(2, 4, 4)
    for index in (2, 5, -1):
        with pytest.raises(regions.RegionError, match=rf"index {index} is out of range: the mask batch has 2 masks "
                                                      r"\(index 0 to 1\)"):
            regions.region_mask(batch, index)
    with pytest.raises(regions.RegionError, match=r"has 1 mask \(index 0\)"):
        regions.region_mask(batch[0], 1)
    with pytest.raises(regions.RegionError, match=r"the mask batch is empty \(0 masks of 4x4\)"):
        regions.region_mask(torch.zeros(0, 4, 4), 0)
    with pytest.raises(regions.RegionError, match=r"expected a MASK batch \[N, H, W\]"):
        regions.region_mask(torch.zeros(1, 2, 4, 4), 0)


def test_region_mask_schema(comfy_host):
    import nodes

    info = nodes.NODE_CLASS_MAPPINGS["FaceStudioRegionMask"].GET_NODE_INFO_V1()
    assert info["category"] == "FaceStudio/faces" and info["output"] == ["MASK"] and info["output_name"] == ["mask"]
    assert info["input_order"] == {"required": ["masks", "index"]}
    masks, index = info["input"]["required"]["masks"], info["input"]["required"]["index"]
    assert masks[0] == "MASK" and index[0] == "INT"
    person = nodes.NODE_CLASS_MAPPINGS["FaceStudioPerson"].GET_NODE_INFO_V1()["input"]
    person = {**person["required"], **person.get("optional", {})}["mask_index"][1]
    assert {k: index[1][k] for k in ("default", "min", "max")} == {k: person[k] for k in ("default", "min", "max")}
    assert all(spec[1].get("tooltip") for spec in info["input"]["required"].values()) and info["output_tooltips"][0]


def test_region_mask_node_gives_what_person_mask_index_picks(comfy_host, packs, fixed_segments, booted):
    """In the executor: Region Mask (index i) is exactly mask i of the batch, and a Person fed by it gets
    the same mask, bit for bit, as a Person fed the whole batch with mask_index i."""
    fp.save_inputs(booted.base / "input", {"fs_region_mask.png": fm.tiny_face_image()})
    _, tiny_pack = packs
    # Soft values, not only 0 and 1: any change of a value (a float round trip) would show.
    masks = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(3))
    original = masks.clone()
    fixed_segments["region mask"] = (masks, [[]])
    prompt = {"1": fp.analyzer_node(tiny_pack), "2": fp.load_image("fs_region_mask.png"),
              "3": {"class_type": "FaceStudioIdentityEncode",
                    "inputs": {"face_analyzer": ["1", 0], "image": ["2", 0], "face": "largest", "index": 0,
                               "on_missing": "error", "outlier_threshold": 0.4}},
              "4": {"class_type": "FSTestFixedSegments", "inputs": {"key": "region mask"}}}

    def person(mask: list, mask_index: int) -> dict:
        return {"class_type": "FaceStudioPerson", "inputs": {"identity": ["3", 0], "weight": 1.0, "start": 0.0,
                                                             "end": 1.0, "mask": mask, "mask_index": mask_index}}

    for i in range(3):  # node i1: Region Mask i; i2: a Person fed by it; i3: a Person fed the batch, mask_index i
        prompt[f"{i}1"] = region_mask_node(["4", 0], i)
        prompt[f"{i}2"] = person([f"{i}1", 0], 0)
        prompt[f"{i}3"] = person(["4", 0], i)
        for k in (2, 3):
            prompt[f"{i}{k}9"] = {"class_type": "PreviewAny", "inputs": {"source": [f"{i}{k}", 0]}}
    result = comfy_host.run(prompt)
    assert result.success, result.error
    for i in range(3):
        picked = comfy_host.output(result, f"{i}1")
        assert picked.dtype == torch.float32 and picked.shape == (1, 24, 40)
        assert torch.equal(picked, masks[i:i + 1]), i
        (by_node,), (by_index,) = comfy_host.output(result, f"{i}2"), comfy_host.output(result, f"{i}3")
        assert by_node.mask.dtype == by_index.mask.dtype and torch.equal(by_node.mask, by_index.mask), i
    assert torch.equal(masks, original)  # the batch is untouched


def test_region_mask_node_out_of_range_is_a_clear_error(comfy_host, fixed_segments):
    fixed_segments["two masks"] = (torch.ones(2, 8, 8), [[]])
    prompt = {"1": {"class_type": "FSTestFixedSegments", "inputs": {"key": "two masks"}},
              "2": region_mask_node(["1", 0], 2),
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    result = comfy_host.run(prompt)
    assert not result.success and result.error_node == "2"
    assert ("index 2 is out of range: the mask batch has 2 masks (index 0 to 1). Set index to one of those, or "
            "make more masks (FaceStudio Regions' count).") in result.error



# ---- a person's prompt in their region: FaceStudio Region Prompt ----
REGION_TEXTS = ("a woman with red hair", "a man with a beard")


def per_person_prompts_graph(checkpoint: str, one_node: bool) -> graphs.Graph:
    """The whole-image prompt plus each person's prompt in their column: through FaceStudio Region Prompt
    (`one_node`), or through the host's own chain, CLIP Text Encode -> Region Mask -> ConditioningSetMask ->
    ConditioningCombine, which is what it must equal."""
    g = graphs.txt2img(checkpoint, output="latent", seed=7, steps=2)
    g.add("FaceStudioRegions", regions_node("columns", 2, width=64, height=64)["inputs"], "regions")
    combined = g.link("positive")
    for i, text in enumerate(REGION_TEXTS):
        if one_node:
            g.add("FaceStudioRegionPrompt", {"clip": g.clip, "text": text, "masks": g.link("regions"),
                                             "mask_index": i, "strength": 0.9, "conditioning": combined}, f"c{i}")
        else:
            encoded = g.add("CLIPTextEncode", {"text": text, "clip": g.clip})
            masked = g.add("ConditioningSetMask", {"conditioning": [encoded, 0], "mask": one_mask(g, g.link("regions"), i),
                                                   "strength": 0.9, "set_cond_area": "default"})
            g.add("ConditioningCombine", {"conditioning_1": combined, "conditioning_2": [masked, 0]}, f"c{i}")
        combined = g.link(f"c{i}")
    g.prompt[g["sampler"]]["inputs"]["positive"] = combined
    return g


def test_region_prompt_equals_the_hosts_three_node_chain(comfy_host, tiny_sd15):
    outputs = {}
    for one_node in (True, False):
        g = per_person_prompts_graph(tiny_sd15, one_node)
        result = comfy_host.run(g.prompt)
        assert result.success, result.error
        outputs[one_node] = (comfy_host.output(result, g["c1"]), comfy_host.output(result, g["sampler"])["samples"])
    (ours, latent), (chain, chain_latent) = outputs[True], outputs[False]
    assert len(ours) == len(chain) == 3  # the whole image's prompt, then person 0's and person 1's
    for (tensor, options), (tensor_chain, options_chain) in zip(ours, chain):
        assert torch.equal(tensor, tensor_chain)
        assert options.keys() == options_chain.keys()
        for key, value in options.items():
            assert (torch.equal(value, options_chain[key]) if torch.is_tensor(value) else value == options_chain[key]), key
    assert "mask" not in ours[0][1] and ours[1][1]["mask_strength"] == 0.9 and ours[2][1]["mask"].shape == (1, 64, 64)
    assert not torch.equal(ours[1][1]["mask"], ours[2][1]["mask"])
    assert torch.equal(latent, chain_latent)


def test_region_prompt_alone_and_its_errors(comfy_host, tiny_sd15):
    g = per_person_prompts_graph(tiny_sd15, True)
    del g.prompt[g["c0"]]["inputs"]["conditioning"]  # without conditioning: this region's prompt alone
    g.set("c1", mask_index=2)
    result = comfy_host.run(g.prompt)
    assert not result.success and result.error_node == g["c1"]
    assert "index 2 is out of range: the mask batch has 2 masks (index 0 to 1)" in result.error
    g.set("c1", mask_index=1)
    result = comfy_host.run(g.prompt)
    assert result.success, result.error
    assert [bool(options.get("mask") is not None) for _, options in comfy_host.output(result, g["c1"])] == [True, True]

# ------------------------------------------------------------------------------------------------
# From segment masks (what SAM3 Detect gives with individual_masks on) and person boxes
# ------------------------------------------------------------------------------------------------
# No SAM3 weights exist here: the masks are person shapes drawn around the real analyzer's faces of
# t1, in the form SAM3 Detect gives (float 0/1 [N, H, W] at the image's size, ordered by score).
SCORE_ORDER = [4, 1, 5, 0, 3, 2]  # the six persons in a score-like, not left-to-right, order
NO_FACE, TWO_PEOPLE = 6, 7  # the two extra segments after them


def silhouettes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [n, H, W]: for each face box a head ellipse and a body ellipse below it, less the other
    persons' heads (who is in front hides what is behind). Neighbours' bodies overlap."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    heads, bodies = [], []
    for x1, y1, x2, y2 in boxes[:, :4]:
        w, h, cx, cy = x2 - x1, y2 - y1, (x1 + x2) / 2, (y1 + y2) / 2
        heads.append(((xs - cx) / (0.75 * w)) ** 2 + ((ys - cy) / (0.8 * h)) ** 2 <= 1)
        bodies.append(((xs - cx) / (1.4 * w)) ** 2 + ((ys - (y2 + 1.8 * h)) / (1.9 * h)) ** 2 <= 1)
    heads = np.stack(heads)
    return np.stack([heads[i] | (bodies[i] & ~np.delete(heads, i, axis=0).any(axis=0)) for i in range(len(boxes))])


def in_box(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool [n, H, W]: the pixels of each face box (their centres inside it)."""
    out = np.zeros((len(boxes), height, width), bool)
    for i, box in enumerate(boxes):
        out[i][interior(box)] = True
    return out


@pytest.fixture(scope="module")
def t1_segments(left_to_right):
    shapes = silhouettes(left_to_right, 886, 1280)
    no_face = np.zeros((886, 1280), bool)
    no_face[20:140, 600:760] = True  # background between persons 2 and 4: no face
    batch = np.concatenate([shapes[SCORE_ORDER], no_face[None], (shapes[0] | shapes[1])[None]])
    return shapes, batch.astype(np.float32)


@pytest.fixture(scope="module")
def on_segments(regions, real, t1, t1_segments):
    return regions.segment_regions(real, fp.comfy_float(t1), 6, torch.from_numpy(t1_segments[1]))


def test_segments_are_numbered_left_to_right_by_their_faces_as_silhouettes(regions, on_segments, t1_segments,
                                                                        left_to_right):
    shapes, _ = t1_segments
    result, labels = on_segments, on_segments.labels
    assert result.masks.shape == (6, 886, 1280) and result.masks.dtype == np.float32
    assert set(np.unique(result.masks)) <= {0.0, 1.0} and result.masks.sum(axis=0).max() == 1.0
    np.testing.assert_allclose(result.faces[:, :4], left_to_right, atol=1e-4)  # Encode Identity's numbering
    assert result.origins == tuple(f"segment {SCORE_ORDER.index(i)}" + (f", part of segment {TWO_PEOPLE}" if i < 2
                                                                        else "") for i in range(6))
    boxes = in_box(left_to_right, 886, 1280)
    any_box = boxes.any(axis=0)
    for i in range(6):
        assert np.array_equal(result.masks[i] == 1.0, labels == i)
        assert (labels[boxes[i]] == i).all(), i  # its whole face box, and no other's
    # One person's silhouette alone: theirs, the shape of it; nobody's silhouette: nobody's.
    alone = (shapes.sum(axis=0) == 1) & ~any_box
    for i in range(6):
        assert (labels[alone & shapes[i]] == i).all(), i
    assert (labels[(shapes.sum(axis=0) == 0) & ~any_box] == regions.BACKGROUND).all()
    assert ((labels == regions.BACKGROUND).mean()) > 0.3  # silhouettes, not a partition of the image
    # Where silhouettes overlap: the nearest face centre among theirs.
    both = (shapes.sum(axis=0) >= 2) & ~any_box
    assert both.sum() > 1000
    ys, xs = np.nonzero(both)
    centres = (left_to_right[:, :2] + left_to_right[:, 2:]) / 2
    distance = (xs[:, None] + 0.5 - centres[:, 0]) ** 2 + (ys[:, None] + 0.5 - centres[:, 1]) ** 2
    distance[~shapes[:, ys, xs].T] = np.inf
    np.testing.assert_array_equal(labels[ys, xs], np.argmin(distance, axis=1))
    report = result.report()
    assert report.startswith("FaceStudio Regions (segments): 6 masks of 1280x886.\nmask 0: face 0 at x 52-171")
    assert f"warning: segment {NO_FACE} holds no face: dropped" in report
    assert (f"warning: segment {TWO_PEOPLE} holds the faces of persons 0 and 1: split between them by nearest face. "
            "For one mask per person, switch SAM3 Detect's individual_masks on.") in report
    assert len(result.notes) == 2 and len(result.unused) == 0


def test_a_segment_of_two_people_is_split_between_them_by_nearest_face(regions, real, t1, t1_segments):
    shapes, _ = t1_segments
    pair = shapes[0] | shapes[1]  # e.g. SAM3 Detect with individual_masks off
    result = regions.segment_regions(real, fp.comfy_float(t1), 2, pair[None].astype(np.float32))
    faces = result.faces[:, :4]
    nearest = regions.face_labels(faces, 886, 1280, "partition")  # face boxes first, then the nearer centre
    inside = pair | in_box(faces, 886, 1280).any(axis=0)
    np.testing.assert_array_equal(result.labels, np.where(inside, nearest, regions.BACKGROUND))
    assert (result.labels == 0).sum() > 10000 and (result.labels == 1).sum() > 10000
    assert len(result.unused) == 4  # the other four faces: in no segment
    assert result.notes == (
        "segment 0 holds the faces of persons 0 and 1: split between them by nearest face. For one mask per person, "
        "switch SAM3 Detect's individual_masks on.",
        "4 faces of the layout image in no segment: not used (a person the segmentation missed? lower SAM3 "
        "Detect's threshold).")


def test_more_faced_segments_than_count_keep_the_largest_faces(regions, real, t1, t1_segments, left_to_right):
    result = regions.segment_regions(real, fp.comfy_float(t1), 2, t1_segments[1])
    np.testing.assert_allclose(result.faces[:, :4], left_to_right[[0, 2]], atol=1e-4)  # as grow / partition take
    assert result.origins == (f"segment {SCORE_ORDER.index(0)}, part of segment {TWO_PEOPLE}",
                              f"segment {SCORE_ORDER.index(2)}")
    assert "4 faces in segments not used: count keeps the largest." in result.notes
    # The segment of persons 0 and 1 is split with face 1, left out: person 0 does not get face 1.
    assert (f"segment {TWO_PEOPLE} holds the face of person 0 and 1 face left out by count: split between them by "
            "nearest face; the left-out faces' parts are nobody's. For one mask per person, switch SAM3 Detect's "
            "individual_masks on.") in result.notes
    shapes, boxes = t1_segments[0], in_box(left_to_right, 886, 1280)
    assert (result.labels[boxes[1]] == regions.BACKGROUND).all() and (result.labels[boxes[0]] == 0).all()
    assert not (result.labels[shapes[1] & ~shapes[0]] == 0).any()  # face 1's own silhouette stays face 1's
    for person in (1, 3, 4, 5):
        assert f"segment {SCORE_ORDER.index(person)} holds only faces left out by count: dropped." in result.notes
    np.testing.assert_allclose(result.unused[:, :4], left_to_right[[1, 3, 4, 5]], atol=1e-4)


def test_segment_errors_say_what_to_do(regions, real, t1, t1_segments):
    image = fp.comfy_float(t1)
    shapes, batch = t1_segments
    with pytest.raises(regions.RegionError) as error:  # SAM3 Detect's batch when it finds nothing
        regions.segment_regions(real, image, 2, torch.zeros(0, 886, 1280))
    assert str(error.value).startswith("The segments are an empty MASK batch: SAM3 Detect (or your segmenter) "
                                       "found nothing in the layout image, but count asks for 2 persons. Lower "
                                       "SAM3 Detect's threshold (e.g. 0.3), or try another prompt")
    with pytest.raises(regions.RegionError) as error:
        regions.segment_regions(real, image, 3, (shapes[0] | shapes[1])[None])
    message = str(error.value)
    assert message.startswith("1 segment and 6 faces in the layout image (1280x886), but only 2 of the faces lie in "
                              "a segment (covering at least half its box), and count asks for 3 persons. Set count "
                              "to 2 or fewer")
    assert "('person:3' for 3)" in message and "individual_masks on" in message
    with pytest.raises(regions.RegionError, match="but none of the faces lie in a segment .* Check that the "
                                                   "segments are of the layout image"):
        regions.segment_regions(real, image, 1, batch[NO_FACE:NO_FACE + 1])
    with pytest.raises(regions.RegionError, match=r"The layout image \(400x300\) has no face the analyzer can find, "
                                                  "but segments mode matches each segment to a person"):
        regions.segment_regions(real, fp.comfy_float(fp.faceless(300, 400)), 1, np.ones((1, 300, 400)))
    with pytest.raises(regions.RegionError, match=r"the segments are 1280x640 but the layout image is 1280x886 "
                                                  r"\(width x height\), another shape"):
        regions.segment_regions(real, image, 2, np.ones((1, 640, 1280)))
    with pytest.raises(regions.RegionError, match="needs a MASK batch with one mask per person on `segments`"):
        regions.segment_regions(real, image, 2)
    with pytest.raises(regions.RegionError, match="segments must be a MASK batch"):
        regions.segment_regions(real, image, 2, np.ones((1, 1, 886, 1280)))


def test_segments_at_another_size_of_the_same_shape_are_resized(regions, real, t1, t1_segments, on_segments):
    import cv2

    half = np.stack([cv2.resize(m, (640, 443), interpolation=cv2.INTER_AREA) for m in t1_segments[1]])
    result = regions.segment_regions(real, fp.comfy_float(t1), 6, half)
    assert result.notes[0] == "the segments (640x443) were resized to the layout image's 1280x886."
    assert result.masks.shape == (6, 886, 1280) and result.origins == on_segments.origins
    assert (result.labels == on_segments.labels).mean() > 0.99


@pytest.mark.parametrize("shape", ["gaussian", "linear"])
def test_feathered_segments_stay_in_range_and_sum_to_at_most_one(regions, real, t1, t1_segments, on_segments, shape):
    feather = 16
    soft = regions.segment_regions(real, fp.comfy_float(t1), 6, t1_segments[1], feather=feather, feather_shape=shape)
    masks = soft.masks
    assert masks.dtype == np.float32 and masks.min() >= 0.0 and masks.sum(axis=0).max() <= 1.0
    assert ((masks > 0) & (masks < 1)).any(axis=0).mean() > 0.03  # soft silhouette edges
    far = ~borders(on_segments.labels, feather)
    np.testing.assert_array_equal(masks[:, far], on_segments.masks[:, far])
    for i, box in enumerate(on_segments.faces):
        assert masks[i][centre(box)] == 1.0


def sam3_boxes(shapes: np.ndarray, order) -> list:
    """SAM3 Detect's bboxes for one image: a list (one per image) of lists of {x, y, width, height, score}."""
    out = []
    for rank, i in enumerate(order):
        ys, xs = np.nonzero(shapes[i])
        out.append({"x": float(xs.min()), "y": float(ys.min()), "width": float(xs.max() + 1 - xs.min()),
                    "height": float(ys.max() + 1 - ys.min()), "score": 0.9 - 0.05 * rank})
    return [out]


def rectangles_of(boxes: list, height: int, width: int) -> np.ndarray:
    out = np.zeros((len(boxes), height, width), np.float32)
    for k, b in enumerate(boxes):
        out[k, int(b["y"]):int(b["y"] + b["height"]), int(b["x"]):int(b["x"] + b["width"])] = 1.0
    return out


def test_person_boxes_are_filled_rectangles_matched_like_segments(regions, real, t1, t1_segments, left_to_right):
    image = fp.comfy_float(t1)
    boxes = sam3_boxes(t1_segments[0], SCORE_ORDER)
    result = regions.segment_regions(real, image, 6, boxes=boxes)
    np.testing.assert_allclose(result.faces[:, :4], left_to_right, atol=1e-4)
    assert result.origins == tuple(f"box {SCORE_ORDER.index(i)}" for i in range(6))
    as_masks = regions.segment_regions(real, image, 6, rectangles_of(boxes[0], 886, 1280))
    np.testing.assert_array_equal(result.labels, as_masks.labels)  # integer boxes: the same pixels
    for i in range(6):
        assert (result.labels[in_box(left_to_right[i:i + 1], 886, 1280)[0]] == i).all()
    # A dict, a flat list; segments win over boxes; boxes for two images, nothing found: errors.
    one = regions.segment_regions(real, image, 1, boxes=boxes[0][SCORE_ORDER.index(2)])
    np.testing.assert_allclose(one.faces[:, :4], left_to_right[2:3], atol=1e-4)
    flat = regions.segment_regions(real, image, 6, boxes=boxes[0])
    np.testing.assert_array_equal(flat.labels, result.labels)
    both = regions.segment_regions(real, image, 6, t1_segments[1], boxes)
    assert "boxes not used: segments are connected and take precedence." in both.notes
    with pytest.raises(regions.RegionError, match="the boxes are for 2 images"):
        regions.segment_regions(real, image, 6, boxes=boxes * 2)
    with pytest.raises(regions.RegionError, match="The boxes are an empty list: the detector found nothing"):
        regions.segment_regions(real, image, 6, boxes=[[]])
    with pytest.raises(regions.RegionError, match="box 0 is not a bounding box"):
        regions.segment_regions(real, image, 6, boxes=[{"x": 1}])


# ---- in the executor: a stand-in for SAM3 Detect (its outputs, as tensors and boxes) ----
class FixedSegments:
    """Returns what SAM3 Detect would: a MASK batch and its BOUNDING_BOX list, looked up by key."""
    VALUES: dict[str, tuple] = {}
    RETURN_TYPES = ("MASK", "BOUNDING_BOX")
    FUNCTION = "run"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    def run(self, key):
        return self.VALUES[key]


@pytest.fixture(scope="module")
def fixed_segments(comfy_host):
    import nodes

    nodes.NODE_CLASS_MAPPINGS["FSTestFixedSegments"] = FixedSegments
    yield FixedSegments.VALUES
    del nodes.NODE_CLASS_MAPPINGS["FSTestFixedSegments"]
    FixedSegments.VALUES.clear()


def has_bounding_boxes() -> bool:
    from comfy_api.latest import io

    return hasattr(io, "BoundingBox")


def test_segments_node_in_the_executor(drawing, comfy_host, packs, t1_input, fixed_segments, regions, real, t1, t1_segments,
                                       on_segments):
    real_pack, _ = packs
    fixed_segments["t1"] = (torch.from_numpy(t1_segments[1]), sam3_boxes(t1_segments[0], SCORE_ORDER))
    fixed_segments["none"] = (torch.zeros(0, 886, 1280), [[]])
    prompt = {"1": fp.analyzer_node(real_pack), "2": fp.load_image(t1_input),
              "3": {"class_type": "FSTestFixedSegments", "inputs": {"key": "t1"}},
              "4": regions_node("segments", 6, "1", "2", segments=["3", 0])}
    result = comfy_host.run(prompt)
    assert result.success, result.error
    masks, preview, report = (comfy_host.output(result, "4", i) for i in range(3))
    assert masks.dtype == torch.float32
    np.testing.assert_array_equal(masks.numpy(), on_segments.masks)
    np.testing.assert_array_equal(preview[0].numpy(), drawing.draw_regions(on_segments, fp.comfy_float(t1)))
    assert report == on_segments.report() and "split between them by nearest face" in report
    result = comfy_host.run({**prompt, "3": {"class_type": "FSTestFixedSegments", "inputs": {"key": "none"}}})
    assert not result.success and result.error_node == "4"
    assert "The segments are an empty MASK batch: SAM3 Detect (or your segmenter) found nothing" in result.error
    # Segments connected in another mode: not used, and said.
    result = comfy_host.run({**prompt, "4": regions_node("partition", 6, "1", "2", segments=["3", 0])})
    assert result.success, result.error
    assert comfy_host.output(result, "4", 2).endswith(
        "warning: segments / boxes not used in mode 'partition': choose segments to use them.")


def test_boxes_node_in_the_executor(comfy_host, packs, t1_input, fixed_segments, regions, real, t1, t1_segments):
    if not has_bounding_boxes():
        pytest.skip("this host has no BOUNDING_BOX type (comfy_api io.BoundingBox, ComfyUI 0.33 on): Regions has "
                    "no boxes input here")
    real_pack, _ = packs
    boxes = sam3_boxes(t1_segments[0], SCORE_ORDER)
    fixed_segments["t1 boxes"] = (torch.from_numpy(t1_segments[1]), boxes)
    prompt = {"1": fp.analyzer_node(real_pack), "2": fp.load_image(t1_input),
              "3": {"class_type": "FSTestFixedSegments", "inputs": {"key": "t1 boxes"}},
              "4": regions_node("segments", 6, "1", "2", boxes=["3", 1])}
    result = comfy_host.run(prompt)
    assert result.success, result.error
    expected = regions.segment_regions(real, fp.comfy_float(t1), 6, boxes=boxes)
    np.testing.assert_array_equal(comfy_host.output(result, "4", 0).numpy(), expected.masks)
    assert comfy_host.output(result, "4", 2) == expected.report()


@pytest.fixture(scope="module")
def two_silhouettes(booted, faces, real, t1, regions):
    """A two-person layout (t1's two leftmost people) in the input folder, their silhouettes in score
    order (right person first) and the Regions masks expected of them."""
    layout = fp.t1_left(t1)
    fp.save_inputs(booted.base / "input", {"fs_regions_two.png": layout})
    boxes = np.stack([f.bbox for f in faces.detect_and_embed(real, layout, select="left-to-right")])
    shapes = silhouettes(boxes, *layout.shape[:2])[::-1].astype(np.float32)
    expected = regions.segment_regions(real, fp.comfy_float(layout), 2, shapes)
    assert expected.origins == ("segment 1", "segment 0")
    return "fs_regions_two.png", torch.from_numpy(shapes.copy()), torch.from_numpy(expected.masks)


def segments_graph(checkpoint: str, real_pack: str, layout: str, key: str, direct: bool = False,
                   swap: bool = False) -> graphs.Graph:
    """Two persons in silhouettes: the stand-in's segments -> Regions (segments) -> FaceStudio Person
    (mask_index 0, 1) -> Apply -> KSampler; or (`direct`) the stand-in's masks straight into Person."""
    g = graphs.txt2img(checkpoint, output="latent", seed=7, steps=1)
    g.add("FSTestFixedSegments", {"key": key}, "segments")
    if direct:
        masks = g.link("segments")
    else:
        g.add("FaceStudioFaceAnalyzerLoader", fp.analyzer_node(real_pack)["inputs"], "real")
        g.add("LoadImage", {"image": layout}, "layout")
        regions = regions_node("segments", 2, segments=g.link("segments"))["inputs"]
        g.add("FaceStudioRegions", {**regions, "image": g.link("layout"), "face_analyzer": g.link("real")}, "regions")
        masks = g.link("regions")
    add_two_persons_and_apply(g, masks, swap)
    return g


def test_segment_regions_route_each_person_to_their_silhouette(comfy_host, sampling, packs, fixed_segments,
                                                               two_silhouettes):
    real_pack, _ = packs
    layout, shapes, expected = two_silhouettes
    fixed_segments["two"] = (shapes, [[]])
    fixed_segments["two, left to right"] = (expected, [[]])
    latents = {}
    for case, kwargs in (("segments", {}), ("direct", {"direct": True}), ("swapped", {"swap": True})):
        g = segments_graph(sampling, real_pack, layout, "two, left to right" if case == "direct" else "two", **kwargs)
        result = comfy_host.run(g.prompt)
        assert result.success, (case, result.error)
        latents[case] = comfy_host.output(result, g["sampler"])["samples"]
        if case != "direct":
            assert torch.equal(comfy_host.output(result, g["regions"]), expected)
    assert torch.isfinite(latents["segments"]).all()
    # The silhouettes in score order, through Regions: exactly the left-to-right masks given directly.
    assert torch.equal(latents["segments"], latents["direct"])
    assert (latents["segments"] - latents["swapped"]).abs().max() > 1e-3
