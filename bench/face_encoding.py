"""Per-photo identity encoding: the pack's encoder against raw onnxruntime sessions and plain insightface.

    .venv/bin/python bench/face_encoding.py            # 7 rounds
    .venv/bin/python bench/face_encoding.py --quick    # 3 rounds, no analyzer-load table (about 1 min on 2 cores)
    options: --rounds N  --device auto|cpu|cuda (onnxruntime providers)

Models: OpenCV zoo's YuNet + SFace rewrapped for insightface (tests/facestudio_testing/face_models.py),
the only trained face models obtainable here; plus random stand-ins sized like buffalo_l's three
other models, so "FaceAnalysis with its default modules" pays what it pays on a real pack.
Photos: scikit-image's astronaut (one face) and insightface's t1 (six faces), handed to the pack as
ComfyUI hands them (float RGB in 0..1, a [1, H, W, 3] tensor for Encode Identity).

Baselines, measured in the same run on the same photos:
- raw onnxruntime sessions: the same detector and recognizer files in two plain InferenceSessions with
  this script's own minimal pre/post-processing (float -> BGR uint8, letterbox to 640, the detector,
  decode boxes and landmarks at strides 8/16/32, NMS, insightface.utils.face_align.norm_crop to 112,
  the recognizer), with the pack's session options (worker threads do not busy-wait between runs):
  what the pack's encoder must stay within 10% of;
- insightface FaceAnalysis, detection + recognition only, and with its default modules.
The pack: encoders/faces.detect_and_embed (every face, left to right), and encoders/multishot.encode_identity
(one face, as FaceStudio Encode Identity runs it) without a cache, then with a fresh FaceCache (first run)
and again with that cache filled (cached re-run: the photo is hashed, nothing is detected).
Each figure is a median over interleaved rounds (load from other processes falls on all alike); the
FaceAnalysis baselines get rounds of their own, after the others (their threads busy-wait between runs).

Targets (printed, met or missed): encoding within 10% of the raw sessions per photo; cached re-run < 5 ms.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from facestudio_testing import face_models as fm  # noqa: E402

STRIDES = (8, 16, 32)


def load_encoders():
    """encoders/ is host-free: load it as a package of its own (the pack's __init__ needs ComfyUI)."""
    name = "facestudio_encoders_bench"
    spec = importlib.util.spec_from_file_location(name, C.ROOT / "encoders" / "__init__.py",
                                                  submodule_search_locations=[str(C.ROOT / "encoders")])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(name + ".faces"), importlib.import_module(name + ".multishot")


class RawSessions:
    """The detector and recognizer as two plain onnxruntime sessions, with minimal pre/post-processing."""

    def __init__(self, pack_dir: Path, providers: list[str], det_size: int = 640, det_thresh: float = 0.5,
                 nms_thresh: float = 0.4):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        # The pack's session options: without them both sessions' threads busy-wait between runs
        # and roughly double every figure here on 2 cores, which would flatter the pack's ratio.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.det = onnxruntime.InferenceSession(str(pack_dir / fm.REAL_DETECTOR), options, providers=providers)
        self.rec = onnxruntime.InferenceSession(str(pack_dir / fm.REAL_RECOGNIZER), options, providers=providers)
        self.det_input, self.rec_input = self.det.get_inputs()[0].name, self.rec.get_inputs()[0].name
        self.size, self.thresh, self.nms_thresh = det_size, det_thresh, nms_thresh
        self.centers = {}
        for stride in STRIDES:
            n = det_size // stride
            grid = np.stack(np.mgrid[:n, :n][::-1], axis=-1).reshape(-1, 2).astype(np.float32) * stride
            self.centers[stride] = np.repeat(grid, 2, axis=0)  # two anchors per cell

    def detect(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        height, width = bgr.shape[:2]
        scale = min(self.size / width, self.size / height)
        new_w, new_h = int(width * scale), int(height * scale)
        canvas = np.zeros((self.size, self.size, 3), np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(bgr, (new_w, new_h))
        blob = ((canvas[:, :, ::-1].astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.det.run(None, {self.det_input: np.ascontiguousarray(blob)})
        boxes, kpss = [], []
        for i, stride in enumerate(STRIDES):
            scores, dist, kps = outs[i][:, 0], outs[i + 3] * stride, outs[i + 6] * stride
            keep = scores >= self.thresh
            centers = self.centers[stride][keep]
            d = dist[keep]
            box = np.concatenate([centers - d[:, :2], centers + d[:, 2:]], axis=1)
            boxes.append(np.concatenate([box / scale, scores[keep, None]], axis=1))
            kpss.append((np.tile(centers, 5) + kps[keep]).reshape(-1, 5, 2) / scale)
        boxes, kpss = np.concatenate(boxes), np.concatenate(kpss)
        keep = self.nms(boxes)
        return boxes[keep], kpss[keep]

    def nms(self, dets: np.ndarray) -> list[int]:
        x1, y1, x2, y2, scores = dets.T
        areas = (x2 - x1 + 1) * (y2 - y1 + 1)
        order, keep = np.argsort(-scores, kind="stable"), []
        while order.size:
            i = order[0]
            keep.append(int(i))
            w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
            h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
            overlap = w * h / (areas[i] + areas[order[1:]] - w * h)
            order = order[1:][overlap <= self.nms_thresh]
        return keep

    def embed(self, bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        from insightface.utils import face_align

        crop = face_align.norm_crop(bgr, landmark=kps, image_size=112)
        blob = ((crop[:, :, ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        out = self.rec.run(None, {self.rec_input: np.ascontiguousarray(blob)})[0][0]
        return out / np.linalg.norm(out)

    def __call__(self, rgb_float: np.ndarray, largest_only: bool = False) -> list[np.ndarray]:
        bgr = np.ascontiguousarray(np.rint(rgb_float * 255.0).astype(np.uint8)[:, :, ::-1])
        boxes, kpss = self.detect(bgr)
        if largest_only:
            order = [int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))]
        else:
            order = np.argsort((boxes[:, 0] + boxes[:, 2]) / 2, kind="stable")
        return [self.embed(bgr, kpss[i]) for i in order]


def providers_for(device: str) -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise SystemExit(f"--device cuda: this onnxruntime has no CUDAExecutionProvider ({', '.join(available)})")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, no analyzer-load table")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 7, --quick 3)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    # scikit-image 0.26 deprecates SimilarityTransform.estimate, which insightface's norm_crop calls.
    warnings.filterwarnings("ignore", message=".*estimate.*deprecated", category=FutureWarning)

    import onnxruntime
    import torch
    from insightface.app import FaceAnalysis
    from insightface.data import get_image
    from skimage import data

    faces, multishot = load_encoders()
    providers = providers_for(args.device)
    real_pack, full_pack = fm.real_pack(), fm.buffalo_like_pack()
    root = str(fm.insightface_root())

    def face_analysis(name, modules):
        app = FaceAnalysis(name=name, root=root, allowed_modules=modules, providers=providers)
        app.prepare(ctx_id=0, det_size=(640, 640))
        return app

    print(C.machine_line(None, f"onnxruntime {onnxruntime.__version__} ({', '.join(providers)})"))
    if not args.quick:
        load = C.medians({
            "ours (det+rec only)": lambda: faces.load_face_analyzer(full_pack, providers=providers),
            "FaceAnalysis, all modules": lambda: face_analysis(fm.BUFFALO_LIKE_PACK, None),
        }, rounds=3)
        base = load["FaceAnalysis, all modules"]
        print("\nanalyzer load, median of 3\n")
        print(C.markdown_table(["", "time", "vs FaceAnalysis"],
                               [[name, ms(s), f"{s / base:.2f}x"] for name, s in load.items()]))

    ours = faces.load_face_analyzer(real_pack, providers=providers)
    raw = RawSessions(real_pack, providers)
    detrec = face_analysis(fm.REAL_PACK, ["detection", "recognition"])
    everything = face_analysis(fm.BUFFALO_LIKE_PACK, None)
    photos = {"astronaut (1 face)": data.astronaut(), "t1 (6 faces)": np.ascontiguousarray(get_image("t1")[:, :, ::-1])}
    targets = []
    for name, rgb in photos.items():
        image = rgb.astype(np.float32) / 255.0  # ComfyUI's IMAGE values
        batch = torch.from_numpy(image)[None]   # what Encode Identity receives
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # what FaceAnalysis users pass (cv2.imread)

        # Same faces, same embeddings?
        raw_all = raw(image)
        pack_all = faces.detect_and_embed(ours, image, select="left-to-right")
        cosines = [float(a @ b.normed_embedding) for a, b in zip(raw_all, pack_all)]
        state = {"cache": multishot.FaceCache()}

        def first_run():
            state["cache"] = multishot.FaceCache()
            multishot.encode_identity(ours, batch, cache=state["cache"])

        def cached_rerun():
            multishot.encode_identity(ours, batch, cache=state["cache"])
            assert state["cache"].hits, "the re-run did not hit the cache"

        t = C.medians({
            "raw sessions, every face": lambda: raw(image),
            "pack detect_and_embed, every face": lambda: faces.detect_and_embed(ours, image, select="left-to-right"),
            "raw sessions, largest face": lambda: raw(image, largest_only=True),
            "pack encode_identity, no cache": lambda: multishot.encode_identity(ours, batch, cache=None),
            "pack encode_identity, first run (empty cache)": first_run,
            "pack encode_identity, cached re-run": cached_rerun,
        }, rounds=rounds)
        # In rounds of their own: FaceAnalysis's sessions busy-wait after each run (onnxruntime's
        # default), which on 2 cores slowed whatever came next by up to 2x when interleaved.
        t.update(C.medians({
            "FaceAnalysis det+rec": lambda: detrec.get(bgr),
            "FaceAnalysis, default modules": lambda: everything.get(bgr),
        }, rounds=rounds))
        every, one = t["raw sessions, every face"], t["raw sessions, largest face"]
        fa = t["FaceAnalysis, default modules"]
        rows = []
        for label, seconds in t.items():
            against = one if ("largest" in label or "encode_identity" in label) else every
            rows.append([label, ms(seconds), f"{seconds / against:.2f}x", f"{seconds / fa:.2f}x"])
        print(f"\nencode {name}: median of {rounds} interleaved rounds; {len(raw_all)} face(s) by the raw sessions, "
              f"{len(pack_all)} by the pack, cosine raw vs pack {min(cosines, default=float('nan')):.4f} (lowest)\n")
        print(C.markdown_table(["per photo", "time", "vs raw sessions (same faces)", "vs FaceAnalysis default"], rows))
        for label, against, raw_label in (("pack detect_and_embed, every face", every, "every face"),
                                          ("pack encode_identity, no cache", one, "largest face")):
            ratio = t[label] / against
            targets.append([f"{name}: {label.removeprefix('pack ')} within 10% of raw sessions ({raw_label})",
                            f"{ratio:.2f}x", C.verdict(ratio <= 1.10)])
        cached = t["pack encode_identity, cached re-run"]
        targets.append([f"{name}: cached re-run < 5 ms", ms(cached), C.verdict(cached < 0.005)])
    print()
    print(C.markdown_table(["target", "measured", ""], targets))


if __name__ == "__main__":
    main()
