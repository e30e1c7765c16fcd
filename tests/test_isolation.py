"""Names from a workflow stay inside ComfyUI's folders: adapters in models/ipadapter, face packs in
models/insightface/models, identity files read from and written to output/facestudio/identities only.

Hosts up to 0.3.64 do not check V3 combo values against their options, so whatever string a workflow
holds reaches the nodes (v0.33 refuses a value outside the list first; there the node's own execute
is checked on the same value: `InProcessHost.refusal`): each traversal attempt (`..`, absolute paths, drive letters, backslashes, links
out of the identities folder) is aimed at a real file or folder that exists outside, so a resolver that
let it through would load or write it. Links the user puts in a model folder are followed, as the host's
own loaders do; the identities folder, which FaceStudio writes, refuses links that leave it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from facestudio_testing import adapter_files as af
from facestudio_testing import face_models as fm
from facestudio_testing import face_photos
from facestudio_testing import graphs
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

ADAPTER = "fs_iso_faceid_sd15.safetensors"
OUTSIDE_ADAPTER = "fs_iso_outside_adapter.safetensors"


def all_files(*roots: Path) -> set[Path]:
    """Every file under the roots; for a host base directory, under its input, output, temp and user folders."""
    folders = [sub for root in roots for sub in ([root / n for n in ("input", "output", "temp", "user")]
                                                 if (root / "custom_nodes").is_dir() else [root])]
    return {p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def env(comfy_host, booted, tmp_path_factory):
    """An adapter inside models/ipadapter and one outside it; an identity inside output/facestudio/identities,
    copies outside it (in output/ and in a folder outside the host), and links from the identities folder to them."""
    import folder_paths

    outside = tmp_path_factory.mktemp("fs_iso_outside")
    adapters = booted.models / "ipadapter"
    state = af.adapter_state_dict("faceid", af.SD15, layer_widths=(320,) * 16, lora_rank=None)
    inside_adapter = af.write_adapter(adapters / ADAPTER, state)
    outside_adapters = [af.write_adapter(booted.models / OUTSIDE_ADAPTER, state),
                        af.write_adapter(outside / OUTSIDE_ADAPTER, state)]
    folder_paths.filename_list_cache.pop("ipadapter", None)

    packs = booted.models / "insightface" / "models"
    packs.mkdir(parents=True, exist_ok=True)
    if not (packs / fm.TINY_PACK).exists():
        (packs / fm.TINY_PACK).symlink_to(fm.tiny_pack(), target_is_directory=True)

    ident, faces = identity_modules(booted), booted.pack_module("encoders.faces")
    output = Path(folder_paths.get_output_directory())
    identities = output / "facestudio" / "identities"
    identity = ident.multishot.encode_identity(faces.load_face_analyzer(fm.tiny_pack(), providers="cpu"),
                                     [fm.tiny_face_image()], cache=None)
    inside = ident.files.save_identity(identity, identities / "fs_iso" / "inside_00001.safetensors")
    in_output = ident.files.save_identity(identity, output / "fs_iso_in_output.safetensors")
    far = ident.files.save_identity(identity, outside / "fs_iso_far.safetensors")
    (identities / "fs_iso" / "link_00001.safetensors").symlink_to(far)
    (identities / "fs_iso" / "linked_dir").symlink_to(outside, target_is_directory=True)
    yield {"outside": outside, "output": output, "identities": identities, "identity": identity,
           "inside_identity": inside, "in_output": in_output, "far": far, "adapter": inside_adapter,
           "outside_adapters": outside_adapters}
    for path in [inside_adapter, *outside_adapters, inside, in_output]:
        path.unlink(missing_ok=True)
    shutil.rmtree(identities / "fs_iso", ignore_errors=True)
    folder_paths.filename_list_cache.pop("ipadapter", None)


def preview(g: graphs.Graph, source: list) -> str:
    return g.add("PreviewAny", {"source": source})


def node_prompt(class_type: str, inputs: dict) -> tuple[dict, str]:
    g = graphs.Graph()
    node = g.add(class_type, inputs, "node")
    preview(g, [node, 0])
    return g.prompt, node


def run_node(comfy_host, class_type: str, inputs: dict):
    prompt, node = node_prompt(class_type, inputs)
    return comfy_host.run(prompt), node


def refusal(comfy_host, class_type: str, inputs: dict) -> str:
    return comfy_host.refusal(*node_prompt(class_type, inputs))


# --- adapters ---------------------------------------------------------------------------------------

def adapter_names(env) -> list[str]:
    far = env["outside_adapters"][1]
    return [f"../{OUTSIDE_ADAPTER}", f"..\\{OUTSIDE_ADAPTER}", str(env["outside_adapters"][0]), str(far),
            f"sub/../../{OUTSIDE_ADAPTER}", "../" * 12 + str(far).lstrip("/"), f"C:\\{OUTSIDE_ADAPTER}",
            f"/{ADAPTER}", f"./../{OUTSIDE_ADAPTER}"]


def test_adapter_names_cannot_leave_the_ipadapter_folder(comfy_host, env):
    for name in adapter_names(env):
        error = refusal(comfy_host, "FaceStudioAdapterLoader", {"adapter_name": name, "kind": "auto"})
        assert "is not a file name inside models/ipadapter" in error, (name, error)
        assert "no absolute paths or '..'" in error
    # The same file, named as the folder lists it, loads: the refusals above are about the path alone.
    result, node = run_node(comfy_host, "FaceStudioAdapterLoader", {"adapter_name": ADAPTER, "kind": "auto"})
    assert result.success, result.error
    assert comfy_host.output(result, node).source == ADAPTER


def test_names_that_only_look_like_paths_are_missing_files(comfy_host, env):
    for name in ("~/" + OUTSIDE_ADAPTER, "%2e%2e/" + OUTSIDE_ADAPTER, OUTSIDE_ADAPTER + "\x00.safetensors", ""):
        error = refusal(comfy_host, "FaceStudioAdapterLoader", {"adapter_name": name, "kind": "auto"})
        assert ("No adapter file" in error or "is not a file name inside" in error), error


def test_a_link_the_user_puts_in_the_model_folder_is_followed(comfy_host, env, booted):
    """As the host's own model loaders do: users link model folders and files from other disks."""
    import folder_paths

    link = booted.models / "ipadapter" / "fs_iso_user_link.safetensors"
    link.symlink_to(env["outside_adapters"][1])
    folder_paths.filename_list_cache.pop("ipadapter", None)
    try:
        result, node = run_node(comfy_host, "FaceStudioAdapterLoader", {"adapter_name": link.name, "kind": "auto"})
    finally:
        link.unlink()
        folder_paths.filename_list_cache.pop("ipadapter", None)
    assert result.success, result.error


