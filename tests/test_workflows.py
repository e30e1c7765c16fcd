"""The bundled workflows (workflows/*.json): served as templates by the real server, loaded in the
host's own frontend (headless Chromium) without missing nodes or error dialogs, converted by the
frontend's own graph-to-prompt into exactly their API definition (tests/facestudio_testing/
workflow_defs.py: wrong widget order or a renamed input shows here), and run by the real server
on small models saved under the workflows' public model file names: for SD1.5 the tiny SD1.5
checkpoint, for SDXL the tiny SDXL checkpoint (facestudio_testing/tiny_sdxl.py: SDXL's 70
cross-attention positions, full-size text encoders) with an SDXL FaceID Plus v2 file made for it.
The only change made before running is workflow_defs.TEST_OVERRIDES (a 64x64 latent, 2 steps), for
speed on CPU; the frontend comparison is on the stored definition, unchanged.

Opened as a file, each shows its intro and first steps at its saved view (extra.ds); how each looks
opened from the templates browser is tests/test_templates_browser.py's.
"""
from __future__ import annotations

import io
import json
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from facestudio_testing import frontend, frontend_layout, workflow_models
from facestudio_testing import face_models as fm
from facestudio_testing import workflow_defs as wd
from facestudio_testing.bootstrap import PACK_LINK_NAME, PACK_ROOT
from facestudio_testing.server import execution_error

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

WORKFLOWS_DIR = PACK_ROOT / "workflows"
NAMES = sorted(wd.WORKFLOWS)
SD15_NAMES = [n for n in NAMES if wd.WORKFLOWS[n].base == "SD1.5"]
SDXL_NAMES = [n for n in NAMES if wd.WORKFLOWS[n].base == "SDXL"]
FLUX_NAMES = [n for n in NAMES if wd.WORKFLOWS[n].base == "FLUX"]
# Where the frontend test saves each workflow's screenshot (scripts/update_pictures.sh sets it).
# The public model names of each base: (checkpoint, FaceID / style adapters).
PUBLIC_NAMES = {"SD1.5": (wd.CHECKPOINT, (wd.FACEID_PLUS_V2, wd.STYLE_ADAPTER)),
                "SDXL": (wd.SDXL_CHECKPOINT, (wd.FACEID_PLUS_V2_SDXL,))}


def test_every_defined_workflow_is_stored_with_a_thumbnail_and_nothing_else():
    stored = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    assert stored == NAMES, ("workflows/ differs from workflow_defs.WORKFLOWS: run scripts/make_workflows.py, "
                             "then scripts/update_pictures.sh")
    for name in NAMES:
        thumbnail = WORKFLOWS_DIR / f"{name}.jpg"
        assert thumbnail.is_file(), f"{thumbnail.name} missing"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 256
            assert np.asarray(image.convert("L")).std() > 10, f"{thumbnail.name} is blank"


@pytest.mark.parametrize("name", NAMES)
def test_definition_uses_public_model_names_and_has_every_node_in_a_group(name):
    workflow = wd.WORKFLOWS[name]
    workflow.layout()  # raises for a node in no group
    widgets = {(n["class_type"], k): v for n in workflow.prompt.values() for k, v in n["inputs"].items()}
    checkpoints = [n["inputs"]["ckpt_name"] for n in workflow.prompt.values()
                   if n["class_type"] == "CheckpointLoaderSimple"]
    if workflow.base == "FLUX":  # FLUX.1 dev as ComfyUI's FLUX examples load it, PuLID-FLUX, antelopev2
        assert set(checkpoints) <= {wd.SAM3_CHECKPOINT}, checkpoints
        assert (widgets[("UNETLoader", "unet_name")], widgets[("DualCLIPLoader", "clip_name1")],
                widgets[("DualCLIPLoader", "clip_name2")], widgets[("DualCLIPLoader", "type")],
                widgets[("VAELoader", "vae_name")]) == (wd.FLUX_UNET, wd.FLUX_T5, wd.FLUX_CLIP_L, "flux", wd.FLUX_VAE)
        assert (widgets[("FaceStudioPuLIDFluxLoader", "pulid_file")],
                widgets[("FaceStudioPuLIDFluxLoader", "eva_clip")]) == (wd.PULID_FLUX, wd.EVA_CLIP)
        assert widgets[("FaceStudioFaceAnalyzerLoader", "pack")] == wd.FLUX_FACE_PACK
        assert widgets[("KSampler", "cfg")] == 1.0 and widgets[("FluxGuidance", "guidance")] == 3.5
    else:
        checkpoint, adapters = PUBLIC_NAMES[workflow.base]
        assert checkpoints[0] == checkpoint and set(checkpoints[1:]) <= {wd.SAM3_CHECKPOINT}, checkpoints
        assert all(n["inputs"]["adapter_name"] in adapters for n in workflow.prompt.values()
                   if n["class_type"] == "FaceStudioAdapterLoader")
        assert widgets[("FaceStudioFaceAnalyzerLoader", "pack")] == wd.FACE_PACK
    assert all(g.note.strip() for g in workflow.groups)
    if workflow.base in ("SDXL", "FLUX"):  # their sizes: about one megapixel, multiples of 64
        latent = "EmptySD3LatentImage" if workflow.base == "FLUX" else "EmptyLatentImage"
        width, height = widgets[(latent, "width")], widgets[(latent, "height")]
        assert width % 64 == 0 and height % 64 == 0 and 0.9 <= width * height / 1024**2 <= 1.1, (width, height)


