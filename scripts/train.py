"""Train a FaceStudio adapter from the command line (long runs on a headless GPU machine).

Run it with the Python that runs ComfyUI; it boots that ComfyUI in-process (no server) and trains with the
same code as the FaceStudio Prepare Dataset and Train Adapter nodes:

    python custom_nodes/ComfyUI-FaceStudio/scripts/train.py \
        --checkpoint v1-5-pruned-emaonly.safetensors --clip-vision CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors \
        --face-pack buffalo_l --dataset /data/faces --adapter facestudio/faces --steps 20000 --batch-size 8 \
        --save-every 1000 --dataset-licence "FFHQ: CC BY-NC-SA 4.0" \
        --face-models-licence "insightface buffalo_l: non-commercial research only"

Host options: --comfyui DIR (default: the ComfyUI this pack sits in), --base-directory DIR (as ComfyUI's
own), --cpu. `--help` lists the training options.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def boot(comfyui: Path, base_directory: str | None, cpu: bool):
    """The host imported in-process with this pack loaded as the host loads it; returns the pack module."""
    if not (comfyui / "main.py").is_file():
        raise SystemExit(f"No ComfyUI at {comfyui}: pass --comfyui with the folder holding ComfyUI's main.py.")
    sys.path.insert(0, str(comfyui))
    import utils.install_util  # noqa: F401  (first: once comfy/ is on sys.path, `utils` resolves wrongly)
    from comfy.cli_args import args

    args.cpu = cpu or args.cpu
    if base_directory:
        args.base_directory = os.path.abspath(base_directory)
    import folder_paths  # noqa: F401  (reads args.base_directory)

    name = str(PACK_ROOT).replace(".", "_x_")  # the module name the host's loader gives a pack
    spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return name


def main() -> int:
    host = argparse.ArgumentParser(prog="train.py", add_help=False)
    host.add_argument("--comfyui", type=Path, default=PACK_ROOT.parents[1])
    host.add_argument("--base-directory")
    host.add_argument("--cpu", action="store_true")
    known, train_argv = host.parse_known_args(sys.argv[1:])  # the host's options; the rest are the trainer's
    name = boot(known.comfyui.resolve(), known.base_directory, known.cpu)
    cli = importlib.import_module(name + ".training.cli")
    try:
        return cli.main(train_argv)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # the pack's errors say what to do
        print(f"train.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
