"""ComfyUI-FaceStudio: FaceStudio's identity-preserving, multi-identity generation for ComfyUI.

The host imports this package from custom_nodes/ and calls `comfy_entrypoint` (V3 node API).
Only relative imports inside the pack: its `nodes/` must never shadow the host's `nodes.py`.
`comfy_api.latest`: on every supported host (0.3.50 to v0.33) the versioned `v0_0_2` only re-exports it.
"""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODE_LIST
from .startup.example_photos import copy_example_photos
from .startup.model_folders import register_model_folders

# The frontend extension (web/saved_view.js): FaceStudio workflows open at their saved view, also as templates.
WEB_DIRECTORY = "./web"


class FaceStudioExtension(ComfyExtension):
    async def on_load(self) -> None:
        # v0.33 awaits on_load; hosts up to at least 0.3.64 never call it. Registering is idempotent,
        # so doing it here and in comfy_entrypoint is safe on every host.
        register_model_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)


async def comfy_entrypoint() -> FaceStudioExtension:
    register_model_folders()  # for hosts that never call on_load
    copy_example_photos()  # into the host's input folder (LoadImage lists only its top level); never fails
    return FaceStudioExtension()
