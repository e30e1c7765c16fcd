"""Identity nodes: encode photos of one person, mix identities, save and load them."""
import os

from comfy_api.latest import io

from ..encoders.faces import images_list
from ..encoders.identity_files import load_identity, save_identity
from ..encoders.identity_folder import IDENTITY_SUBFOLDER, identity_file_names, new_identity_path, resolve_identity_file
from ..encoders.mixing import mix_identities
from ..encoders.multishot import DEFAULT_OUTLIER_THRESHOLD, ON_MISSING, encode_identity
from .types import FaceStudioFaceAnalyzer, FaceStudioIdentity


# Encode Identity's optional photo inputs beside `image`, in shot order.
MORE_IMAGES = ("image_2", "image_3", "image_4")


def identities_folder() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), IDENTITY_SUBFOLDER)


class FaceStudioIdentityEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioIdentityEncode",
            display_name="FaceStudio Encode Identity",
            category="FaceStudio/identity",
            description="Detects, aligns and embeds one face per photo and combines the shots into one identity; "
                        "shots that do not look like the others are dropped and reported. Photos of different "
                        "sizes go on image, image_2, ... (no Image Batch needed).",
            inputs=[
                FaceStudioFaceAnalyzer.Input("face_analyzer", tooltip="From FaceStudio Load Face Analyzer."),
                io.Image.Input("image", tooltip="One or more photos of the same person (a batch: one shot per image). "
                                                "More photos, each at its own size: image_2 to "
                                                f"{MORE_IMAGES[-1]}."),
                io.Combo.Input("face", options=["largest", "index"], default="largest",
                               tooltip="Which face of each photo: the largest, or the one numbered 'index' "
                                       "from left to right."),
                io.Int.Input("index", default=0, min=0, max=63,
                             tooltip="With face = index: the face's number, counted from 0 left to right."),
                io.Combo.Input("on_missing", options=list(ON_MISSING), default="error",
                               tooltip="A photo without a face: 'error' stops and names it; 'skip' leaves it out "
                                       "(reported), as long as one photo has a face."),
                io.Float.Input("outlier_threshold", default=DEFAULT_OUTLIER_THRESHOLD, min=-1.0, max=1.0, step=0.01,
                               tooltip="With 3+ shots, a shot whose cosine to the others is below this is dropped. "
                                       "-1 keeps every shot."),
                FaceStudioIdentity.Input("identity", optional=True,
                                         tooltip="Optional: an identity to add these shots to."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional: the CLIP vision model (ViT-H for the SD1.5 ones), needed for "
                                            "FaceID Plus / Plus v2 adapters, which also take CLIP features of the "
                                            "aligned face crop. Needed again when adding shots to an identity "
                                            "that has them."),
                # Sockets only, after every existing input: saved workflows keep their inputs and widget values.
                *(io.Image.Input(name, optional=True,
                                 tooltip=f"Optional: more photos of the same person (one or a batch), at any size: "
                                         f"each photo keeps its own, nothing is resized. Shots are numbered in "
                                         f"input order (image, then image_2, ...). For more than "
                                         f"{len(MORE_IMAGES) + 1} inputs, chain Encode nodes through 'identity'.")
                  for name in MORE_IMAGES),
            ],
            outputs=[
                FaceStudioIdentity.Output(display_name="identity", tooltip="The person's identity."),
                io.String.Output(display_name="report", tooltip="Shots used and dropped, with their scores."),
            ],
        )

    @classmethod
    def execute(cls, face_analyzer, image, face: str, index: int, on_missing: str, outlier_threshold: float,
                identity=None, clip_vision=None, image_2=None, image_3=None, image_4=None) -> io.NodeOutput:
        import comfy.utils

        # One list of single photos, each at its own size (encode_identity takes such a list).
        photos = [photo for batch in (image, image_2, image_3, image_4) if batch is not None
                  for photo in images_list(batch)]
        bar = comfy.utils.ProgressBar(len(photos))
        result = encode_identity(face_analyzer, photos, select=face, index=index, on_missing=on_missing,
                                 outlier_threshold=outlier_threshold, base=identity,
                                 progress=lambda done, total: bar.update_absolute(done, total),
                                 clip_vision=clip_vision)
        return io.NodeOutput(result, result.report())


