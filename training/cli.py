"""The command-line trainer (scripts/train.py boots the host and calls `main`): for long runs on a headless
GPU machine, with the same code as FaceStudio Prepare Dataset and FaceStudio Train Adapter.

Models are named as the loader nodes name them (files in the host's model folders) or given as paths;
the adapter goes to models/ipadapter/<name>.safetensors, or to --output. Progress is printed every
--log-every steps (step, loss, steps per second); Ctrl+C after a save loses nothing: --resume continues.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .trainer import OPTIMIZERS, TrainingSettings

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train a FaceStudio adapter on a folder of face photos.")
    p.add_argument("--checkpoint", required=True, help="SD1.5 or SDXL checkpoint: a name in models/checkpoints, or a path")
    p.add_argument("--clip-vision", required=True, help="CLIP vision model: a name in models/clip_vision, or a path")
    p.add_argument("--face-pack", required=True, help="insightface pack: a name in models/insightface/models, or a folder")
    p.add_argument("--dataset", required=True, help="folder of photos, with optional same-name .txt captions")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--adapter", help="adapter name in models/ipadapter (sub-folders allowed)")
    where.add_argument("--output", help="adapter file path (.safetensors)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--cache-dir", help="where the encoded dataset is cached (default: <dataset>/.facestudio_cache)")
    defaults = TrainingSettings()
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--style-dropout", type=float, default=defaults.style_dropout)
    p.add_argument("--face-dropout", type=float, default=defaults.face_dropout)
    p.add_argument("--num-tokens", type=int, default=4)
    p.add_argument("--save-every", type=int, default=500, help="0: at the end only")
    p.add_argument("--resume", action="store_true", help="continue the run saved at the adapter's file")
    p.add_argument("--overwrite", action="store_true", help="start a new run over an existing adapter file")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--dataset-licence", default="", help="recorded in the file (FFHQ: CC BY-NC-SA 4.0)")
    p.add_argument("--face-models-licence", default="",
                   help="recorded in the file (insightface's packs: non-commercial research only)")
    return p


def _model_file(folder: str, name: str, what: str) -> str:
    import folder_paths

    if os.path.isfile(name):
        return name
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        listed = ", ".join(folder_paths.get_filename_list(folder)[:8]) or "none"
        raise SystemExit(f"No {what} '{name}': not a file, and not in the {folder} model folders "
                         f"({', '.join(folder_paths.get_folder_paths(folder))}; found: {listed}).")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import comfy.clip_vision
    import comfy.sd
    import folder_paths

    from ..encoders.faces import load_face_analyzer
    from ..nodes.face_analyzer import resolve_pack
    from ..startup.model_folders import register_model_folders
    from .dataset import dataset_images, prepare_dataset
    from .run import Licences, adapter_path_for, train_adapter

    register_model_folders()  # as the host's loading of the pack does: ipadapter, insightface

    settings = TrainingSettings(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                                optimizer=args.optimizer, weight_decay=args.weight_decay, seed=args.seed,
                                style_dropout=args.style_dropout, face_dropout=args.face_dropout)
    target = Path(args.output) if args.output else adapter_path_for(args.adapter)
    dataset_images(args.dataset)  # a folder without photos is refused before minutes of model loading
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(
        _model_file("checkpoints", args.checkpoint, "checkpoint"), output_vae=True, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
    clip_vision = comfy.clip_vision.load(_model_file("clip_vision", args.clip_vision, "CLIP vision model"))
    pack = args.face_pack if os.path.isdir(args.face_pack) else resolve_pack(args.face_pack)
    analyzer = load_face_analyzer(pack)

    started = time.perf_counter()
    dataset = prepare_dataset(args.dataset, analyzer, clip_vision, vae, clip, resolution=args.resolution,
                              cache_dir=args.cache_dir)
    print(dataset.report(), f"\n(encoded in {time.perf_counter() - started:.0f} s)", flush=True)

    clock = {"start": time.perf_counter(), "first": None}

    def on_step(step: int, loss: float) -> None:
        if clock["first"] is None:
            clock["first"], clock["start"] = step, time.perf_counter()
        elif step % args.log_every == 0 or step == settings.steps:
            rate = (step - clock["first"]) / max(time.perf_counter() - clock["start"], 1e-9)
            print(f"step {step}/{settings.steps}  loss {loss:.4f}  {rate:.2f} steps/s", flush=True)

    result = train_adapter(model, dataset, settings, target, resume=args.resume, save_every=args.save_every,
                           num_tokens=args.num_tokens, overwrite=args.overwrite, on_step=on_step,
                           licences=Licences(args.dataset_licence, args.face_models_licence))
    print(f"Saved {result.path} ({result.state.step} steps); its state: {result.path.stem}.state.pt", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - run through scripts/train.py, which boots the host first
    sys.exit(main())
