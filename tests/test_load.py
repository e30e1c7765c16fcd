"""Stability under load: 100 FaceStudio prompts queued at once on the real server (main.py).

Ten configurations (0 to 3 persons, regions from SolidMask / ImageToMask or none, weights, start /
end, alpha, a negative identity, a mixed identity, chained Apply nodes) are each run alone first,
after POST /free, then queued ten times each, interleaved, without waiting. Every queued result
must be bitwise the same latent as its configuration alone: nothing may leak between prompts
through the executor's cache (the loaders', identities' and MODEL's outputs are shared between
the prompts) or through patch state. The interleaving is what makes every prompt run its patch:
the host's default (classic) cache keeps only the nodes of the latest prompt, so each prompt's
Apply and KSampler, whose inputs differ from the previous prompt's, run again; the test checks
that from the host's own `execution_cached` messages. The server's resident memory must not grow
by more than 200 MiB between the end of the first round of ten and the end of the run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from facestudio_testing import adapter_files as af
from facestudio_testing import face_models as fm
from facestudio_testing import graphs, tiny_models
from facestudio_testing.server import ComfyServer, execution_error

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

FACEID = "fs_load_faceid_sd15.safetensors"
PHOTOS = {  # the tiny detector's "faces": a white square gives a large face, a green one a small face
    "fs_load_a.png": ((6, 6, "white"),),
    "fs_load_b.png": ((6, 6, "green"),),
    "fs_load_c.png": ((8, 5, "white"),),
}
REGIONS = "fs_load_regions.png"  # red: left third, green: middle third, blue: right third (read by ImageToMask)
ROUNDS = 10
MEMORY_GROWTH_LIMIT = 200 * 2**20


@pytest.fixture(scope="module")
def server(server_with_checkpoint) -> ComfyServer:
    """The session's server with a FaceID adapter, the tiny face pack and the photos installed."""
    server = server_with_checkpoint
    af.write_adapter(server.models / "ipadapter" / FACEID, af.shared_state_dict("faceid", af.SD15))
    packs = server.models / "insightface" / "models"
    packs.mkdir(parents=True, exist_ok=True)
    if not (packs / fm.TINY_PACK).exists():
        (packs / fm.TINY_PACK).symlink_to(fm.tiny_pack(), target_is_directory=True)
    inputs = server.base / "input"
    for name, cells in PHOTOS.items():
        Image.fromarray(fm.tiny_face_image(cells)).save(inputs / name)
    regions = np.zeros((72, 96, 3), np.uint8)  # not the latent's size or aspect: the pack resizes regions
    for channel in range(3):
        regions[:, 32 * channel:32 * (channel + 1), channel] = 255
    Image.fromarray(regions).save(inputs / REGIONS)
    return server


# ---- the configurations ------------------------------------------------------------------------


def identity(g: graphs.Graph, photo: str) -> list:
    if "analyzer" not in g.nodes:
        g.add("FaceStudioFaceAnalyzerLoader", {"pack": fm.TINY_PACK, "provider": "CPU", "det_size": 640}, "analyzer")
    image = g.add("LoadImage", {"image": photo})
    return [g.add("FaceStudioIdentityEncode", {
        "face_analyzer": g.link("analyzer"), "image": [image, 0], "face": "largest", "index": 0,
        "on_missing": "error", "outlier_threshold": 0.4}), 0]


def person(g: graphs.Graph, ident: list, persons: list | None = None, *, weight: float = 1.0, start: float = 0.0,
           end: float = 1.0, mask: list | None = None, negative: list | None = None) -> list:
    inputs = {"identity": ident, "weight": weight, "start": start, "end": end, "mask_index": 0}
    for name, link in (("persons", persons), ("mask", mask), ("negative_identity", negative)):
        if link is not None:
            inputs[name] = link
    return [g.add("FaceStudioPerson", inputs), 0]


def region(g: graphs.Graph, channel: str) -> list:
    if "regions" not in g.nodes:
        g.add("LoadImage", {"image": REGIONS}, "regions")
    return [g.add("ImageToMask", {"image": g.link("regions"), "channel": channel}), 0]


def apply(g: graphs.Graph, persons: list, alpha: float = 0.5, lora_strength: float = 0.0) -> str:
    """lora_strength 0 but in `one_person`: the LoRA re-patches the UNet's weights at each of its prompts,
    and one configuration is enough to interleave that with the others."""
    adapter = g.add("FaceStudioAdapterLoader", {"adapter_name": FACEID, "kind": "auto"})
    return g.insert_model_node("FaceStudioApply", {"adapter": [adapter, 0], "persons": persons, "alpha": alpha,
                                                   "style_weight": 1.0, "lora_strength": lora_strength})


def no_facestudio(g):
    pass


def one_person(g):
    apply(g, person(g, identity(g, "fs_load_a.png")), lora_strength=1.0)  # with its LoRA, the node's default


def one_person_weight_zero(g):
    # Bit-identical to no FaceStudio: weight 0 and no LoRA (the node's lora_strength defaults to 1.0).
    apply(g, person(g, identity(g, "fs_load_a.png"), weight=0.0), lora_strength=0.0)


def one_person_solid_mask_first_half(g):
    mask = [g.add("SolidMask", {"value": 0.7, "width": 32, "height": 64}), 0]
    apply(g, person(g, identity(g, "fs_load_a.png"), weight=0.8, end=0.5, mask=mask))


def two_persons_image_masks_alpha(g):
    first = person(g, identity(g, "fs_load_a.png"), mask=region(g, "red"))
    apply(g, person(g, identity(g, "fs_load_b.png"), first, mask=region(g, "green")), alpha=0.8)


