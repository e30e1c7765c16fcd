"""FaceStudio Identity Score: how much each generated face looks like each reference identity."""
from comfy_api.latest import io, ui

from ..inspection.drawing import draw_score_batch
from ..inspection.scoring import DEFAULT_THRESHOLD, score_images
from .types import FaceStudioFaceAnalyzer, FaceStudioIdentity

MAX_IDENTITIES = 8


class FaceStudioIdentityScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        optional = [
            FaceStudioIdentity.Input(f"identity_{i}", optional=True,
                                     tooltip=f"Optional: reference identity {i}, drawn in the colour Face Preview "
                                             f"gives face {i - 1} and mask {i - 1}.")
            for i in range(2, MAX_IDENTITIES + 1)
        ]
        return io.Schema(
            node_id="FaceStudioIdentityScore",
            display_name="FaceStudio Identity Score",
            category="FaceStudio/faces",
            description="Detects the faces of each image, pairs them with the reference identities by the "
                        "assignment that maximizes the summed cosine similarity, and reports each person's "
                        "similarity, the full faces x identities matrix (leakage between people), faces and "
                        "identities left unmatched, and a summary over the batch.",
            inputs=[
                io.Image.Input("image", tooltip="The generated image(s) to score; every image of a batch is scored."),
                FaceStudioFaceAnalyzer.Input("face_analyzer",
                                             tooltip="From FaceStudio Load Face Analyzer: the pack the identities "
                                                     "were encoded with (others are refused)."),
                FaceStudioIdentity.Input("identity_1", tooltip="Reference identity 1, drawn in the colour Face Preview "
                                                                "gives face 0 and mask 0."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=-1.0, max=1.0, step=0.01,
                               tooltip="A pair below this similarity is reported as 'probably not this person'. "
                                       "It only labels; the pairing is the same whatever its value."),
                *optional,
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The images with each face labelled with its identity "
                                                              "and similarity; same size and batch as the input."),
                io.String.Output(display_name="report", tooltip="The scores as readable text."),
                io.String.Output(display_name="json", tooltip="The same as JSON, for automation."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image, face_analyzer, identity_1, threshold: float = DEFAULT_THRESHOLD,
                **identities) -> io.NodeOutput:
        import comfy.utils
        import torch

        given = {**identities, "identity_1": identity_1}
        slots = [i for i in range(1, MAX_IDENTITIES + 1) if given.get(f"identity_{i}") is not None]
        named = [(f"identity_{i}", given[f"identity_{i}"]) for i in slots]
        bar = comfy.utils.ProgressBar(int(image.shape[0]))
        result = score_images(face_analyzer, image, named, threshold=threshold,
                              progress=lambda done, total: bar.update_absolute(done, total))
        # Colours by socket (identity_3 keeps the third colour when identity_2 is not connected).
        drawn = torch.from_numpy(draw_score_batch(image, result, [i - 1 for i in slots]))
        report, text = result.report(), result.json_text()
        shown = ui.PreviewImage(drawn, cls=cls).as_dict()
        return io.NodeOutput(drawn, report, text, ui={**shown, "text": [report]})
