"""FaceStudio Prepare Dataset: a folder of photos encoded once (and cached) for training an adapter."""
from comfy_api.latest import io

from ..training.dataset import IMAGE_EXTENSIONS, RESOLUTION_STEP, folder_signature, prepare_dataset, resolve_dataset_folder
from .types import FaceStudioDataset, FaceStudioFaceAnalyzer


def _input_directory() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


class FaceStudioPrepareDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioPrepareDataset",
            display_name="FaceStudio Prepare Dataset",
            category="FaceStudio/training",
            description="Encodes a folder of photos of single people for training a FaceStudio adapter: each photo's "
                        "face embedding, its face-masked CLIP vision embedding, its VAE latent and its caption (a .txt "
                        "file of the same name). Photos that cannot be used are skipped and reported. The encodings "
                        "are cached in the folder's .facestudio_cache, so a re-run only encodes what changed.",
            inputs=[
                io.String.Input("folder", default="",
                                tooltip="The photos' folder: an absolute path, or the name of a folder inside ComfyUI's "
                                        f"input directory. Images: {', '.join(IMAGE_EXTENSIONS)}; captions in "
                                        "same-name .txt files (none: the empty prompt)."),
                FaceStudioFaceAnalyzer.Input("face_analyzer", tooltip="From FaceStudio Load Face Analyzer: finds the "
                                                                      "one face of each photo and embeds it."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the adapter will take image "
                                                           "embeddings from; each photo is encoded with its face "
                                                           "painted out."),
                io.Vae.Input("vae", tooltip="The base checkpoint's VAE: the photos' latents."),
                io.Clip.Input("clip", tooltip="The base checkpoint's text encoder: the captions' context and pooled "
                                              "embedding (the first 77 tokens; longer captions are reported)."),
                io.Int.Input("resolution", default=512, min=RESOLUTION_STEP, max=2048, step=RESOLUTION_STEP,
                             tooltip="Each photo's centred square is resized to this many pixels per side (a multiple "
                                     f"of {RESOLUTION_STEP})."),
            ],
            outputs=[
                FaceStudioDataset.Output(display_name="dataset", tooltip="The encoded examples, for training."),
                io.String.Output(display_name="report", tooltip="Photos kept, photos skipped with the reason, and "
                                                                "captions cut to 77 tokens."),
            ],
        )

    @classmethod
    def execute(cls, folder: str, face_analyzer, clip_vision, vae, clip, resolution: int) -> io.NodeOutput:
        import comfy.utils

        path = resolve_dataset_folder(folder, _input_directory())
        bar = comfy.utils.ProgressBar(1)
        dataset = prepare_dataset(path, face_analyzer, clip_vision, vae, clip, resolution=resolution,
                                  progress=lambda done, total: bar.update_absolute(done, total))
        return io.NodeOutput(dataset, dataset.report())

    @classmethod
    def fingerprint_inputs(cls, folder: str, resolution: int, **_):
        # The host caches by inputs: run again when a photo or caption in the folder changed.
        try:
            return f"{folder_signature(resolve_dataset_folder(folder, _input_directory()))}:{resolution}"
        except Exception:
            return folder
