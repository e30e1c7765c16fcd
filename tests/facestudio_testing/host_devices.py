"""Stand-ins for a GPU and for dynamic VRAM, on a machine that has neither.

- GPU_LIKE, torch.device("cpu", 0): torch keeps its tensors on the CPU, but it is not
  torch.device("cpu"), so load_models_gpu frees memory for it as for a GPU, and multi-GPU sampling
  treats it as a second device with its own worker thread.
- DynamicPatcher: the host's ModelPatcherDynamic as model management sees it. The real one makes itself
  a plain ModelPatcher for a CPU load device (model_patcher.py, ModelPatcherDynamic.__new__), and needs
  comfy_aimdo's CUDA allocator.
"""
from __future__ import annotations

import collections

import torch

import comfy.model_patcher

CPU, GPU_LIKE = torch.device("cpu"), torch.device("cpu", 0)


class DynamicPatcher(comfy.model_patcher.ModelPatcher):
    """is_dynamic() and the pin bookkeeping model management reads from dynamic patchers, without aimdo."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self.model, "dynamic_pins"):
            self.model.dynamic_pins = collections.defaultdict(lambda: {"active": False, "current_prompt": False})

    def is_dynamic(self):
        return True

    def loaded_ram_size(self):
        return 0

    def partially_unload_ram(self, *args, **kwargs):
        return 0

    def unregister_inactive_pins(self, *args, **kwargs):
        return 0

    def set_in_use_by_current_prompt(self, in_use):
        pass
