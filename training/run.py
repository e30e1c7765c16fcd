"""One training run as the Train node and the command line both do it: a trainable copy of the model,
a new adapter or the one being resumed, training in spans of `save_every` steps with the adapter file
and its state file written after each span, and the trained adapter back as Load Adapter reads it.

The adapter file is `<name>.safetensors` in the ipadapter folder (or any path the command line names),
its state `<name>.state.pt` beside it (trainer.py): a run stopped at a save continues from there,
exactly, when started again with `resume`.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..attention.adapters import BASE_BY_CONTEXT, AdapterError, IPAdapterWeights, load_adapter, plain_name_parts
from ..attention.facestudio_fusion import DEFAULT_TOKENS
from ..attention.facestudio_metadata import NOT_STATED, FaceStudioMetadata
from .adapter_file import adapter_weights, save_adapter, trainable_from_weights
from .trainable_adapter import TrainableAdapter
from .trainer import TrainingSettings, TrainingState, load_state, save_state, train

__all__ = ["Licences", "TrainingResult", "train_adapter", "state_path", "trainable_model", "adapter_path_for"]


@dataclass(frozen=True)
class Licences:
    """What the user states about the data and the face models; recorded in every file the run writes."""

    dataset: str = NOT_STATED
    face_models: str = NOT_STATED


@dataclass(frozen=True)
class TrainingResult:
    adapter: IPAdapterWeights       # the trained adapter, as Load Adapter would read its file
    state: TrainingState
    path: Path                      # the adapter file written last

    @property
    def loss_map(self) -> dict:
        """The losses in the host's LOSS_MAP form (LossGraphNode draws it): one per step, in order."""
        return {"loss": [self.state.losses[s] for s in sorted(self.state.losses)]}


def state_path(adapter_path: str | Path) -> Path:
    adapter_path = Path(adapter_path)
    return adapter_path.with_name(adapter_path.stem + ".state.pt")


def trainable_model(model):
    """A MODEL whose weights autograd can save for the backward pass. Models loaded by the executor are
    inference tensors (it runs under torch.inference_mode), which autograd refuses: the host's own LoRA
    trainer trains on `clone(force_deepcopy=True)` (v0.33), which loads a copy again from the file the
    model came from; hosts without it (and models not loaded from a file) get a deep copy of the model."""
    with torch.inference_mode(False):
        if not any(p.is_inference() for p in model.model.parameters()):
            return model
        if ("force_deepcopy" in inspect.signature(model.clone).parameters
                and getattr(model, "cached_patcher_init", None) is not None):
            return model.clone(force_deepcopy=True)
        import comfy.utils

        clone = model.clone()
        copied = copy.deepcopy(model.model)  # clones every tensor, outside inference mode: ordinary ones
        # A loaded model holds its patches (a LoRA) in its weights, the originals in `backup`: the copy gets
        # the originals back and is marked unpatched, so loading it patches it once, as it does the model.
        for key, saved in getattr(model, "backup", {}).items():
            comfy.utils.set_attr_param(copied, key, saved.weight.detach().clone())
        if hasattr(copied, "current_weight_patches_uuid"):
            copied.current_weight_patches_uuid = None
        clone.model = copied
        return clone


def _metadata(dataset, base_model: str, num_tokens: int, settings: TrainingSettings, steps_done: int,
              licences: Licences) -> FaceStudioMetadata:
    batch = dataset.batch
    return FaceStudioMetadata(
        base_model=base_model, recognizer=dataset.recognizer,
        # The encoders by fingerprint (training/dataset.py): a file name says little once files are renamed.
        clip_vision={"fingerprint": dataset.fingerprints.clip_vision, "image_embeds_width": int(batch.image_embeds.shape[-1]),
                     "face_mask_margin": dataset.mask_margin},
        text_encoder={"fingerprint": dataset.fingerprints.text_encoder, "pooled_width": int(batch.text_embeds.shape[-1])},
        num_tokens=num_tokens,
        training={**settings.as_dict(), "steps_done": steps_done, "examples": len(batch),
                  "resolution": dataset.resolution},
        dataset_licence=licences.dataset or NOT_STATED, face_models_licence=licences.face_models or NOT_STATED)


