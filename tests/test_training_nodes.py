"""FaceStudio Train Adapter and Save Adapter in the host's executor, and the command-line trainer
(scripts/train.py) in a process of its own: the same run from a folder of photos to an adapter file.

Real parts: the tiny SD1.5 checkpoint (its CLIP and TAESD VAE), the seeded ViT-L CLIP vision file, the
trained YuNet/SFace pack through insightface, two photos (the astronaut, and mirrored), the host's
LossGraphNode on the loss map.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facestudio_testing import bootstrap, clip_models, face_photos

RES = 192  # the dataset tests' size: YuNet finds the astronaut's face there
PACK_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(comfy_host, booted, tiny_sd15):
    from skimage import data

    real_pack, _ = face_photos.install_packs(booted.models)
    clip_vision = clip_models.install_vitl(booted.models)
    folder = booted.base / "input" / "fs_train_photos"
    folder.mkdir(parents=True, exist_ok=True)
    astronaut = data.astronaut()
    for name, image in (("astronaut.png", astronaut), ("mirrored.png", astronaut[:, ::-1].copy())):
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        (folder / name).write_bytes(out.getvalue())
    (folder / "astronaut.txt").write_text("a photo of an astronaut")
    return tiny_sd15, clip_vision, real_pack, folder


def train_graph(installed, name: str, steps: int, resume: bool = False, save_every: int = 2, seed: int = 0) -> dict:
    tiny_sd15, clip_vision, real_pack, _ = installed
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_vision}},
        "3": face_photos.analyzer_node(real_pack),
        "4": {"class_type": "FaceStudioPrepareDataset",
              "inputs": {"folder": "fs_train_photos", "face_analyzer": ["3", 0], "clip_vision": ["2", 0],
                         "vae": ["1", 2], "clip": ["1", 1], "resolution": RES}},
        "5": {"class_type": "FaceStudioTrainAdapter",
              "inputs": {"model": ["1", 0], "dataset": ["4", 0], "adapter_name": name, "steps": steps,
                         "batch_size": 2, "learning_rate": 1e-3, "optimizer": "AdamW", "seed": seed,
                         "save_every": save_every, "resume": resume, "style_dropout": 0.64, "face_dropout": 0.1,
                         "num_tokens": 4, "dataset_licence": "test photos (public domain)",
                         "face_models_licence": "OpenCV zoo YuNet/SFace (MIT)"}},
        "6": {"class_type": "LossGraphNode", "inputs": {"loss": ["5", 1], "filename_prefix": "fs_loss"}},
        "7": {"class_type": "FaceStudioSaveAdapter",
              "inputs": {"adapter": ["5", 0], "adapter_name": name + "_final", "overwrite": True}},
    }


def run(comfy_host, prompt):
    result = comfy_host.run(prompt)
    assert result.success, result.error
    return result


def test_train_save_and_resume_in_the_executor(comfy_host, booted, installed):
    """2 steps saved every step, then resumed to 3: the resumed run's losses are the uninterrupted 3-step
    run's (same seed), the files load as FaceStudio adapters with what they were trained with, and the
    host's LossGraphNode draws the loss map."""
    adapters = booted.pack_module("attention.adapters")
    folder = booted.models / "ipadapter" / "fs_nodes"
    first = run(comfy_host, train_graph(installed, "fs_nodes/run", steps=2, save_every=1))
    losses = comfy_host.output(first, "5", 1)["loss"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and comfy_host.output(first, "5", 2) == 2
    assert (folder / "run.safetensors").is_file() and (folder / "run.state.pt").is_file()
    assert first.ui["6"]["images"], "LossGraphNode drew nothing"
    saved = adapters.load_adapter(str(folder / "run_final.safetensors"))
    assert saved.kind is adapters.AdapterKind.FACESTUDIO and saved.base_model == "SD1.5"
    assert saved.facestudio.training["steps_done"] == 2 and saved.facestudio.training["examples"] == 2
    assert saved.facestudio.dataset_licence == "test photos (public domain)"
    assert saved.id_embedding_width == saved.facestudio.recognizer.embedding_dim  # the real pack's SFace width
    assert comfy_host.output(first, "7") == str(folder / "run_final.safetensors")

    resumed = run(comfy_host, train_graph(installed, "fs_nodes/run", steps=3, save_every=1, resume=True))
    whole = run(comfy_host, train_graph(installed, "fs_nodes/whole", steps=3, save_every=1))
    assert comfy_host.output(resumed, "5", 1)["loss"] == comfy_host.output(whole, "5", 1)["loss"]
    assert comfy_host.output(resumed, "5", 1)["loss"][:2] == losses
    assert adapters.load_adapter(str(folder / "run.safetensors")).facestudio.training["steps_done"] == 3

    again = comfy_host.run(train_graph(installed, "fs_nodes/whole", steps=3, seed=1))  # not resuming: refused
    assert not again.success and "exists already: turn 'resume' on" in again.error
    for path in folder.iterdir():
        path.unlink()


def test_the_command_line_trains_the_same_adapter(booted, installed, tmp_path):
    """scripts/train.py with the same models and photos, in a process of its own, writes an adapter of 2
    steps whose loss curve it prints; a dataset folder without photos exits with the reason, no traceback."""
    tiny_sd15, clip_vision, real_pack, photos = installed
    command = [sys.executable, str(PACK_ROOT / "scripts" / "train.py"), "--comfyui", str(bootstrap.host_dir()),
               "--base-directory", str(booted.base), "--cpu", "--checkpoint", tiny_sd15, "--clip-vision", clip_vision,
               "--face-pack", real_pack, "--resolution", str(RES), "--steps", "2", "--batch-size", "2",
               "--learning-rate", "1e-3", "--log-every", "1", "--output", str(tmp_path / "cli.safetensors")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command + ["--dataset", str(photos)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 of 2 image(s) kept" in done.stdout and "step 2/2" in done.stdout and "Saved" in done.stdout
    adapter = booted.pack_module("attention.adapters").load_adapter(str(tmp_path / "cli.safetensors"))
    assert adapter.facestudio.training["steps_done"] == 2 and (tmp_path / "cli.state.pt").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run(command + ["--dataset", str(empty), "--overwrite"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert str(empty) in failed.stderr, failed.stderr[-2000:]