def test_sd15_sdxl_and_flux_workflows_are_there():
    """Each use on SD1.5; on SDXL the one-person and the two-people-in-regions workflows; on FLUX.1 (PuLID-FLUX)
    those two and two people in SAM3 silhouettes."""
    assert len(SD15_NAMES) == 10  # the eight uses, two people in SAM3 silhouettes (v0.33 on), training
    assert [n for n in NAMES if wd.WORKFLOWS[n].requires] == ["11 Two people with SAM3", "14 FLUX two people, SAM3"]
    assert [n[3:] for n in SDXL_NAMES] == ["SDXL one person", "SDXL two people"]
    assert [n[3:] for n in FLUX_NAMES] == ["FLUX one person", "FLUX two people", "FLUX two people, SAM3"]
    for two, person in ((SDXL_NAMES[1], "FaceStudioPerson"), (FLUX_NAMES[1], "FaceStudioPuLIDFluxPerson"),
                        (FLUX_NAMES[2], "FaceStudioPuLIDFluxPerson")):
        nodes = wd.WORKFLOWS[two].prompt.values()
        assert sum(n["class_type"] == person for n in nodes) == 2
        assert sum(n["class_type"] == "FaceStudioRegionPrompt" for n in nodes) == 2  # a prompt per person


@pytest.mark.frontend
def test_the_server_lists_and_serves_the_workflows_as_templates(comfy_server):
    listed = comfy_server.get_json("/workflow_templates")
    assert sorted(listed.get(PACK_LINK_NAME, [])) == NAMES, listed
    for name in NAMES:
        for suffix in (".json", ".jpg"):
            path = f"/api/workflow_templates/{PACK_LINK_NAME}/{urllib.parse.quote(name)}{suffix}"
            assert comfy_server.request(path) == (WORKFLOWS_DIR / f"{name}{suffix}").read_bytes(), path


def on_the_frontends_grid(value: int, spec: dict) -> bool:
    """The frontend's INT widgets snap what is set or typed to (min % step) + k * step."""
    step = spec.get("step", 1) or 1
    offset = spec.get("min", 0) % step if step != 1 else 0
    return (value - offset) % step == 0


def skip_without_its_host_nodes(server, name: str) -> None:
    """A workflow that needs host nodes this host lacks (SAM3_Detect before 0.33) is not for this host."""
    missing = [t for t in wd.WORKFLOWS[name].requires if t not in server.node_types()]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}, which this ComfyUI does not have")


@pytest.mark.frontend
@pytest.mark.parametrize("name", NAMES)
def test_every_int_value_is_one_the_frontend_keeps(comfy_server, name):
    """A value off its widget's step grid is changed by the frontend as soon as it is set (loadApiJson)
    or edited: e.g. min 1 with step 8 turns 512 into 513. Checked on the host's /object_info."""
    skip_without_its_host_nodes(comfy_server, name)
    info = comfy_server.get_json("/object_info")
    off = []
    for node_id, node in wd.WORKFLOWS[name].prompt.items():
        specs = {**info[node["class_type"]]["input"].get("required", {}),
                 **info[node["class_type"]]["input"].get("optional", {})}
        for key, value in node["inputs"].items():
            kind, spec = (specs[key] + [{}])[:2] if key in specs else (None, {})
            if kind == "INT" and not on_the_frontends_grid(value, spec):
                off.append(f"node {node_id} {node['class_type']}.{key} = {value}: min {spec.get('min')}, "
                           f"step {spec.get('step')} (the frontend makes it "
                           f"{spec.get('min', 0) % spec['step'] + round((value - spec.get('min', 0) % spec['step']) / spec['step']) * spec['step']})")
    assert not off, "\n".join(off)


# --- in the real frontend -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def page(installed):
    """The frontend, opened once the models and pictures are on the server (it lists them at start-up)."""
    with frontend.opened(installed) as ui:
        yield ui


