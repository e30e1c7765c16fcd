"""PuLID's reference implementation and facexlib, imported for the tests to compare against.

ToTheBeginning/PuLID (Apache-2.0) is cloned at the commit of scripts/pulid.pin by scripts/setup.sh
into $FACESTUDIO_PULID_DIR (default .comfyui/PuLID), never committed; its folder goes on sys.path
here, at test time, so that its top-level packages (`eva_clip`, `pulid`) import as its own code does.
Its `eva_clip` package needs `ftfy` (its tokenizer, imported by the package) and `timm`.

facexlib (the reference's face alignment and parsing) must be installed without its declared
dependencies (`pip install --no-deps facexlib`, plus `filterpy` and `numba` that its package
__init__ imports): its `opencv-python` requirement would replace the host's opencv-python-headless.
A missing clone or package is an error naming the fix, never a skip.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

from .bootstrap import PACK_ROOT

PULID_PIN = PACK_ROOT / "scripts" / "pulid.pin"
EVA_MODEL_NAME = "EVA02-CLIP-L-14-336"


def _pinned_commit() -> str:
    for line in PULID_PIN.read_text().splitlines():
        if line.startswith("commit="):
            return line.split("=", 1)[1].strip()
    raise RuntimeError(f"{PULID_PIN} has no 'commit=' line")


def pulid_dir() -> Path:
    """The clone of the pinned commit; a missing or different checkout is an error."""
    path = Path(os.environ.get("FACESTUDIO_PULID_DIR") or PACK_ROOT / ".comfyui" / "PuLID")
    commit = _pinned_commit()
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0 or head.stdout.strip() != commit:
        raise RuntimeError(f"No PuLID checkout of {commit} at {path} (found {head.stdout.strip() or 'none'}): run "
                           "scripts/setup.sh, which clones it, or set FACESTUDIO_PULID_DIR to such a clone.")
    if not all((path / f).is_file() for f in ("eva_clip/eva_vit_model.py", "pulid/encoders_transformer.py")):
        raise RuntimeError(f"{path} is at {commit} but lacks eva_clip/ or pulid/: check out the whole tree again.")
    return path.resolve()


def _import(name: str):
    root = str(pulid_dir())
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise RuntimeError(f"PuLID's reference module {name} does not import ({e}); it needs ftfy and timm "
                           "(pip install ftfy timm)") from e


def eva_clip():
    """The reference's `eva_clip` package (EVA-CLIP's own model code, as PuLID ships it)."""
    return _import("eva_clip")


def idformer_class():
    return _import("pulid.encoders_transformer").IDFormer


def facexlib(name: str):
    """A facexlib module, e.g. "facexlib.detection.retinaface"."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise RuntimeError(f"facexlib does not import ({e}): `pip install --no-deps facexlib` "
                           "then `pip install filterpy numba` (facexlib's own requirements would replace "
                           "opencv-python-headless with opencv-python)") from e
