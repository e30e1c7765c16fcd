"""ComfyUI node classes: thin V3 schemas that call encoders/ and attention/."""
NODE_LIST = []
