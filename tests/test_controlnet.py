"""FaceStudio Apply in one graph with the host's ControlNet (a seeded random ControlNet for the tiny
SD1.5 UNet in the release layout, through ControlNetLoader and ControlNetApplyAdvanced)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facestudio_testing import tiny_controlnet

from facestudio_testing.sd15_apply import apply, base, identity, person, run_latent

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

HINT = "fs_controlnet_hint.png"


@pytest.fixture(scope="module")
def cn_setup(booted, setup):
    name = tiny_controlnet.install_controlnet(booted.models)
    hint = np.zeros((64, 64, 3), np.uint8)
    hint[16:48, 24:40] = 255  # a bright figure, as a pose/edge map would draw it
    Image.fromarray(hint).save(booted.base / "input" / HINT)
    return setup, name


def graph(cn_setup, controlnet: bool, weight: float | None):
    checkpoint, name = cn_setup
    g = base(checkpoint, seed=9)
    if controlnet:
        loader = g.add("ControlNetLoader", {"control_net_name": name})
        image = g.add("LoadImage", {"image": HINT})
        applied = g.add("ControlNetApplyAdvanced", {
            "positive": g.link("positive"), "negative": g.link("negative"), "control_net": [loader, 0],
            "image": [image, 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0})
        g.prompt[g["sampler"]]["inputs"].update(positive=[applied, 0], negative=[applied, 1])
    if weight is not None:
        # weight 0 must leave the ControlNet result bit-identical: without the FaceID LoRA (default 1.0).
        apply(g, person(g, identity(g, "fs_apply_a.png", "a"), weight), lora_strength=0.0 if weight == 0 else None)
    return g


def test_controlnet_and_facestudio_in_one_graph(comfy_host, cn_setup):
    plain = run_latent(comfy_host, graph(cn_setup, False, None))
    controlled = run_latent(comfy_host, graph(cn_setup, True, None))
    both = run_latent(comfy_host, graph(cn_setup, True, 1.0))
    assert (controlled - plain).abs().max() > 1e-3   # the ControlNet acts
    assert (both - controlled).abs().max() > 1e-3    # and FaceStudio acts on top of it
    assert torch.equal(run_latent(comfy_host, graph(cn_setup, True, 0.0)), controlled)
