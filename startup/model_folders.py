"""The model folders the pack reads, registered with the host's folder_paths.

Other packs (cubiq's IPAdapter_plus, InstantID, PuLID...) register `ipadapter`, `insightface`,
`pulid` and `facexlib` under the same names: we merge into their entries (add our path, widen the
extensions) and never replace them, so every pack keeps finding the files its users already have.
`clip_vision` is the host's own folder and is left alone.
"""
import os

import folder_paths

from ..attention.adapters import IPADAPTER_FOLDER

IPADAPTER = IPADAPTER_FOLDER
INSIGHTFACE = "insightface"
CLIP_VISION = "clip_vision"
PULID = "pulid"  # PuLID-FLUX files, the folder the PuLID packs share
FACEXLIB = "facexlib"  # facexlib's detector and parser, as the PuLID packs keep them

# `.bin` is the legacy pickle format of the reference IP-Adapter releases; it is loaded weights-only.
IPADAPTER_EXTENSIONS = {".safetensors", ".bin"}
INSIGHTFACE_EXTENSIONS = {".onnx"}
PULID_EXTENSIONS = {".safetensors"}
FACEXLIB_EXTENSIONS = {".pth"}


def register_folder(name: str, path: str, extensions: set[str]) -> None:
    entry = folder_paths.folder_names_and_paths.get(name)
    if entry is None:
        folder_paths.folder_names_and_paths[name] = ([path], set(extensions))
        return
    paths, known_extensions = entry
    if path not in paths:
        paths.append(path)
    if isinstance(known_extensions, set):
        known_extensions.update(extensions)
    else:  # some packs register a list; keep their object type but widen it
        folder_paths.folder_names_and_paths[name] = (paths, set(known_extensions) | extensions)
    folder_paths.filename_list_cache.pop(name, None)


def register_model_folders() -> None:
    register_folder(IPADAPTER, os.path.join(folder_paths.models_dir, IPADAPTER), IPADAPTER_EXTENSIONS)
    register_folder(INSIGHTFACE, os.path.join(folder_paths.models_dir, INSIGHTFACE), INSIGHTFACE_EXTENSIONS)
    register_folder(PULID, os.path.join(folder_paths.models_dir, PULID), PULID_EXTENSIONS)
    register_folder(FACEXLIB, os.path.join(folder_paths.models_dir, FACEXLIB), FACEXLIB_EXTENSIONS)
