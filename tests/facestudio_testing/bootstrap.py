"""Boots the host's module-level state in the order it needs, then imports the pack.

The host reads its command-line args when `folder_paths` and `comfy.model_management` are first
imported, so `--cpu`, `--base-directory` and the attention choice must be set before anything
else imports them. The pack is imported under the very module name the host's custom-node loader
gives it, so tests and the loaded custom node share one copy of every pack submodule.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "ComfyUI-FaceStudio"
MODEL_FOLDERS = ("checkpoints", "ipadapter", "insightface", "clip_vision", "loras", "controlnet", "unet")


def host_dir() -> Path:
    """The ComfyUI checkout under test: $COMFYUI_DIR (set by scripts/test.sh), else the clone."""
    path = Path(os.environ.get("COMFYUI_DIR") or PACK_ROOT / ".comfyui" / "ComfyUI")
    if not (path / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI host at {path}: run the tests through scripts/test.sh, which sets it up.")
    return path.resolve()


def make_base_directory(prefix: str) -> Path:
    """A fresh ComfyUI --base-directory with the pack linked into its custom_nodes."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir()
    for folder in MODEL_FOLDERS:
        (base / "models" / folder).mkdir(parents=True)
    (base / "custom_nodes" / PACK_LINK_NAME).symlink_to(PACK_ROOT, target_is_directory=True)
    return base


@dataclass
class BootedHost:
    comfy_dir: Path
    base: Path
    pack_module_name: str

    @property
    def models(self) -> Path:
        return self.base / "models"

    def pack_module(self, dotted: str = ""):
        """A submodule of the pack, e.g. pack_module("attention.adapters")."""
        name = self.pack_module_name + ("." + dotted if dotted else "")
        return importlib.import_module(name)


_BOOTED: BootedHost | None = None


def boot() -> BootedHost:
    global _BOOTED
    if _BOOTED is not None:
        return _BOOTED
    comfy_dir = host_dir()
    base = make_base_directory("facestudio-inprocess-")
    sys.path.insert(0, str(comfy_dir))
    # Must come first: once the host's nodes.py puts comfy/ on sys.path, `utils` resolves wrongly.
    import utils.install_util  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True
    args.base_directory = str(base)
    # PyTorch SDPA is the fastest CPU attention here (about 1.7x the sub-quadratic default).
    args.use_pytorch_cross_attention = True
    args.disable_auto_launch = True
    import folder_paths

    assert folder_paths.base_path == str(base)
    # The host's loader names a package custom node by its path with '.' replaced.
    module_path = os.path.join(folder_paths.get_folder_paths("custom_nodes")[0], PACK_LINK_NAME)
    name = module_path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(module_path, "__init__.py"), submodule_search_locations=[module_path]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _BOOTED = BootedHost(comfy_dir=comfy_dir, base=base, pack_module_name=name)
    return _BOOTED


def remove_base_directory() -> None:
    """The in-process host's temp base directory (model links, outputs) goes with the session."""
    if _BOOTED is not None:
        shutil.rmtree(_BOOTED.base, ignore_errors=True)