class FaceStudioIdentityMix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        def weight(name, default, tip):
            return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, tooltip=tip)

        return io.Schema(
            node_id="FaceStudioIdentityMix",
            display_name="FaceStudio Mix Identities",
            category="FaceStudio/identity",
            description="A weighted blend of identities made with the same face recognizer.",
            inputs=[
                FaceStudioIdentity.Input("identity_a", tooltip="The first identity."),
                FaceStudioIdentity.Input("identity_b", tooltip="The second identity."),
                weight("weight", 0.5, "Share of identity_b; identity_a gets 1 - weight. 0 gives identity_a unchanged."),
                FaceStudioIdentity.Input("identity_c", optional=True, tooltip="Optional third identity."),
                weight("weight_c", 0.0, "Weight of identity_c, relative to a + b (which sum to 1)."),
                FaceStudioIdentity.Input("identity_d", optional=True, tooltip="Optional fourth identity."),
                weight("weight_d", 0.0, "Weight of identity_d, relative to a + b (which sum to 1)."),
            ],
            outputs=[FaceStudioIdentity.Output(display_name="identity", tooltip="The mixed identity.")],
        )

    @classmethod
    def execute(cls, identity_a, identity_b, weight: float, weight_c: float = 0.0, weight_d: float = 0.0,
                identity_c=None, identity_d=None) -> io.NodeOutput:
        parts = [(identity_a, 1.0 - weight), (identity_b, weight), (identity_c, weight_c), (identity_d, weight_d)]
        return io.NodeOutput(mix_identities([(i, w) for i, w in parts if i is not None]))


class FaceStudioIdentitySave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioIdentitySave",
            display_name="FaceStudio Save Identity",
            category="FaceStudio/identity",
            description=f"Saves an identity to the output folder's {IDENTITY_SUBFOLDER.replace(os.sep, '/')} "
                        "subfolder, for FaceStudio Load Identity.",
            inputs=[
                FaceStudioIdentity.Input("identity", tooltip="The identity to save."),
                io.String.Input("filename_prefix", default="identity",
                                tooltip="File name prefix (sub-folders allowed, no '..'); a number and "
                                        ".safetensors are appended."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, identity, filename_prefix: str) -> io.NodeOutput:
        root = identities_folder()
        path = save_identity(identity, new_identity_path(root, filename_prefix))
        name = path.relative_to(root).as_posix()
        return io.NodeOutput(ui={"text": [f"Saved {name} ({identity.shot_count} shot(s))."]})


class FaceStudioIdentityLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioIdentityLoad",
            display_name="FaceStudio Load Identity",
            category="FaceStudio/identity",
            description="Loads an identity saved by FaceStudio Save Identity.",
            inputs=[
                io.Combo.Input("identity_file", options=identity_file_names(identities_folder()),
                               tooltip=f"A saved identity, from the output folder's "
                                       f"{IDENTITY_SUBFOLDER.replace(os.sep, '/')} subfolder."),
            ],
            outputs=[FaceStudioIdentity.Output(display_name="identity", tooltip="The saved identity.")],
        )

    @classmethod
    def execute(cls, identity_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_identity(resolve_identity_file(identities_folder(), identity_file)))

    @classmethod
    def fingerprint_inputs(cls, identity_file: str):
        # Re-run when the file changes on disk (same name saved again).
        try:
            path = resolve_identity_file(identities_folder(), identity_file)
            stat = path.stat()
            return f"{stat.st_size}:{stat.st_mtime_ns}"
        except Exception:
            return identity_file
