"""Faces: load an insightface model pack, then detect, choose, align and embed the faces in a photo.

Host-free (numpy, OpenCV, onnx, onnxruntime, insightface), so it runs and is tested without
ComfyUI; the nodes convert the host's IMAGE tensors and call in here. Written against the API that
insightface 0.7.3 (what most ComfyUI installs have) and 2.x share.

The pipeline is the IP-Adapter FaceID reference one: insightface's SCRFD detector at 640x640,
`face_align.norm_crop` to the recognizer's 112 px (ArcFace template) for the identity embedding,
and a `norm_crop` at 224 px for the CLIP-vision path of FaceID Plus. Given the same file, the
embedding equals `FaceAnalysis(allowed_modules=["detection", "recognition"]).get(cv2.imread(path))`'s,
except where the reference finds no face or only a doubtful one and the retry at a smaller
detection size (see `detect_faces`) finds a better one.
"""
from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

logger = logging.getLogger("FaceStudio.faces")

# Files of the two packs users are told to install, for error messages.
KNOWN_PACKS = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}
# "auto" tries these, in this order, among those onnxruntime reports available.
PROVIDER_PRIORITY = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)
PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
CPU = "CPUExecutionProvider"
# When no face is found at the analyzer's det size, or none scores RETRY_BELOW_SCORE, detection
# is retried on the photo shrunk this many times (see detect_faces).
RETRY_FACTORS = (2, 4)
RETRY_BELOW_SCORE = 0.7
# SCRFD's smallest anchors are 16 px at its input size (for "no face" messages). A face box narrower
# than MIN_FACE_PIXELS in the photo's own pixels holds too little to recognise: detectors still "find"
# faces in 8-px thumbnails (YuNet, upscaled: a 6x7 px box scoring 0.55), whose embeddings mean nothing.
MIN_DETECTED_PIXELS = 16
MIN_FACE_PIXELS = 20
Selection = Literal["largest", "index", "left-to-right"]
SELECTIONS = ("largest", "index", "left-to-right")
# How faces are numbered: "left-to-right" is Encode Identity's `index` (box centres left to right);
# "largest" puts first the face Encode Identity's face = largest picks (by box area, then score).
FACE_ORDERS = ("left-to-right", "largest")


class FaceError(ValueError):
    """Base of this module's errors: a problem with the user's files or photos, not a bug."""

    # The host's error dialog shows an error's type as `module.qualname`, and it imports a pack under its
    # folder's full path: without this the type reads "/home/.../custom_nodes/ComfyUI-FaceStudio.encoders.
    # faces.FaceModelError". Every error class of the pack sets it.
    __module__ = "FaceStudio"


class FaceModelError(FaceError):
    """The face-model folder is missing, incomplete or unusable."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


class FaceNotFound(FaceError):
    """No face (or not the requested one) in the photo numbered `image_index` by the caller."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)

    def __init__(self, message: str, image_index: int):
        super().__init__(message)
        self.image_index = image_index


@dataclass(frozen=True)
class RecognizerIdentity:
    """Which recognizer made an embedding: embeddings of different recognizers never mix."""

    file_name: str
    sha256_16: str  # first 16 hex digits of the ONNX file's sha256
    embedding_dim: int

    def __str__(self) -> str:
        return f"{self.file_name} (sha256 {self.sha256_16}, {self.embedding_dim}-d)"