# --- face analyzer packs ----------------------------------------------------------------------------

def test_pack_names_cannot_leave_the_insightface_models_folder(comfy_host, env, booted):
    real_pack_dir = str(fm.tiny_pack())  # a complete pack that exists outside the host's folders
    names = ["..", ".", "../models/" + fm.TINY_PACK, real_pack_dir, fm.TINY_PACK + "/..", f"{fm.TINY_PACK}\\..",
             "../../insightface/models/" + fm.TINY_PACK, "C:\\" + fm.TINY_PACK, ""]
    for name in names:
        error = refusal(comfy_host, "FaceStudioFaceAnalyzerLoader", {"pack": name, "provider": "CPU", "det_size": 640})
        assert "is not a model pack folder name" in error or "No insightface model pack" in error, (name, error)
        assert str(booted.models / "insightface" / "models") in error
    result, node = run_node(comfy_host, "FaceStudioFaceAnalyzerLoader",
                            {"pack": fm.TINY_PACK, "provider": "CPU", "det_size": 640})
    assert result.success, result.error


# --- identity files: reading ------------------------------------------------------------------------

def test_identity_names_cannot_leave_the_identities_folder(comfy_host, env):
    refused = {
        "../../fs_iso_in_output.safetensors": "no absolute paths or '..'",
        "..\\..\\fs_iso_in_output.safetensors": "no absolute paths or '..'",
        "fs_iso/../../../fs_iso_in_output.safetensors": "no absolute paths or '..'",
        str(env["in_output"]): "no absolute paths or '..'",
        str(env["far"]): "no absolute paths or '..'",
        "C:/fs_iso_in_output.safetensors": "no absolute paths or '..'",
        "fs_iso/link_00001.safetensors": "is outside the identities folder",
        "fs_iso/linked_dir/fs_iso_far.safetensors": "is outside the identities folder",
        "fs_iso/inside_00001.safetensors\x00": "control characters",
    }
    for name, says in refused.items():
        error = refusal(comfy_host, "FaceStudioIdentityLoad", {"identity_file": name})
        assert says in error, (name, error)
    result, node = run_node(comfy_host, "FaceStudioIdentityLoad", {"identity_file": "fs_iso/inside_00001.safetensors"})
    assert result.success, result.error
    assert comfy_host.output(result, node).embedding.tobytes() == env["identity"].embedding.tobytes()


# --- identity files: writing ------------------------------------------------------------------------

def save_prompt(prefix: str) -> tuple[dict, str]:
    g = graphs.Graph()
    g.add("FaceStudioFaceAnalyzerLoader", {"pack": fm.TINY_PACK, "provider": "CPU", "det_size": 640}, "analyzer")
    g.add("LoadImage", {"image": "fs_iso_face.png"}, "photo")
    g.add("FaceStudioIdentityEncode", {"face_analyzer": g.link("analyzer"), "image": g.link("photo"),
                                       "face": "largest", "index": 0, "on_missing": "error",
                                       "outlier_threshold": 0.4}, "encode")
    node = g.add("FaceStudioIdentitySave", {"identity": g.link("encode"), "filename_prefix": prefix}, "save")
    return g.prompt, node


