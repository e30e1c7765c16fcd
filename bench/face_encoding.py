"""Per-photo identity encoding: the pack's encoder against plain insightface, same photos, same run.

    .venv/bin/python bench/face_encoding.py [--rounds 7]

Models: OpenCV zoo's YuNet + SFace rewrapped for insightface (tests/facestudio_testing/face_models.py),
the only trained face models obtainable here; plus random stand-ins sized like buffalo_l's three
other models, so "FaceAnalysis with its default modules" pays what it pays on a real pack.
Each figure is a median over interleaved rounds (load from other processes falls on all alike),
printed as a ratio against plain FaceAnalysis measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test model builders; never the pack root

from facestudio_testing import face_models as fm  # noqa: E402


def load_faces_module():
    # encoders/faces.py is host-free: load it alone, without the pack (whose __init__ needs ComfyUI).
    spec = importlib.util.spec_from_file_location("facestudio_faces_bench", ROOT / "encoders" / "faces.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def medians(functions: dict, rounds: int) -> dict:
    for function in functions.values():
        function()  # warm-up: first runs build per-size sessions
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from insightface.app import FaceAnalysis
    from insightface.data import get_image
    from skimage import data

    faces = load_faces_module()
    cpu = ["CPUExecutionProvider"]
    real_pack, full_pack = fm.real_pack(), fm.buffalo_like_pack()
    root = str(fm.insightface_root())

    def face_analysis(name, modules):
        app = FaceAnalysis(name=name, root=root, allowed_modules=modules, providers=cpu)
        app.prepare(ctx_id=0, det_size=(640, 640))
        return app

    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, python {platform.python_version()}")
    load = medians({
        "ours (det+rec only)": lambda: faces.load_face_analyzer(full_pack, providers=cpu),
        "FaceAnalysis, all modules": lambda: face_analysis(fm.BUFFALO_LIKE_PACK, None),
    }, rounds=3)
    base = load["FaceAnalysis, all modules"]
    print("\nanalyzer load (median)")
    for name, seconds in load.items():
        print(f"  {name:<34} {seconds * 1000:8.1f} ms  {seconds / base:6.2f}x")

    ours = faces.load_face_analyzer(real_pack, providers=cpu)
    detrec = face_analysis(fm.REAL_PACK, ["detection", "recognition"])
    everything = face_analysis(fm.BUFFALO_LIKE_PACK, None)
    photos = {"astronaut (1 face)": data.astronaut(), "t1 (6 faces)": np.ascontiguousarray(get_image("t1")[:, :, ::-1])}
    for name, rgb in photos.items():
        image, bgr = rgb.astype(np.float32) / 255.0, np.ascontiguousarray(rgb[:, :, ::-1])
        t = medians({
            "ours": lambda: faces.detect_and_embed(ours, image, select="left-to-right"),
            "FaceAnalysis det+rec": lambda: detrec.get(bgr),
            "FaceAnalysis, default modules": lambda: everything.get(bgr),
        }, rounds=args.rounds)
        base = t["FaceAnalysis, default modules"]
        print(f"\nencode {name} (median of {args.rounds})")
        for label, seconds in t.items():
            print(f"  {label:<34} {seconds * 1000:8.1f} ms  {seconds / base:6.2f}x")


if __name__ == "__main__":
    main()