@dataclass
class FaceAnalyzer:
    """A loaded detector + recognizer pair. Holds onnxruntime sessions: load once, reuse."""

    pack_dir: Path  # the folder the ONNX files were read from (the inner one if nested)
    detector: object  # insightface.model_zoo SCRFD
    recognizer: object  # insightface.model_zoo ArcFaceONNX
    det_size: tuple[int, int]  # (width, height)
    det_thresh: float
    providers: tuple[str, ...]  # what the sessions really run on
    recognizer_id: RecognizerIdentity
    skipped: tuple[str, ...] = field(default=())  # ONNX files left unloaded (landmarks, gender/age...)

    @property
    def embedding_dim(self) -> int:
        return self.recognizer_id.embedding_dim

    @property
    def recognizer_size(self) -> int:
        return int(self.recognizer.input_size[0])


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One face of one photo. Arrays are read-only; coordinates are the photo's pixels."""

    image_index: int
    bbox: np.ndarray  # (4,) float32: x1, y1, x2, y2
    kps: np.ndarray  # (5, 2) float32: eyes, nose tip, mouth corners (image-left first)
    det_score: float
    embedding: np.ndarray  # (D,) float32, the recognizer's raw output
    normed_embedding: np.ndarray  # (D,) float32, unit length: what IP-Adapter FaceID takes
    # (S, S, 3) uint8 RGB, norm_crop at S px (224: FaceID Plus's CLIP input, SD1.5 and SDXL alike).
    # RGB on purpose: the model card's demo (and diffusers' docs) hand CLIPImageProcessor the BGR
    # array norm_crop returns, a known slip (tencent-ailab/IP-Adapter#430: blue hair); cubiq feeds RGB.
    crop: np.ndarray
    det_size: tuple[int, int]  # the detection size that found it (smaller on a retry)
    recognizer: RecognizerIdentity

    def __post_init__(self):
        for name in ("bbox", "kps", "embedding", "normed_embedding", "crop"):
            getattr(self, name).setflags(write=False)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def resolve_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """The provider list to ask onnxruntime for. "auto": the available ones of PROVIDER_PRIORITY.

    An explicit list is kept as given (short names like "cuda" allowed), with CPU appended so a
    failed GPU provider falls back visibly (see `_check_providers`) rather than failing the load.
    """
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if isinstance(providers, str) and providers.lower() == "auto":
        chosen = [p for p in PROVIDER_PRIORITY if p in available]
        return chosen or list(available)
    if isinstance(providers, str):
        providers = [providers]
    chosen = [PROVIDER_ALIASES.get(str(p).lower(), str(p)) for p in providers]
    if not chosen:
        raise FaceModelError("providers is empty: give 'auto' or provider names such as CUDAExecutionProvider")
    if CPU not in chosen:
        chosen.append(CPU)
    return list(dict.fromkeys(chosen))


