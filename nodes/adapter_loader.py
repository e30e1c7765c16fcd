"""FaceStudio Load Adapter: an IP-Adapter file from models/ipadapter, recognised and typed."""

from comfy_api.latest import io

from ..attention.adapters import (IPADAPTER_FOLDER, KIND_AUTO, KIND_CHOICES, AdapterError, adapter_file_names,
                                  load_adapter, plain_name_parts, resolve_adapter_path)
from ..attention.layers import cross_attention_positions, map_adapter_layers
from ..startup.model_sources import missing_file_message, paired_lora
from .types import FaceStudioAdapter


def adapter_file_problem(adapter_name: str) -> str | None:
    """Why `adapter_name` cannot be loaded from the ipadapter folders (not a name inside them, or not
    there: then with where to download it and, for a FaceID release, where its LoRA goes); None when it
    is there. Checked at validation, so one queue reports it together with every other missing file."""
    import folder_paths

    try:
        resolve_adapter_path(adapter_name)
        return None
    except AdapterError as e:
        if plain_name_parts(adapter_name) is None:  # an absolute path or '..': names are chosen inside the folder
            return f"Not in the adapter list: {e}"
    entry = folder_paths.folder_names_and_paths.get(IPADAPTER_FOLDER)
    folders = list(entry[0]) if entry else []
    lora = paired_lora(adapter_name)
    also = (f"The .bin release carries its LoRA (FaceStudio Apply's lora_strength applies it); a .safetensors "
            f"conversion without it needs {lora.name} in {lora.place}/ ({lora.url})." if lora else "")
    return missing_file_message("adapter file", adapter_name, IPADAPTER_FOLDER, folders, adapter_file_names(),
                                also)




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
    def validate_inputs(cls, adapter_name: str) -> bool | str:
        # Taking adapter_name here makes the host skip its own combo check for it and use this instead,
        # on every supported host (0.3.50 to v0.33; before v0.33 V3 combos were not checked at all).
        return adapter_file_problem(adapter_name) or True

    @classmethod
    def execute(cls, adapter_name: str, kind: str, model=None) -> io.NodeOutput:
        problem = adapter_file_problem(adapter_name)  # validation said so already; the file may have gone since
        if problem is not None:
            raise AdapterError(problem)
        adapter = load_adapter(resolve_adapter_path(adapter_name), kind)
        if model is not None:
            map_adapter_layers(adapter, cross_attention_positions(model))
        return io.NodeOutput(adapter)
