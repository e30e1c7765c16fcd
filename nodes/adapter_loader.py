"""FaceStudio Load Adapter: an IP-Adapter file from models/ipadapter, recognised and typed."""
from comfy_api.latest import io

from ..attention.adapters import KIND_AUTO, KIND_CHOICES, adapter_file_names, load_adapter, resolve_adapter_path
from ..attention.layers import cross_attention_positions, map_adapter_layers
from .types import FaceStudioAdapter


class FaceStudioAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioAdapterLoader",
            display_name="FaceStudio Load Adapter",
            category="FaceStudio/loaders",
            description="Loads an IP-Adapter FaceID or image-prompt file and recognises its kind, base model "
                        "and the widths it expects.",
            inputs=[
                io.Combo.Input("adapter_name", options=adapter_file_names(),
                               tooltip="An IP-Adapter FaceID (identity) or image-prompt (style) file from "
                                       "models/ipadapter, .safetensors or .bin."),
                io.Combo.Input("kind", options=list(KIND_CHOICES), default=KIND_AUTO,
                               tooltip="'auto' reads the kind from the file's keys and name. Pick one only for a "
                                       "renamed FaceID Plus v2 file whose name no longer says v2 (its keys are "
                                       "FaceID Plus's); it must agree with the keys."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: check now that the adapter's layers fit this model's "
                                       "cross-attention (right base model, layer count and widths)."),
            ],
            outputs=[FaceStudioAdapter.Output(display_name="adapter",
                                              tooltip="The recognised adapter, for the FaceStudio apply nodes.")],
        )

    @classmethod
    def execute(cls, adapter_name: str, kind: str, model=None) -> io.NodeOutput:
        adapter = load_adapter(resolve_adapter_path(adapter_name), kind)
        if model is not None:
            map_adapter_layers(adapter, cross_attention_positions(model))
        return io.NodeOutput(adapter)