def _usable_providers(requested: Sequence[str]) -> list[str]:
    """`requested` less those this onnxruntime build lacks, each named in a warning. Dropped here,
    not left to onnxruntime: insightface 2.x refuses to load a detector whose first provider
    (CoreML) silently falls back to CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    usable = [p for p in requested if p in available]
    for provider in requested:
        if provider not in available:
            logger.warning(
                "%s is not in use: this onnxruntime build does not have it (available: %s). Running on %s.",
                provider, ", ".join(available), ", ".join(usable or available),
            )
    return usable or list(available)


def _check_providers(requested: Sequence[str], file_name: str, session) -> tuple[str, ...]:
    """Warn, naming it, about every requested provider that the created session does not run on
    (available but failed to start: missing CUDA/cuDNN libraries, driver mismatch...)."""
    in_use = tuple(session.get_providers())
    for provider in requested:
        if provider != CPU and provider not in in_use:
            logger.warning(
                "%s is not in use for %s: onnxruntime could not start it (for CUDA: missing CUDA/cuDNN "
                "libraries or a driver too old). Running on %s.", provider, file_name, ", ".join(in_use),
            )
    return in_use


def _read_varint(stream) -> int:
    result = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise EOFError("truncated protobuf")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7


def _protobuf_fields(stream, end: int):
    """Yield (field number, offset, length) of the length-delimited fields up to `end`, seeking past
    their content (so a 300 MB initializer costs a seek, not a read); other wire types are skipped."""
    while stream.tell() < end:
        key = _read_varint(stream)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _read_varint(stream)
        elif wire == 1:
            stream.seek(8, 1)
        elif wire == 5:
            stream.seek(4, 1)
        elif wire == 2:
            length = _read_varint(stream)
            start = stream.tell()
            yield number, start, length
            stream.seek(start + length)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def onnx_signature(path: Path) -> tuple[list[tuple[str, list]], int]:
    """(graph inputs as (name, dims), number of graph outputs) of an ONNX file, read without
    loading its weights: a few KB of I/O whatever the file's size, where onnx.load reads it all
    and an onnxruntime session also optimizes the graph. Dims are ints or dim_param strings.

    Measured on a 172 MB file (w600k_r50's size; 2026-12-01, 2-core CPU): this 0.09 ms, onnx.load
    0.40 s and as much RAM, an onnxruntime session 0.79 s even for a trivial graph. buffalo_l holds
    two such files (and its 143 MB landmark model is never used), so loading a pack through
    onnx.load or insightface's router alone would add about a second per analyzer load."""
    import onnx

    inputs, n_outputs = [], 0
    with open(path, "rb") as stream:
        stream.seek(0, 2)
        size = stream.tell()
        stream.seek(0)
        graph = next(((start, length) for number, start, length in _protobuf_fields(stream, size) if number == 7), None)
        if graph is None:
            raise ValueError("no graph")
        stream.seek(graph[0])
        for number, start, length in _protobuf_fields(stream, graph[0] + graph[1]):
            if number == 11:  # GraphProto.input
                value = onnx.ValueInfoProto.FromString(stream.read(length))
                dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
                inputs.append((value.name, dims))
            elif number == 12:  # GraphProto.output
                n_outputs += 1
    return inputs, n_outputs


def _route(path: Path) -> str | None:
    """The task insightface's ModelRouter would give the file, from its signature alone (same
    rules: 5+ outputs detector, 192 px landmarks, 96 px gender/age, two 128 px inputs swapper,
    square >= 112 recognizer), or None when the signature cannot be read. Only a pre-filter: the
    files it routes to detection or recognition (or cannot read) are loaded by insightface's own
    model_zoo.get_model, whose task wins; the rest get no session (see onnx_signature's figures)."""
    try:
        inputs, n_outputs = onnx_signature(path)
        dims = inputs[0][1]
    except Exception as error:  # an odd file: let insightface itself decide
        logger.debug("could not read the signature of %s: %s", path, error)
        return None
    if n_outputs >= 5:
        return "detection"
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[2:4]):
        return "other"
    height, width = dims[2:4]
    if height == width == 192:
        return "landmark"
    if height == width == 96:
        return "genderage"
    if len(inputs) == 2 and height == width == 128:
        return "inswapper"
    if height == width and height >= 112 and height % 16 == 0:
        return "recognition"
    return "other"