@pytest.fixture(scope="module")
def face_photo(booted):
    from PIL import Image

    (booted.base / "input").mkdir(exist_ok=True)
    Image.fromarray(fm.tiny_face_image()).save(booted.base / "input" / "fs_iso_face.png")


def test_saved_identities_go_only_under_the_identities_folder(comfy_host, env, booted, face_photo):
    outside = env["outside"]
    refused = {
        "../../fs_iso_escape": "no absolute paths or '..'",
        "../../../fs_iso_escape": "no absolute paths or '..'",
        "fs_iso/../../../fs_iso_escape": "no absolute paths or '..'",
        "..\\..\\fs_iso_escape": "no absolute paths or '..'",
        str(outside / "fs_iso_escape"): "no absolute paths or '..'",
        "C:\\fs_iso_escape": "no absolute paths or '..'",
        "fs_iso/linked_dir/fs_iso_escape": "would save outside",
        "fs_iso/linked_dir/deeper/fs_iso_escape": "would save outside",
        "fs_iso/a\x00b": "control characters",
        "fs_iso/line\nbreak": "control characters",
        "fs_iso/" + "x" * 300: "use a shorter name",
        "": "is empty",
        "/": "is empty",
    }
    before = all_files(booted.base, outside)
    for prefix, says in refused.items():
        prompt, node = save_prompt(prefix)
        result = comfy_host.run(prompt)
        assert not result.success and result.error_node == node, repr(prefix)
        assert says in result.error, (prefix, result.error)
    assert all_files(booted.base, outside) == before  # nothing written anywhere, inside or out

    # A sub-folder prefix is fine, and lands under the identities folder.
    prompt, node = save_prompt("fs_iso/ok/me")
    result = comfy_host.run(prompt)
    assert result.success, result.error
    new = all_files(booted.base, outside) - before
    assert new == {env["identities"] / "fs_iso" / "ok" / "me_00001.safetensors"}


def test_a_file_where_the_folder_should_be_is_a_clear_error(comfy_host, env, face_photo):
    blocker = env["identities"] / "fs_iso" / "blocked"
    blocker.write_bytes(b"not a folder")
    prompt, node = save_prompt("fs_iso/blocked/me")
    result = comfy_host.run(prompt)
    assert not result.success and result.error_node == node
    assert "Could not write the identity file" in result.error and "blocked" in result.error
    assert "choose another filename_prefix" in result.error


# --- over HTTP --------------------------------------------------------------------------------------

def test_the_server_keeps_workflow_names_inside_its_folders(comfy_server, tmp_path):
    from PIL import Image

    from facestudio_testing.server import execution_error

    base = comfy_server.base
    face_photos.install_packs(comfy_server.models)
    (base / "input").mkdir(exist_ok=True)
    Image.fromarray(fm.tiny_face_image()).save(base / "input" / "fs_iso_face.png")
    af.write_adapter(tmp_path / OUTSIDE_ADAPTER, af.adapter_state_dict("faceid", af.SD15, layer_widths=(320,),
                                                                        lora_rank=None))
    before = all_files(base, tmp_path)

    attempts = []
    for prefix in ("../../../fs_iso_escape", str(tmp_path / "fs_iso_escape")):
        attempts.append((save_prompt(prefix)[0], "no absolute paths or '..'"))
    g = graphs.Graph()
    preview(g, [g.add("FaceStudioAdapterLoader", {"adapter_name": str(tmp_path / OUTSIDE_ADAPTER), "kind": "auto"}), 0])
    attempts.append((g.prompt, "is not a file name inside models/ipadapter"))
    g = graphs.Graph()
    preview(g, [g.add("FaceStudioFaceAnalyzerLoader", {"pack": str(fm.tiny_pack()), "provider": "CPU",
                                                        "det_size": 640}), 0])
    attempts.append((g.prompt, "is not a model pack folder name"))
    for prompt, says in attempts:
        error = comfy_server.refusal(prompt, timeout=120)
        assert error is not None, prompt
        if error.startswith("/prompt refused the prompt"):  # v0.33: a combo value outside its list
            assert "not in" in error.lower(), error
        else:
            assert says in error, error
    assert all_files(base, tmp_path) == before

    entry = comfy_server.run(save_prompt("fs_iso/served")[0], timeout=120)
    assert execution_error(entry) is None
    saved = base / "output" / "facestudio" / "identities" / "fs_iso" / "served_00001.safetensors"
    assert all_files(base, tmp_path) - before == {saved} and saved.stat().st_size > 0
