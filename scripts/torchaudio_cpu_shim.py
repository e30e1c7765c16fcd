"""Lets torchaudio's Python package import when its compiled extension cannot load with this torch.

ComfyUI v0.33 imports torchaudio at start-up (comfy/sd.py -> comfy/ldm/lightricks/vae/audio_vae.py,
comfy/text_encoders/gemma4.py -> torchaudio.functional), so without it no image model loads either.
torchaudio's compiled libraries are built against one torch release: where none matches the torch
installed (e.g. torch 2.13 CPU, newest torchaudio 2.11), `torchaudio/_extension/__init__.py` calls
`_load_lib("_torchaudio")`, which raises OSError (undefined symbols), and `import torchaudio` fails.

scripts/setup.sh installs this module (with a .pth line that imports it) only when a plain
`import torchaudio` fails. Its import hook wraps `torchaudio._extension.utils._load_lib` as that
module loads: a library that fails to load counts as absent, which torchaudio itself supports (its
pex deployments have no library files), so the Python package imports and reports
`_IS_TORCHAUDIO_EXT_AVAILABLE = False`. Audio ops that need the extension raise when called; no image
path uses them. Nothing is imported at interpreter start-up beyond this small module.
"""
import importlib.abc
import importlib.machinery
import logging
import sys

_TARGET = "torchaudio._extension.utils"


def _tolerant(load_lib):
    def _load_lib(lib):
        try:
            return load_lib(lib)
        except OSError as error:
            logging.getLogger("torchaudio").debug("torchaudio: %s cannot load with this torch (%s)", lib, error)
            return False

    return _load_lib


class _WrapLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module._load_lib = _tolerant(module._load_lib)


class _BeforeTorchaudioExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _WrapLoader(spec.loader)
        return spec


sys.meta_path.insert(0, _BeforeTorchaudioExtension())