@pytest.mark.frontend
@pytest.mark.parametrize("name", NAMES)
def test_loads_in_the_frontend_and_converts_to_its_definition(page, installed, name):
    """With the workflow's models and pictures on the server, as a user who has them opens it."""
    skip_without_its_host_nodes(installed, name)
    template = json.loads(installed.request(f"/api/workflow_templates/{PACK_LINK_NAME}/{urllib.parse.quote(name)}.json"))
    page.errors.clear()
    page.load_workflow(template, f"{name}.json")
    assert page.dialogs() == [], f"{name}: dialog(s) open after loading"
    assert page.unknown_node_types() == [], f"{name}: node types the frontend does not know"
    assert page.nodes_with_error_badges() == [], f"{name}: nodes the frontend marks as in error"
    assert page.errors == [], f"{name}: page errors while loading"
    workflow = wd.WORKFLOWS[name]
    types = page.node_types()
    assert sorted(t for t in types if t != "Note") == sorted(n["class_type"] for n in workflow.prompt.values())
    assert types.count("Note") == len(workflow.groups) + 1  # one per group and the overview
    serialized = page.serialize()
    assert [g["title"] for g in serialized["groups"]] == [g.title for g in workflow.groups]

    converted = page.graph_to_prompt()
    problems = wd.prompt_differences(workflow.prompt, converted)
    assert not problems, f"{name}: the frontend's prompt differs from the definition:\n" + "\n".join(problems)

    # Opened as a file (not a template), both frontends restore its saved view.
    problems = frontend_layout.first_view_problems(page, workflow)
    assert not problems, f"{name}: {problems}"


# --- in the real server, on small models under the public names -----------------------------------
def _photo(cells) -> np.ndarray:
    return fm.tiny_face_image(cells)


@pytest.fixture(scope="module")
def installed(comfy_server, tiny_sd15_file):
    """The tiny models under the workflows' file names, and their input pictures."""
    workflow_models.install(comfy_server.models, tiny_sd15_file)
    inputs = comfy_server.base / "input"
    hint = np.zeros((512, 512, 3), np.uint8)
    hint[128:384, 208:304] = 255
    noise = (np.random.default_rng(0).random((96, 80, 3)) * 255).astype(np.uint8)
    # The scene is already the ImageScale node's 768x512, with two bright squares that, at the face
    # detector's 640-px scale (x 5/6), cover whole cells of the tiny detector's 32-px grid.
    scene = np.zeros((512, 768, 3), np.uint8)
    scene[192:288, 192:288] = 255
    scene[192:288, 538:634] = 255
    pictures = {
        wd.PHOTO: _photo(((6, 6, "white"),)), wd.PHOTO_2: _photo(((7, 8, "white"),)),
        wd.PHOTO_3: _photo(((5, 5, "white"),)), wd.OTHER_PHOTO: _photo(((6, 6, "green"),)),
        wd.LAYOUT: _photo(((8, 4, "white"), (8, 14, "white"))), wd.SCENE: scene,
        wd.STYLE_IMAGE: noise, wd.POSE: hint,
    }
    for file_name, rgb in pictures.items():  # over the example photos: the tiny face pack finds these faces
        Image.fromarray(rgb).save(inputs / file_name, format="PNG")  # lossless, whatever the name's suffix
    photos = inputs / wd.DATASET_FOLDER  # the training workflow's dataset: two people, one face each
    photos.mkdir(exist_ok=True)
    for i, cells in enumerate((((6, 6, "white"),), ((8, 5, "green"),))):
        Image.fromarray(_photo(cells)).save(photos / f"person_{i}.png")
    (photos / "person_0.txt").write_text("a photo of a person")
    return comfy_server


def text_output(entry: dict, node_id: str) -> str:
    ui = entry["outputs"].get(node_id, {})
    return "\n".join(str(t) for t in ui.get("text", []))


@pytest.mark.parametrize("name", NAMES)
def test_runs_in_the_server_on_tiny_models(installed, name):
    workflow = wd.WORKFLOWS[name]
    if workflow.requires:
        pytest.skip(f"{name} needs weights for {', '.join(workflow.requires)}, which cannot be made small here; "
                    "test_regions.py routes real mask batches through the same Regions -> Person -> Apply chain")
    prompt = wd.with_test_overrides(workflow.prompt)
    # A fresh seed per run: the host serves an identical resubmission from its cache.
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] = int.from_bytes(name.encode()[:4], "little")
    # On SDXL, FaceStudio Apply refuses the SDXL adapter unless the checkpoint loads as SDXL (context 2048); on
    # FLUX, Apply PuLID-FLUX refuses the PuLID file unless UNETLoader read the tiny FLUX's width from its tensors.
    entry = installed.run(prompt, timeout=600)
    assert execution_error(entry) is None, f"{name}: {execution_error(entry)}"
    save = workflow.graph["save"]
    images = entry["outputs"][save]["images"]
    assert len(images) == 1
    image = Image.open(io.BytesIO(installed.view(images[0]["filename"], images[0]["subfolder"])))
    expected = ((64, 64) if any(n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage") for n in prompt.values())
                else (768, 512))
    assert image.size == expected
    if "report" in workflow.graph.nodes:  # the multi-shot report
        report = text_output(entry, workflow.graph["report"])
        assert "shot" in report.lower(), report
    if "score_report" in workflow.graph.nodes:
        report = text_output(entry, workflow.graph["score_report"])
        assert "identity_1" in report, report
