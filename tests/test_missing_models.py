"""First run: with none of its models present, a bundled workflow names every file it needs in one go,
each with its folder and where to get it.

What each frontend can show is limited: its Missing Models panel (1.48: unlinked combos whose value
is a model file, folders from its table of core nodes, completed from the workflow's `models`
metadata; 1.27: the workflow's `models` lists themselves) never lists an insightface pack (a folder)
or a LoRA no widget names. The pack's loaders therefore refuse a missing file at validation, with its
folder and download URL, on every host, so the one refusal of the first queue names the rest. These
tests load each stored workflow on a server with no models, read the panel, queue once and check
that the panel plus that one answer name every file, with its folder.
"""
from __future__ import annotations

import json
import urllib.parse
from urllib.parse import urlparse

import pytest

from facestudio_testing import frontend
from facestudio_testing import workflow_defs as wd
from facestudio_testing.bootstrap import PACK_LINK_NAME, PACK_ROOT
from facestudio_testing.server import ComfyServer

NAMES = sorted(wd.WORKFLOWS)
# What each loader input reads, as the host's folder names: written out here, not taken from the pack.
FOLDERS = {("CheckpointLoaderSimple", "ckpt_name"): "checkpoints", ("CLIPVisionLoader", "clip_name"): "clip_vision",
           ("ControlNetLoader", "control_net_name"): "controlnet", ("LoraLoader", "lora_name"): "loras",
           ("FaceStudioAdapterLoader", "adapter_name"): "ipadapter",
           ("FaceStudioFaceAnalyzerLoader", "pack"): "insightface",
           ("UNETLoader", "unet_name"): "diffusion_models", ("DualCLIPLoader", "clip_name1"): "text_encoders",
           ("DualCLIPLoader", "clip_name2"): "text_encoders", ("VAELoader", "vae_name"): "vae",
           ("FaceStudioPuLIDFluxLoader", "pulid_file"): "pulid", ("FaceStudioPuLIDFluxLoader", "eva_clip"): "clip_vision"}
PACK_LOADERS = {"FaceStudioAdapterLoader", "FaceStudioFaceAnalyzerLoader", "FaceStudioPuLIDFluxLoader"}
# The files Load PuLID-FLUX reads besides its two widgets (facexlib's detector and parser, facexlib's releases).
PULID_FLUX_FILES = (("detection_Resnet50_Final.pth", "facexlib"), ("parsing_bisenet.pth", "facexlib"))
# Where the public releases are downloaded from.
HOSTS = {"huggingface.co", "github.com", "civitai.com"}


def needed_files(prompt: dict) -> list[tuple[str, str, str, str]]:
    """(node id, input, file, folder) of every file the workflow loads, for a FaceID adapter the LoRA
    FaceStudio Apply looks for beside it ('<adapter>_lora.safetensors' in loras; Portrait has none), and
    for Load PuLID-FLUX facexlib's two files (under its pulid_file input)."""
    out = []
    for node_id, node in prompt.items():
        for (class_type, key), folder in FOLDERS.items():
            if node["class_type"] == class_type:
                name = node["inputs"][key]
                out.append((node_id, key, name, folder))
                if class_type == "FaceStudioAdapterLoader" and "faceid" in name and "portrait" not in name:
                    out.append((node_id, key, name.rsplit(".", 1)[0] + "_lora.safetensors", "loras"))
                if (class_type, key) == ("FaceStudioPuLIDFluxLoader", "pulid_file"):
                    out += [(node_id, key, file, where) for file, where in PULID_FLUX_FILES]
    return out


def place(name: str, folder: str) -> str:
    """How a message names where the file goes."""
    return f"models/insightface/models/{name}" if folder == "insightface" else f"models/{folder}"


@pytest.fixture(scope="module")
def sources(booted):
    return booted.pack_module("startup.model_sources")


@pytest.fixture(scope="module")
def bare_server():
    """The real server with the pack and no model file at all (nor any picture)."""
    server = ComfyServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


def skip_without_its_host_nodes(server, name: str) -> None:
    missing = [t for t in wd.WORKFLOWS[name].requires if t not in server.node_types()]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}, which this ComfyUI does not have")


# --- the table and the stored metadata ------------------------------------------------------------
def test_every_file_the_workflows_load_has_a_public_source_in_its_folder(sources):
    for name in NAMES:
        for node_id, _, file, folder in needed_files(wd.WORKFLOWS[name].prompt):
            entry = sources.source(file)
            assert entry is not None, f"{name}: no source for {file}"
            assert (entry.name, entry.folder) == (file, folder), (name, entry)
            url = urlparse(entry.url)
            assert url.scheme == "https" and url.hostname in HOSTS, entry.url
            assert entry.url in entry.how_to_get() and place(file, folder) in entry.how_to_get()