@lru_cache(maxsize=16)
def _file_sha256_16(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _missing_models_message(folder: Path, problem: str) -> str:
    expected = "; ".join(f"{name}: {' and '.join(files)}" for name, files in KNOWN_PACKS.items())
    return (
        f"{problem} Put an insightface model pack in {folder} — a folder holding a face detector and a "
        f"face recognizer ONNX file, e.g. {expected}. Packs go in models/insightface/models/<name>/."
    )


def _find_onnx_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise FaceModelError(_missing_models_message(folder, f"The face-model folder {folder} does not exist."))
    if any(folder.glob("*.onnx")):
        return folder
    # Unzipping antelopev2.zip inside antelopev2/ gives antelopev2/antelopev2/: accept it.
    nested = [folder / folder.name] + sorted(p for p in folder.iterdir() if p.is_dir() and p.name != folder.name)
    for inner in nested:
        if inner.is_dir() and any(inner.glob("*.onnx")):
            logger.info("No ONNX files in %s; using the ones in its subfolder %s (nested unzip).", folder, inner)
            return inner
    raise FaceModelError(_missing_models_message(folder, f"{folder} holds no .onnx files."))


def load_face_analyzer(
    pack_dir: str | Path,
    providers: str | Sequence[str] = "auto",
    det_size: tuple[int, int] = (640, 640),
    det_thresh: float = 0.5,
) -> FaceAnalyzer:
    """Load the detector and recognizer of the insightface model pack in `pack_dir`.

    Only those two: landmark and gender/age models, which FaceAnalysis loads by default and IP-Adapter
    never uses, are recognised from their ONNX signature and never get a session. `providers`:
    "auto", a provider name, or a list of them. Raises FaceModelError naming the folder and the
    files expected when the pack is missing or lacks a detector or a recognizer.
    """
    import onnxruntime
    from insightface.model_zoo import model_zoo

    folder = _find_onnx_folder(Path(pack_dir).expanduser())
    requested = _usable_providers(resolve_providers(providers))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only; provider fallbacks are reported by _check_providers
    # onnxruntime's worker threads otherwise busy-wait after every run and hold the cores that torch
    # (the sampler, the next node) needs next: a cached re-run right after an encode took ~35 ms, not ~2.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")

    models: dict[str, object] = {}
    skipped = []
    for path in sorted(folder.glob("*.onnx")):
        route = _route(path)
        if route not in (None, "detection", "recognition") or route in models:
            skipped.append(path.name)  # never loaded: a session for a 140 MB landmark model costs seconds
            continue
        try:
            model = model_zoo.get_model(str(path), providers=requested, sess_options=options)
        except Exception as error:
            raise FaceModelError(f"{path} could not be loaded by insightface/onnxruntime: {error}") from error
        task = getattr(model, "taskname", None)
        if task in ("detection", "recognition") and task not in models:
            models[task] = model
        else:
            skipped.append(path.name)
    missing = [task for task in ("detection", "recognition") if task not in models]
    if missing:
        found = ", ".join(sorted(p.name for p in folder.glob("*.onnx")))
        raise FaceModelError(
            _missing_models_message(folder, f"{folder} has no face {' and no '.join(missing)} model (it holds: {found}).")
        )
    detector, recognizer = models["detection"], models["recognition"]
    if not getattr(detector, "use_kps", False):
        raise FaceModelError(f"{detector.model_file} gives no facial landmarks, which alignment needs: use an SCRFD with keypoints (e.g. det_10g.onnx).")

    in_use = _check_providers(requested, Path(detector.model_file).name, detector.session)
    in_use_rec = _check_providers(requested, Path(recognizer.model_file).name, recognizer.session)
    providers_in_use = tuple(dict.fromkeys(in_use + in_use_rec))

    static = _static_input_size(detector)
    if static is not None and tuple(det_size) != static:
        logger.warning("%s only takes %dx%d input; using that instead of det_size %s.", Path(detector.model_file).name, *static, det_size)
        det_size = static
    det_size = (int(det_size[0]), int(det_size[1]))
    detector.prepare(0, input_size=det_size, det_thresh=det_thresh)
    recognizer.prepare(0)

    rec_path = Path(recognizer.model_file)
    stat = rec_path.stat()
    identity = RecognizerIdentity(
        file_name=rec_path.name,
        sha256_16=_file_sha256_16(str(rec_path.resolve()), stat.st_size, stat.st_mtime_ns),
        embedding_dim=_embedding_dim(recognizer),
    )
    logger.info(
        "Face models from %s: detector %s, recognizer %s; running on %s.",
        folder, Path(detector.model_file).name, identity, ", ".join(providers_in_use),
    )
    return FaceAnalyzer(
        pack_dir=folder,
        detector=detector,
        recognizer=recognizer,
        det_size=det_size,
        det_thresh=float(det_thresh),
        providers=providers_in_use,
        recognizer_id=identity,
        skipped=tuple(skipped),
    )


def _static_input_size(detector) -> tuple[int, int] | None:
    height, width = detector.session.get_inputs()[0].shape[2:4]
    if isinstance(height, int) and isinstance(width, int):
        return (width, height)
    return None


def _embedding_dim(recognizer) -> int:
    width = recognizer.session.get_outputs()[0].shape[-1]
    if isinstance(width, int) and width > 0:
        return width
    size = recognizer.input_size[0]
    return int(recognizer.get_feat(np.zeros((size, size, 3), np.uint8)).shape[-1])  # symbolic: ask


# ------------------------------------------------------------------------------------------------
# Photos
# ------------------------------------------------------------------------------------------------
def images_list(images) -> list:
    """Single photos [H, W, C] from a [B, H, W, C] batch, one photo, or a list/tuple of them."""
    if isinstance(images, (list, tuple)):
        return list(images)
    shape = getattr(images, "shape", None)
    if shape is not None and len(shape) == 4:
        return [images[i] for i in range(shape[0])]
    return [images]


def to_bgr_uint8(image) -> np.ndarray:
    """A photo as cv2.imread gives it: BGR uint8 [H, W, 3], C-contiguous. See `to_rgb_uint8`."""
    return np.ascontiguousarray(to_rgb_uint8(image)[:, :, ::-1])


def to_rgb_uint8(image) -> np.ndarray:
    """A photo as RGB uint8 [H, W, 3], C-contiguous.

    Takes ComfyUI's layout: RGB float [H, W, C] in 0..1 (or [1, H, W, C]; a torch tensor or numpy),
    or uint8 RGB. Floats are rounded: ComfyUI's LoadImage makes them as uint8 / 255, and rounding
    gives the file's bytes back whatever float arithmetic came between, where truncating turns a
    value one ulp low into the byte below, so a PNG gives exactly what cv2.imread gives. Grayscale
    [H, W] or [H, W, 1] is repeated to three channels, as cv2.imread does for a gray PNG. An alpha
    channel is dropped, not composited: cv2.imread(IMREAD_COLOR) and LoadImage's convert("RGB") do
    the same, so an RGBA file embeds as in the reference pipeline; a cut-out face keeps whatever
    colour lies under its transparent pixels (usually black). NaN counts as 0.
    """
    if hasattr(image, "detach"):  # a torch tensor: torch is loaded already
        import torch

        image = image.detach().cpu()
        if image.is_floating_point():
            # In place on a new tensor (never the caller's): numpy's nan_to_num and clip passes took
            # most of a cached re-run's time on a large photo.
            image = (image.float() * 255.0).nan_to_num_(0.0).round_().clamp_(0, 255).to(torch.uint8)
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise FaceError(f"expected one image, got a batch of {array.shape[0]}: pass them one at a time")
        array = array[0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) < 1:
        raise FaceError(f"expected an image [H, W, C] with 1-4 channels, got shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        scaled = np.multiply(array, 255.0, dtype=np.float32)
        np.nan_to_num(scaled, copy=False, nan=0.0)
        array = np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    else:
        raise FaceError(f"expected a float image in 0..1 or uint8, got {array.dtype}")
    channels = array.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        return np.ascontiguousarray(np.repeat(array[:, :, :1], 3, axis=2))
    return np.ascontiguousarray(array[:, :, :3])  # alpha dropped


def _norm_crop(bgr: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
    from insightface.utils import face_align

    with warnings.catch_warnings():
        # scikit-image 0.26 deprecates SimilarityTransform.estimate, which insightface calls
        warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)
        return face_align.norm_crop(bgr, landmark=kps, image_size=size)


def _detect_at(analyzer: FaceAnalyzer, bgr: np.ndarray, factor: int):
    """SCRFD at the analyzer's det size, the photo shrunk `factor` times inside that canvas.

    Letterboxing into a canvas of the model's input size works for fixed-size detectors too, and
    is what SCRFD itself does at factor 1; boxes come back in the photo's pixels.
    """
    width, height = analyzer.det_size
    canvas = bgr
    if factor != 1:
        import cv2

        scale = min(width / bgr.shape[1], height / bgr.shape[0]) / factor
        new_w, new_h = max(1, int(bgr.shape[1] * scale)), max(1, int(bgr.shape[0] * scale))
        canvas = np.zeros((height, width, 3), np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_AREA)
    bboxes, kpss = analyzer.detector.detect(canvas, input_size=analyzer.det_size, max_num=0, metric="default")
    if canvas is not bgr and len(bboxes):
        xy = np.array([new_w / bgr.shape[1], new_h / bgr.shape[0]], np.float32)
        bboxes = bboxes.copy()
        bboxes[:, :4] /= np.tile(xy, 2)
        kpss = kpss / xy
    return bboxes, kpss


def detect_faces(analyzer: FaceAnalyzer, bgr: np.ndarray):
    """(bboxes [n, 5] with scores, kps [n, 5, 2], det size used) for one BGR photo.

    At the analyzer's det size first. When nothing is found there, or no face scores
    RETRY_BELOW_SCORE, the photo is shown RETRY_FACTORS times smaller and the pass whose best face
    scores highest wins: a face that fills a tight crop is larger than the detector's biggest
    anchors at 640 and is then missed, or found with a loose box and landmarks whose embedding
    matches the same face's in the full photo far worse (measured on YuNet: cosine 0.09-0.73 at
    640 against 0.92 at 160 on a face-only crop of the astronaut).
    """
    best = (np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32), None)
    best_score = -1.0
    for factor in (1,) + RETRY_FACTORS:
        bboxes, kpss = _detect_at(analyzer, bgr, factor)
        score = float(bboxes[:, 4].max()) if len(bboxes) else -1.0
        if score > best_score:
            best_score = score
            best = (bboxes, kpss, (analyzer.det_size[0] // factor, analyzer.det_size[1] // factor))
        if best_score >= RETRY_BELOW_SCORE:
            break
    if best[2] is not None and best[2] != tuple(analyzer.det_size):
        logger.info("Face found at detection size %dx%d (photo %dx%d).", *best[2], bgr.shape[1], bgr.shape[0])
    return best


def face_order(bboxes, order: str = "left-to-right") -> list[int]:
    """Face rows in display order. `bboxes`: (n, 4) x1 y1 x2 y2, or (n, 5) with the score.

    Left to right: box centre x, then top y; detect_and_embed numbers faces the same way, so number k
    here is the face Encode Identity takes with face = index, index = k. Largest: by box area, then score.
    """
    if order not in FACE_ORDERS:
        raise FaceError(f"order must be one of {', '.join(FACE_ORDERS)}, not {order!r}")
    boxes = np.asarray(bboxes, np.float64)
    if boxes.size == 0:
        return []
    if boxes.ndim != 2 or boxes.shape[1] < 4:
        raise FaceError(f"expected face boxes (n, 4) or (n, 5), got shape {boxes.shape}")
    n = len(boxes)
    if order == "left-to-right":
        centres = (boxes[:, 0] + boxes[:, 2]) / 2
        return sorted(range(n), key=lambda i: (centres[i], boxes[i, 1]))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    scores = boxes[:, 4] if boxes.shape[1] > 4 else np.zeros(n)
    return sorted(range(n), key=lambda i: (-areas[i], -scores[i]))


def detect_and_embed(
    analyzer: FaceAnalyzer,
    image,
    *,
    image_index: int = 0,
    select: Selection = "largest",
    index: int = 0,
    crop_size: int = 224,
) -> tuple[DetectedFace, ...]:
    """Detect the faces in one photo, choose, align and embed.

    `select`: "largest" (by box area) gives one face; "index" the `index`-th face counted left to
    right from 0; "left-to-right" all faces, in that order. Only chosen faces are embedded.
    `image_index` is the caller's number for this photo, used in errors. Raises FaceNotFound.
    """
    if select not in SELECTIONS:
        raise FaceError(f"select must be one of {', '.join(SELECTIONS)}, not {select!r}")
    if crop_size <= 0 or (crop_size % 112 and crop_size % 128):
        raise FaceError(f"crop_size must be a multiple of 112 or 128 (norm_crop's templates), not {crop_size}")
    bgr = to_bgr_uint8(image)
    bboxes, kpss, used = detect_faces(analyzer, bgr)
    height, width = bgr.shape[:2]
    if not len(bboxes):
        raise FaceNotFound(_no_face_message(analyzer, image_index, width, height), image_index)
    order = face_order(bboxes)
    if select == "largest":
        chosen = face_order(bboxes, "largest")[:1]
    elif select == "index":
        if not -len(order) <= index < len(order):
            raise FaceNotFound(
                f"Image {image_index} has {len(order)} face(s), numbered 0 to {len(order) - 1} from left to right; "
                f"there is no face {index}.",
                image_index,
            )
        chosen = [order[index]]
    else:
        chosen = order
    return tuple(_embed(analyzer, bgr, bboxes[i], kpss[i], image_index, used, crop_size) for i in chosen)


def _no_face_message(analyzer: FaceAnalyzer, image_index: int, width: int, height: int) -> str:
    tried = ", ".join(f"{analyzer.det_size[0] // f}x{analyzer.det_size[1] // f}" for f in (1,) + RETRY_FACTORS)
    message = (f"No face found in image {image_index} ({width}x{height}) at detection sizes {tried}, "
               f"threshold {analyzer.det_thresh}. ")
    if min(width, height) < MIN_FACE_PIXELS:
        return message + (f"The photo is only {width}x{height} pixels, too small to hold a recognisable face: use "
                          f"a photo in which the face is at least {MIN_FACE_PIXELS} px wide (112 px or more is best).")
    message += "Use a photo where the face is clearly visible and frontal."
    # The detector sees the whole photo shrunk to its det size: faces below its smallest anchors vanish.
    scale = min(analyzer.det_size[0] / width, analyzer.det_size[1] / height)
    if scale < 1.0:
        smallest = math.ceil(MIN_DETECTED_PIXELS / scale)
        message += (f" At {width}x{height} a face narrower than about {smallest} px is too small for the detector "
                    f"(it sees the photo shrunk to {analyzer.det_size[0]}x{analyzer.det_size[1]}): crop the photo "
                    "closer around the face.")
    return message


def too_small_message(face: DetectedFace) -> str | None:
    """Why `face` is too small to take an identity from, or None when it is large enough."""
    width, height = (float(face.bbox[2] - face.bbox[0]), float(face.bbox[3] - face.bbox[1]))
    if min(width, height) >= MIN_FACE_PIXELS:
        return None
    return (f"The face found in image {face.image_index} is only {width:.0f}x{height:.0f} px, too small to recognise "
            f"(a face at least {MIN_FACE_PIXELS} px wide is needed, 112 px or more is best): use a larger photo of "
            "the face, or one where it fills more of the frame.")


def _embed(analyzer, bgr, bbox, kps, image_index, det_size, crop_size) -> DetectedFace:
    kps = np.asarray(kps, np.float32)
    aligned = _norm_crop(bgr, kps, analyzer.recognizer_size)
    embedding = np.asarray(analyzer.recognizer.get_feat(aligned), np.float32).reshape(-1)
    norm = float(np.linalg.norm(embedding))
    if not np.isfinite(norm) or norm == 0.0:
        raise FaceModelError(f"{analyzer.recognizer_id} gave a zero or non-finite embedding for image {image_index}")
    crop = np.ascontiguousarray(_norm_crop(bgr, kps, crop_size)[:, :, ::-1])  # BGR -> RGB
    return DetectedFace(
        image_index=image_index,
        bbox=np.asarray(bbox[:4], np.float32).copy(),
        kps=kps.copy(),
        det_score=float(bbox[4]),
        embedding=embedding.copy(),
        normed_embedding=(embedding / norm).astype(np.float32),
        crop=crop,
        det_size=det_size,
        recognizer=analyzer.recognizer_id,
    )
