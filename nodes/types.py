"""The pack's own socket types, shared by every node so the editor only connects matching wires."""
from comfy_api.latest import io

# An IPAdapterWeights (attention/adapters.py): a recognised IP-Adapter FaceID / image-prompt file.
FaceStudioAdapter = io.Custom("FACESTUDIO_ADAPTER")
