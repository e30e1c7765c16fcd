"""FaceStudio Load Face Analyzer: an insightface model pack from models/insightface/models/<name>."""
import os

from comfy_api.latest import io

from ..encoders.faces import FaceModelError, load_face_analyzer
from ..startup.model_folders import INSIGHTFACE
from ..startup.model_sources import AFTER, source
from .types import FaceStudioFaceAnalyzer

# The provider choices shown, and what each asks encoders.faces.resolve_providers for.
PROVIDERS = {"auto": "auto", "CPU": "cpu", "CUDA": "cuda", "ROCm": "rocm", "CoreML": "coreml", "DirectML": "directml"}


def pack_folders() -> list[str]:
    """The host's insightface folders, each with '/models' appended (where packs go)."""
    import folder_paths

    if INSIGHTFACE not in folder_paths.folder_names_and_paths:
        return []
    return [os.path.join(path, "models") for path in folder_paths.get_folder_paths(INSIGHTFACE)]


def pack_names() -> list[str]:
    names = []
    for folder in pack_folders():
        if os.path.isdir(folder):
            names += [n for n in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, n))]
    return list(dict.fromkeys(names))


def pack_problem(name: str) -> str | None:
    """Why the model pack `name` cannot be loaded (not a folder name, or in no insightface folder: then
    with where to download it); None when its folder is there (encoders.faces checks what is inside).
    Checked at validation, so one queue reports it together with every other missing file."""
    folders = pack_folders()
    where = " or ".join(folders) or "models/insightface/models"
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        return (f"Not in the list of model packs: '{name}' is not a model pack folder name: pick one of the "
                f"folders in {where}.")
    if _pack_path(name) is not None:
        return None
    found = pack_names()
    text = (f"No insightface model pack '{name}' (not in {where}; "
            + (f"found: {', '.join(found)})." if found else "no pack found at all)."))
    entry = source(name)
    if entry is not None and entry.folder == INSIGHTFACE:
        text += " " + entry.how_to_get()
    else:
        text += (f" Put a pack (e.g. buffalo_l, a folder of .onnx files: {source('buffalo_l').url}) in {where}.")
    return f"{text} {AFTER}"


def _pack_path(name: str) -> str | None:
    for folder in pack_folders():
        candidate = os.path.join(folder, name)
        if os.path.isdir(candidate):
            return candidate
    return None


def resolve_pack(name: str) -> str:
    problem = pack_problem(name)
    if problem is not None:
        raise FaceModelError(problem)
    return _pack_path(name)


class FaceStudioFaceAnalyzerLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioFaceAnalyzerLoader",
            display_name="FaceStudio Load Face Analyzer",
            category="FaceStudio/loaders",
            description="Loads the face detector and recognizer of an insightface model pack "
                        "(models/insightface/models/<name>).",
            inputs=[
                io.Combo.Input("pack", options=pack_names(),
                               tooltip="An insightface model pack folder in models/insightface/models. "
                                       "IP-Adapter FaceID (every kind) needs buffalo_l: it was trained on its "
                                       "w600k_r50 embeddings, and Apply refuses identities made with antelopev2 "
                                       "(glintr100, also 512 wide but another embedding space)."),
                io.Combo.Input("provider", options=list(PROVIDERS), default="auto",
                               tooltip="Where the face models run. 'auto' picks the best one this onnxruntime has; "
                                       "a provider that cannot start is reported in the log, not hidden."),
                io.Int.Input("det_size", default=640, min=160, max=1280, step=32,
                             tooltip="Detection size in pixels (square). 640 is the IP-Adapter reference."),
            ],
            outputs=[FaceStudioFaceAnalyzer.Output(display_name="face_analyzer",
                                                   tooltip="The loaded detector and recognizer.")],
        )

    @classmethod
    def validate_inputs(cls, pack: str) -> bool | str:
        # Taking `pack` here makes the host skip its own combo check for it and use this instead, on every
        # supported host: a missing pack is named at validation with every other missing file, not at run time.
        return pack_problem(pack) or True

    @classmethod
    def execute(cls, pack: str, provider: str, det_size: int) -> io.NodeOutput:
        if provider not in PROVIDERS:
            raise FaceModelError(f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
        analyzer = load_face_analyzer(resolve_pack(pack), providers=PROVIDERS[provider], det_size=(det_size, det_size))
        return io.NodeOutput(analyzer)
