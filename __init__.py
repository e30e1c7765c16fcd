"""ComfyUI-FaceStudio: FaceStudio's identity-preserving, multi-identity generation for ComfyUI.

The host imports this package from custom_nodes/ and calls `comfy_entrypoint` (V3 node API).
Only relative imports inside the pack: its `nodes/` must never shadow the host's `nodes.py`.
"""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODE_LIST
from .nodes.model_folders import register_model_folders


class FaceStudioExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)


async def comfy_entrypoint() -> FaceStudioExtension:
    # Here rather than in ComfyExtension.on_load, which hosts up to at least 0.3.64 never call.
    register_model_folders()
    return FaceStudioExtension()