def train_adapter(model, dataset, settings: TrainingSettings, adapter_path: str | Path, *, resume: bool = False,
                  save_every: int = 0, num_tokens: int = DEFAULT_TOKENS, licences: Licences = Licences(),
                  overwrite: bool = False, on_step: Callable[[int, float], None] | None = None) -> TrainingResult:
    """Trains a FaceStudio adapter for `model` (a MODEL) on `dataset` (training/dataset.py's
    EncodedDataset) up to settings.steps, writing the adapter and its state every `save_every` steps (0:
    at the end only). resume: continue the run saved at adapter_path (same settings, steps may grow);
    otherwise an existing file there is refused unless `overwrite`."""
    # The executor runs nodes under torch.inference_mode, whose tensors autograd refuses to save: the
    # model copy, the adapter and the examples are all made outside it.
    with torch.inference_mode(False):
        return _train(model, dataset, settings, Path(adapter_path), resume, save_every, num_tokens, licences,
                      overwrite, on_step)


def _train(model, dataset, settings, adapter_path: Path, resume, save_every, num_tokens, licences, overwrite,
           on_step) -> TrainingResult:
    import comfy.model_management

    examples = dataset.batch.map(lambda t: t.detach().clone().float())  # the adapter trains in fp32
    context = int(examples.context.shape[-1])
    base_model = BASE_BY_CONTEXT.get(context)
    if base_model is None:
        raise AdapterError(f"The dataset's captions were encoded {context} wide: FaceStudio trains SD1.5 (768) and "
                           "SDXL (2048) adapters; prepare the dataset with the checkpoint's own CLIP.")
    _check_fits(model, context)
    state = None
    if not resume and adapter_path.exists() and not overwrite:
        raise FileExistsError(f"{adapter_path} exists already: turn 'resume' on to continue its run, or choose another "
                              "adapter name for a new one.")
    if resume:
        if not adapter_path.is_file() or not state_path(adapter_path).is_file():
            raise FileNotFoundError(
                f"Nothing to resume at {adapter_path}: it needs the adapter file and its {state_path(adapter_path).name} "
                "beside it (written at every save). Turn 'resume' off to start a new run under this name.")
        state = load_state(state_path(adapter_path), settings)
    model = trainable_model(model)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    if resume:
        adapter = trainable_from_weights(load_adapter(str(adapter_path)), model)
        if state.step >= settings.steps:
            raise ValueError(f"{adapter_path.name} is already trained {state.step} steps; set 'steps' above that "
                             "to train it further.")
    else:
        adapter = TrainableAdapter.for_model(model, clip_dim=int(examples.image_embeds.shape[-1]),
                                             text_dim=int(examples.text_embeds.shape[-1]), num_tokens=num_tokens,
                                             seed=settings.seed, id_dim=int(examples.faces.shape[-1]))
    adapter.to(device)
    num_tokens = adapter.fusion.num_tokens

    span = save_every if save_every > 0 else settings.steps
    step = state.step if state is not None else 0
    while step < settings.steps:
        until = min(settings.steps, (step // span + 1) * span)
        state = train(model, adapter, examples, settings, resume=state, until=until, on_step=on_step, device=device)
        step = state.step
        meta = _metadata(dataset, base_model, num_tokens, settings, step, licences)
        save_adapter(adapter, meta, adapter_path)
        save_state(state, settings, state_path(adapter_path))
    # The loop ran at least once (a resume at or past `steps` is refused above): `meta` is the last file's.
    return TrainingResult(adapter_weights(adapter.cpu(), meta, adapter_path.name), state, adapter_path)


def _check_fits(model, context: int) -> None:
    from ..attention.layers import cross_attention_positions

    widths = {p.context_width for p in cross_attention_positions(model)}
    if widths != {context}:
        raise AdapterError(f"The dataset's captions are {context} wide but the model's cross-attention reads "
                           f"{sorted(widths)}: prepare the dataset with this checkpoint's CLIP.")


def adapter_path_for(name: str) -> Path:
    """Where the adapter named `name` (sub-folders allowed, '.safetensors' added when missing) is written:
    the first ipadapter model folder, where FaceStudio Load Adapter lists it. Never outside that folder."""
    import folder_paths

    parts = [p for p in plain_name_parts(name) or () if p not in ("", ".")]
    if not parts or any(ord(c) < 32 for c in name):
        raise AdapterError(f"'{name}' is not a name for an adapter file inside models/ipadapter: type a name such "
                           "as 'facestudio/anna' (sub-folders allowed; no absolute paths, '..' or control characters).")
    folders = folder_paths.get_folder_paths("ipadapter") if "ipadapter" in folder_paths.folder_names_and_paths else []
    if not folders:
        raise AdapterError("The host has no ipadapter model folder registered; FaceStudio registers models/ipadapter "
                           "at start-up, so restart ComfyUI.")
    if not parts[-1].lower().endswith(".safetensors"):
        parts[-1] += ".safetensors"
    return Path(folders[0]).joinpath(*parts)
