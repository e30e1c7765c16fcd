"""ComfyUI node classes: thin V3 schemas that call encoders/ and attention/."""
from .adapter_loader import FaceStudioAdapterLoader

NODE_LIST = [FaceStudioAdapterLoader]
