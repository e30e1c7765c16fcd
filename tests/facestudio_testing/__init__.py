"""Test harness for ComfyUI-FaceStudio: the real ComfyUI host, in-process and over HTTP.

Named so that nothing in it can shadow a host module (`nodes`, `server`, `utils`, ...) once the
tests folder is on sys.path.
"""
