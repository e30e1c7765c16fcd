"""FaceStudio Encode Style: a style image through the host's CLIP vision model."""
from comfy_api.latest import io

from ..encoders.style import encode_style
from .types import FaceStudioFaceAnalyzer, FaceStudioStyle


class FaceStudioStyleEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioStyleEncode",
            display_name="FaceStudio Encode Style",
            category="FaceStudio/style",
            description="Encodes a style image with a CLIP vision model, optionally painting out its faces first "
                        "so only its look is taken, not its people.",
            inputs=[
                io.Image.Input("image", tooltip="The style image(s)."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model your image-prompt adapter expects "
                                                           "(ViT-H for the SD1.5 ones)."),
                FaceStudioFaceAnalyzer.Input("face_analyzer", optional=True,
                                             tooltip="Optional: paint out the faces this finds before encoding."),
                io.Float.Input("mask_margin", default=0.25, min=0.0, max=2.0, step=0.05,
                               tooltip="With a face analyzer: how far beyond each face box to paint, as a share "
                                       "of the box's size."),
            ],
            outputs=[FaceStudioStyle.Output(display_name="style", tooltip="The style image's CLIP features.")],
        )

    @classmethod
    def execute(cls, image, clip_vision, mask_margin: float, face_analyzer=None) -> io.NodeOutput:
        return io.NodeOutput(encode_style(clip_vision, image, analyzer=face_analyzer, mask_margin=mask_margin))
