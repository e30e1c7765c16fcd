"""Lets a CUDA-built torchvision import beside a CPU-only torch.

PyPI serves torchvision only as CUDA builds. With CPU torch its ops library (_C.so) fails to load,
and `torchvision/_meta_registrations.py` then dies registering fake kernels for `torchvision::nms`
and `torchvision::qnms` ("operator torchvision::nms does not exist"). ComfyUI imports
torchvision at start-up, so the whole host fails.

scripts/setup.sh installs this module (with a .pth line that imports it) only when a plain
`import torchvision` fails. It adds an import hook: just before torchvision loads, it tries the
real ops library; only if that fails does it define the op schemas (without kernels), so
torchvision imports and everything but its detection ops works. Nothing is imported at
interpreter start-up beyond this small module.
"""
import importlib.abc
import sys

# torchvision's _meta_registrations.py registers fake kernels for these two unconditionally; the
# others it guards with `extension._has_ops()`, so only these need a schema.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = None  # kept alive: dropping a torch.library.Library removes its definitions


def _ops_library_loads(spec) -> bool:
    import glob
    import os

    import torch

    for location in spec.submodule_search_locations or ():
        for path in glob.glob(os.path.join(location, "_C*.so")):
            try:
                torch.ops.load_library(path)
                return True
            except OSError:
                return False
    return False


def _define_schemas() -> None:
    global _LIBRARY
    import torch

    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _LIBRARY.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is not None and not _ops_library_loads(spec):
            _define_schemas()
        return None  # let the normal finders import it


sys.meta_path.insert(0, _BeforeTorchvision())