@pytest.mark.parametrize("name", NAMES)
def test_the_stored_workflow_carries_each_file_with_its_folder_and_url(sources, name):
    """Per loader node (`properties.models`, what 1.48 completes a panel entry from) and in the top-level
    `models` list (what 1.27 reads), the files a widget names; not the insightface pack (a folder, which
    1.27 would report missing even when it is there) nor the LoRA found beside the adapter (the .bin
    releases carry it, so it is not missing when absent)."""
    stored = json.loads((PACK_ROOT / "workflows" / f"{name}.json").read_text())
    prompt = wd.WORKFLOWS[name].prompt
    widget_files = {(node_id, file, folder) for node_id, key, file, folder in needed_files(prompt)
                    if folder != "insightface" and prompt[node_id]["inputs"][key] == file}
    expected = [{"name": file, "url": sources.source(file).url, "directory": folder}
                for _, file, folder in sorted(widget_files, key=lambda t: int(t[0]))]
    assert sorted(stored.get("models", []), key=json.dumps) == sorted(
        {json.dumps(e): e for e in expected}.values(), key=json.dumps), \
        "run scripts/make_workflows.py: the stored file's models list is not the definition's"
    nodes = {str(n["id"]): n for n in stored["nodes"]}
    for node_id, file, folder in widget_files:
        assert {"name": file, "url": sources.source(file).url, "directory": folder} in \
            nodes[node_id].get("properties", {}).get("models", []), (name, node_id, file)


# --- one queue, no frontend: every host, 0.3.50 included ---------------------------------------------
@pytest.mark.smoke
@pytest.mark.parametrize("name", NAMES)
def test_one_queue_refuses_every_loader_and_the_pack_names_folder_and_url(bare_server, name):
    skip_without_its_host_nodes(bare_server, name)
    prompt = wd.WORKFLOWS[name].prompt
    refusal = bare_server.refusal(prompt, timeout=60)
    assert refusal is not None and "/prompt refused the prompt" in refusal, refusal
    answer = json.loads(refusal.split("/prompt refused the prompt: ", 1)[1])
    node_errors = answer["node_errors"]
    for node_id, key, file, folder in needed_files(prompt):
        assert node_id in node_errors, f"{name}: {prompt[node_id]['class_type']} (node {node_id}) was not refused"
        details = " ".join(e["details"] for e in node_errors[node_id]["errors"])
        assert prompt[node_id]["inputs"][key] in details, details
        if prompt[node_id]["class_type"] in PACK_LOADERS:
            assert file in details and place(file, folder) in details and "https://" in details, details


# --- in each frontend -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page(bare_server):
    with frontend.opened(bare_server) as ui:
        yield ui


@pytest.mark.frontend
@pytest.mark.parametrize("name", NAMES)
def test_the_panel_and_one_queue_name_every_file_with_its_folder(page, bare_server, name):
    """As a first-time user: open the template with no models, read the Missing Models panel, press Run once."""
    skip_without_its_host_nodes(bare_server, name)
    template = json.loads(bare_server.request(f"/api/workflow_templates/{PACK_LINK_NAME}/{urllib.parse.quote(name)}.json"))
    page.load_workflow(template, f"{name}.json")
    panel = page.missing_models()
    prompt = wd.WORKFLOWS[name].prompt
    needed = needed_files(prompt)
    # The panel lists only files the workflow loads, each under its real folder (none 'Unknown').
    assert set(panel) <= {(folder, file) for _, _, file, folder in needed}, panel
    page.close_dialogs()

    answer = page.queue()
    assert "node_errors" in answer, f"{name}: queued with no models at all: {answer}"
    node_errors = answer["node_errors"]
    unnamed = []
    for node_id, key, file, folder in needed:
        assert node_id in node_errors, f"{name}: the one queue did not refuse node {node_id} ({file})"
        details = " ".join(e["details"] for e in node_errors[node_id]["errors"])
        in_error = file in details and place(file, folder) in details and "https://" in details
        if (folder, file) not in panel and not in_error:
            unnamed.append(f"{folder}/{file}")
    assert not unnamed, f"{name}: neither the panel ({panel}) nor the queue's error names {unnamed}"
    # The error reaches the user: 1.27's dialog prints each message, 1.48's Errors tab lists each refused
    # loader input (its message behind the entry).
    shown = page.shown_text()
    for node_id, key, _, _ in needed:
        if prompt[node_id]["class_type"] in PACK_LOADERS:
            assert f" - {key}" in shown or f"{key} - " in shown, f"{name}: {key} refusal not shown:\n{shown[-3000:]}"
    page.close_dialogs()
