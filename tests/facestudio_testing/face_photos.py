"""Real photos and face-model packs for the node tests of the preview and scoring nodes.

`t1` is insightface's six-person photo (1280x886, faces numbered 0-5 from left to right);
`t1_left` keeps its two leftmost people (faces 0 and 1) in a 420-px-wide crop, `t1_two` the same
two people with everything right of x = 420 painted black (the photo's size, so it batches with t1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from . import face_models as fm
from .tiny_models import link_model

LEFT_EDGE = 420  # between person 1 (x <= 370) and person 2 (x >= 462)


def t1() -> np.ndarray:
    import insightface

    return np.ascontiguousarray(insightface.data.get_image("t1")[:, :, ::-1])  # RGB uint8


def t1_left(photo: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(photo[:, :LEFT_EDGE])


def t1_two(photo: np.ndarray) -> np.ndarray:
    out = photo.copy()
    out[:, LEFT_EDGE:] = 0
    return out


def faceless(height: int = 886, width: int = 1280) -> np.ndarray:
    """A smooth colour gradient: no face at any detection size."""
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    return np.stack([ramp, ramp[::-1], np.full_like(ramp, 128)], axis=2).astype(np.uint8)


def comfy_float(rgb: np.ndarray) -> np.ndarray:
    """What the host's LoadImage makes of an 8-bit RGB file: float32 / 255."""
    return rgb.astype(np.float32) / 255.0


def install_packs(models: Path) -> tuple[str, str]:
    """The trained (YuNet/SFace) and tiny packs linked into the host's models/insightface/models/."""
    folder = "insightface/models"
    return (link_model(fm.real_pack(), models, folder, fm.REAL_PACK),
            link_model(fm.tiny_pack(), models, folder, fm.TINY_PACK))


def save_inputs(input_dir: Path, photos: dict[str, np.ndarray]) -> None:
    input_dir.mkdir(exist_ok=True)
    for name, rgb in photos.items():
        Image.fromarray(rgb).save(input_dir / name)


def analyzer_node(pack: str) -> dict:
    return {"class_type": "FaceStudioFaceAnalyzerLoader", "inputs": {"pack": pack, "provider": "CPU", "det_size": 640}}


def load_image(name: str) -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


def encode_node(analyzer: str, image: str, index: int) -> dict:
    """Encode Identity of face `index` (left to right) of the image."""
    return {"class_type": "FaceStudioIdentityEncode",
            "inputs": {"face_analyzer": [analyzer, 0], "image": [image, 0], "face": "index", "index": index,
                       "on_missing": "error", "outlier_threshold": 0.4}}


def batch_node(first: str, second: str) -> dict:
    return {"class_type": "ImageBatch", "inputs": {"image1": [first, 0], "image2": [second, 0]}}
