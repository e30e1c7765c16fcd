"""PuLID-FLUX nodes: load the PuLID-FLUX models, encode an identity, add persons, apply them to a FLUX MODEL."""
from comfy_api.latest import io

from ..attention.pulid_flux_adapter import PuLIDFluxError
from ..attention.pulid_flux_apply import add_flux_person, apply_pulid_flux_persons
from ..encoders.eva_clip import FILE_NAME as EVA_FILE
from ..encoders.face_parsing import DETECTOR_FILE, PARSER_FILE
from ..encoders.faces import images_list
from ..encoders.pulid_flux_host import encode_on_host, load_pulid_flux_on_host
from ..startup.model_folders import CLIP_VISION, FACEXLIB, PULID
from ..startup.model_sources import missing_file_message
from .apply import placement_inputs
from .types import FaceStudioFaceAnalyzer

# A PuLIDFlux (encoders/pulid_flux_identity.py): the CA weights, IDFormer, EVA-CLIP and facexlib models, loaded.
FaceStudioPuLIDFlux = io.Custom("FACESTUDIO_PULID_FLUX")
# A PuLIDFluxIdentity: one person's PuLID-FLUX ID tokens.
FaceStudioPuLIDFluxIdentity = io.Custom("FACESTUDIO_PULID_FLUX_IDENTITY")
# A tuple of attention.flux_patch.FluxPerson, in order (never changed in place).
FaceStudioPuLIDFluxPersons = io.Custom("FACESTUDIO_PULID_FLUX_PERSONS")


def _file_names(folder: str) -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(folder) if folder in folder_paths.folder_names_and_paths else []


def model_file_path(what: str, folder: str, name: str) -> str:
    """The full path of `name` in the host's `folder` folders; a PuLIDFluxError saying where to get it when absent.
    Only names the folder lists count, so a name cannot reach outside it ('..', an absolute path)."""
    import folder_paths

    listed = _file_names(folder)
    path = folder_paths.get_full_path(folder, name) if name in listed else None
    if path is None:
        entry = folder_paths.folder_names_and_paths.get(folder)
        raise PuLIDFluxError(missing_file_message(what, name, folder, list(entry[0]) if entry else [], listed))
    return path


def _loader_files(pulid_file: str, eva_clip: str) -> tuple[tuple[str, str, str], ...]:
    """(what, folder, name) of every file Load PuLID-FLUX reads."""
    return (("PuLID-FLUX file", PULID, pulid_file), ("EVA-CLIP file", CLIP_VISION, eva_clip),
            ("facexlib face detector", FACEXLIB, DETECTOR_FILE), ("facexlib face parser", FACEXLIB, PARSER_FILE))


def pulid_flux_files_problem(pulid_file: str, eva_clip: str) -> str | None:
    """Every file of Load PuLID-FLUX that is not there, each with its folder and where to get it, in one
    message; None when all are. Checked at validation, with every other missing file of the prompt."""
    problems = []
    for what, folder, name in _loader_files(pulid_file, eva_clip):
        try:
            model_file_path(what, folder, name)
        except PuLIDFluxError as e:
            problems.append(str(e))
    return "\n".join(problems) or None


class FaceStudioPuLIDFluxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioPuLIDFluxLoader",
            display_name="FaceStudio Load PuLID-FLUX",
            category="FaceStudio/loaders",
            description="Loads a PuLID-FLUX file (identity cross-attention and IDFormer) with the EVA-CLIP tower and "
                        f"facexlib's face detector and parser ({DETECTOR_FILE}, {PARSER_FILE} in models/{FACEXLIB}).",
            inputs=[
                io.Combo.Input("pulid_file", options=_file_names(PULID),
                               tooltip=f"A PuLID-FLUX file from models/{PULID} (pulid_flux_v0.9.1.safetensors), "
                                       "for FLUX.1 dev or schnell."),
                io.Combo.Input("eva_clip", options=_file_names(CLIP_VISION),
                               tooltip=f"EVA02-CLIP-L-14-336 ({EVA_FILE}) from models/{CLIP_VISION}."),
            ],
            outputs=[FaceStudioPuLIDFlux.Output(display_name="pulid_flux",
                                                tooltip="The loaded PuLID-FLUX models, for Encode Identity "
                                                        "PuLID-FLUX and Apply PuLID-FLUX.")],
        )

    @classmethod
    def validate_inputs(cls, pulid_file: str, eva_clip: str) -> bool | str:
        # Taking both combos here makes the host skip its own combo check for them and use this instead, on every
        # supported host: the four files are named at validation, with every other missing file of the prompt.
        return pulid_flux_files_problem(pulid_file, eva_clip) or True

    @classmethod
    def execute(cls, pulid_file: str, eva_clip: str) -> io.NodeOutput:
        paths = tuple(model_file_path(*file) for file in _loader_files(pulid_file, eva_clip))
        return io.NodeOutput(load_pulid_flux_on_host(*paths))


class FaceStudioPuLIDFluxIdentityEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioPuLIDFluxIdentityEncode",
            display_name="FaceStudio Encode Identity PuLID-FLUX",
            category="FaceStudio/identity",
            description="PuLID-FLUX's ID tokens of one person: the largest face's ArcFace embedding (antelopev2) "
                        "and the EVA-CLIP features of the parsed face, through the IDFormer; several photos are "
                        "averaged.",
            inputs=[
                FaceStudioPuLIDFlux.Input("pulid_flux", tooltip="From FaceStudio Load PuLID-FLUX."),
                FaceStudioFaceAnalyzer.Input("face_analyzer",
                                             tooltip="From FaceStudio Load Face Analyzer, with the antelopev2 pack "
                                                     "(PuLID-FLUX was trained on its glintr100 embeddings)."),
                io.Image.Input("image", tooltip="One or more photos of the same person (a batch: one photo per "
                                                "image)."),
            ],
            outputs=[
                FaceStudioPuLIDFluxIdentity.Output(display_name="identity", tooltip="The person's ID tokens."),
                io.String.Output(display_name="report", tooltip="Photos used and the recognizer."),
            ],
        )

    @classmethod
    def execute(cls, pulid_flux, face_analyzer, image) -> io.NodeOutput:
        import comfy.utils

        photos = images_list(image)
        bar = comfy.utils.ProgressBar(len(photos))
        identity = encode_on_host(pulid_flux, face_analyzer, photos,
                                  progress=lambda done, total: bar.update_absolute(done, total))
        return io.NodeOutput(identity, identity.report())


class FaceStudioPuLIDFluxPerson(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioPuLIDFluxPerson",
            display_name="FaceStudio Person PuLID-FLUX",
            category="FaceStudio/apply",
            description="Adds one person (a PuLID-FLUX identity, optionally confined to a mask) to a PuLID-FLUX "
                        "person list.",
            inputs=[
                FaceStudioPuLIDFluxIdentity.Input("identity", tooltip="From FaceStudio Encode Identity PuLID-FLUX."),
                io.Float.Input("weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="How strongly the identity acts (the reference's id_weight; 1.0 is its "
                                       "default). 0 leaves the image as without it."),
                *placement_inputs(FaceStudioPuLIDFluxPersons),
            ],
            outputs=[FaceStudioPuLIDFluxPersons.Output(display_name="persons",
                                                       tooltip="The person list with this person added.")],
        )

    @classmethod
    def execute(cls, identity, weight: float, start: float, end: float, persons=None, mask=None,
                mask_index: int = 0) -> io.NodeOutput:
        return io.NodeOutput(add_flux_person(persons, identity, weight, start, end, mask, mask_index))


class FaceStudioPuLIDFluxApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioPuLIDFluxApply",
            display_name="FaceStudio Apply PuLID-FLUX",
            category="FaceStudio/apply",
            description="PuLID-FLUX's identity cross-attention on a FLUX.1 model, each person in their own region.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 dev or schnell model (it is cloned; the input stays "
                                                "unchanged)."),
                FaceStudioPuLIDFlux.Input("pulid_flux", tooltip="From FaceStudio Load PuLID-FLUX."),
                FaceStudioPuLIDFluxPersons.Input("persons", tooltip="From FaceStudio Person PuLID-FLUX nodes."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched model.")],
        )

    @classmethod
    def execute(cls, model, pulid_flux, persons) -> io.NodeOutput:
        return io.NodeOutput(apply_pulid_flux_persons(model, pulid_flux, persons))