def two_persons_chained_applies(g):
    apply(g, person(g, identity(g, "fs_load_a.png")))
    apply(g, person(g, identity(g, "fs_load_b.png"), weight=0.8))


def three_persons_image_masks(g):
    persons = None
    for photo, channel, weight in (("fs_load_a.png", "red", 1.2), ("fs_load_b.png", "green", 0.9),
                                   ("fs_load_c.png", "blue", 0.6)):
        persons = person(g, identity(g, photo), persons, weight=weight, mask=region(g, channel))
    apply(g, persons)


def negative_identity(g):
    apply(g, person(g, identity(g, "fs_load_a.png"), negative=identity(g, "fs_load_b.png")))


def mixed_identity_second_half(g):
    mixed = [g.add("FaceStudioIdentityMix", {"identity_a": identity(g, "fs_load_a.png"),
                                              "identity_b": identity(g, "fs_load_c.png"), "weight": 0.5,
                                              "weight_c": 0.0, "weight_d": 0.0}), 0]
    apply(g, person(g, mixed, weight=1.5, start=0.5, end=1.0))


def two_persons_windows_and_weights(g):
    first = person(g, identity(g, "fs_load_a.png"), weight=1.5, end=0.5)
    apply(g, person(g, identity(g, "fs_load_c.png"), first, weight=0.5, start=0.5), alpha=0.3)


CONFIGS = [no_facestudio, one_person, one_person_weight_zero, one_person_solid_mask_first_half,
           two_persons_image_masks_alpha, two_persons_chained_applies, three_persons_image_masks,
           negative_identity, mixed_identity_second_half, two_persons_windows_and_weights]


def build(config) -> graphs.Graph:
    g = graphs.txt2img(tiny_models.CHECKPOINT_NAME, width=64, height=64, steps=2, seed=1, output="latent",
                       filename_prefix=f"facestudio_load/{config.__name__}")
    config(g)
    return g


# ---- running and reading back ------------------------------------------------------------------


def resident_bytes(server: ComfyServer) -> int:
    """The server process's resident set (VmRSS) in bytes."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise AssertionError("no VmRSS line in /proc/<pid>/status")


def free(server: ComfyServer) -> None:
    """POST /free (unload the models, drop the executor's cache), then wait until the server has done it.

    The prompt worker reads the flags /free sets after each prompt (or when woken while idle), so a
    prompt queued right after /free may run before the flags are read. A trivial prompt run to
    completion is a barrier: the worker reads the flags right after finishing it, before it takes
    the next prompt from the queue.
    """
    server.request("/free", {"unload_models": True, "free_memory": True})
    entry = server.run({"1": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 8, "height": 8}},
                        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    assert entry["status"]["status_str"] == "success", execution_error(entry)


def cached_nodes(entry: dict) -> set[str]:
    return {node for event, data in entry["status"]["messages"] if event == "execution_cached"
            for node in data["nodes"]}


def latent(server: ComfyServer, entry: dict, g: graphs.Graph) -> torch.Tensor:
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    (saved,) = entry["outputs"][g["save"]]["latents"]
    return load_safetensors(server.view(saved["filename"], saved["subfolder"]))["latent_tensor"]


def patched_nodes(g: graphs.Graph) -> set[str]:
    """The nodes that must run in every prompt: the sampler and every FaceStudio Apply."""
    return {g["sampler"]} | {i for i, node in g.prompt.items() if node["class_type"] == "FaceStudioApply"}


def test_100_interleaved_prompts_equal_each_configuration_alone_and_memory_stays_flat(server):
    prompts = {config.__name__: build(config) for config in CONFIGS}

    alone = {}
    for name, g in prompts.items():
        free(server)
        entry = server.run(g.prompt)
        alone[name] = latent(server, entry, g)
        assert not cached_nodes(entry), f"{name} alone took {cached_nodes(entry)} from the cache"
    # The configurations differ (a leak between them would show), except weight 0, which is exactly none.
    assert torch.equal(alone["one_person_weight_zero"], alone["no_facestudio"])
    distinct = [v for k, v in alone.items() if k != "one_person_weight_zero"]
    for i, a in enumerate(distinct):
        assert all(not torch.equal(a, b) for b in distinct[i + 1:])

    queued = [(name, server.queue_prompt(prompts[name].prompt)) for _ in range(ROUNDS) for name in prompts]
    server.wait_for(queued[len(CONFIGS) - 1][1], timeout=1800.0)  # a hang guard only
    after_first_round = resident_bytes(server)
    entries = [(name, server.wait_for(prompt_id)) for name, prompt_id in queued]
    at_end = resident_bytes(server)

    mismatches, reused = [], []
    for n, (name, entry) in enumerate(entries):
        g = prompts[name]
        result = latent(server, entry, g)
        assert result.dtype == alone[name].dtype and result.shape == alone[name].shape
        if not torch.equal(result, alone[name]):
            mismatches.append(f"prompt {n} ({name}): max |diff| {(result - alone[name]).abs().max().item():.3g}")
        cached = cached_nodes(entry)
        assert not patched_nodes(g) & cached, f"prompt {n} ({name}) took its patch or sampler from the cache"
        reused.append(g["checkpoint"] in cached)
    assert not mismatches, "\n".join(mismatches)
    # The loaded checkpoint (and with it every identity and adapter) is shared between the prompts.
    assert all(reused)

    growth = at_end - after_first_round
    print(f"server VmRSS after the first {len(CONFIGS)} queued prompts: {after_first_round / 2**20:.0f} MiB, "
          f"after {len(entries)}: {at_end / 2**20:.0f} MiB (growth {growth / 2**20:+.0f} MiB)")
    assert growth <= MEMORY_GROWTH_LIMIT, f"resident memory grew by {growth / 2**20:.0f} MiB under load"
