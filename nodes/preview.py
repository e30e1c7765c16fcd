"""FaceStudio Face Preview: which face is which (and which region is whose) before sampling."""
from comfy_api.latest import io, ui

from ..encoders.faces import FACE_ORDERS
from ..inspection.drawing import DEFAULT_OPACITY, preview_batch
from .types import FaceStudioFaceAnalyzer


class FaceStudioFacePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioFacePreview",
            display_name="FaceStudio Face Preview",
            category="FaceStudio/faces",
            description="Draws the faces the analyzer finds (box, five key points, number and detection score) "
                        "and, when given, the region masks (mask i tinted in person i's colour), so you see which "
                        "face and which region each person gets before sampling.",
            inputs=[
                io.Image.Input("image", tooltip="The image(s) to look at; every image of a batch is drawn."),
                FaceStudioFaceAnalyzer.Input("face_analyzer", tooltip="From FaceStudio Load Face Analyzer: the same "
                                                                      "one your Encode Identity nodes use."),
                io.Combo.Input("order", options=list(FACE_ORDERS), default=FACE_ORDERS[0],
                               tooltip="How faces are numbered. left-to-right: the number Encode Identity's "
                                       "'index' takes (the face it picks with face = largest is marked 'largest'). "
                                       "largest: by box size, face 0 being the one face = largest picks."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional: the region masks (a MASK batch); mask i is tinted in the colour of "
                                      "face i and labelled 'mask i' (the mask_index of FaceStudio Person). Resized "
                                      "to the image when its size differs."),
                io.Float.Input("mask_opacity", default=DEFAULT_OPACITY, min=0.0, max=1.0, step=0.05,
                               tooltip="How strongly the masks tint the image (0: not at all)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The image(s) with faces and regions drawn; "
                                                                   "same size and batch as the input.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image, face_analyzer, order: str, mask_opacity: float = DEFAULT_OPACITY,
                masks=None) -> io.NodeOutput:
        import comfy.utils
        import torch

        bar = comfy.utils.ProgressBar(int(image.shape[0]))
        drawn = preview_batch(face_analyzer, image, order=order, masks=masks, opacity=mask_opacity,
                              progress=lambda done, total: bar.update_absolute(done, total))
        result = torch.from_numpy(drawn)
        return io.NodeOutput(result, ui=ui.PreviewImage(result, cls=cls))
