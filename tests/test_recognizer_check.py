"""Apply checks which face recognizer made an identity, by the hash of its ONNX file, against the one
the adapter was trained with: antelopev2's glintr100 is 512 wide like buffalo_l's w600k_r50 but an
unrelated embedding space, so a width check alone let such an identity run and draw another person.

The identities are real ones (the tiny 512-d pack through insightface and onnxruntime), saved as the
files a user with those packs would get: FaceStudio records the recognizer's file name, its sha256
(first 16 hex digits) and width. The two hashes below are public pins, written here from their
sources, not taken from the pack:
- buffalo_l/w600k_r50.onnx, sha256 4c06341c33c2ca1f...: the git-lfs pointer in thebiglaskowski/faceoff
  (buffalo_l/w600k_r50.onnx, size 174383860) and Visionatrix/Visionatrix visionatrix/basic_node_list.py.
- antelopev2/glintr100.onnx, sha256 4ab1d6435d639628...: the git-lfs pointer in ZHO-ZHO-ZHO/ComfyUI-InstantID
  (models/antelopev2/glintr100.onnx, size 260665334) and the same Visionatrix list.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
from pathlib import Path

import pytest
from PIL import Image

from facestudio_testing import adapter_files as af
from facestudio_testing import face_models as fm
from facestudio_testing import graphs
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

W600K_R50_SHA256_16 = "4c06341c33c2ca1f"
GLINTR100_SHA256_16 = "4ab1d6435d639628"
FACEID = "fs_reccheck_faceid_sd15.safetensors"
IDENTITY_KINDS = ("faceid", "faceid-plus", "faceid-plus-v2", "faceid-portrait", "faceid-portrait-unnorm")
LOGGER = "FaceStudio.recognizers"


def as_made_by(identity, file_name: str, sha256_16: str):
    """The identity as encoding the same photo with a pack holding this recognizer records it."""
    recognizer = dataclasses.replace(identity.recognizer, file_name=file_name, sha256_16=sha256_16)
    return dataclasses.replace(identity, recognizer=recognizer)


@pytest.fixture(scope="module")
def tiny_identity(booted):
    analyzer = booted.pack_module("encoders.faces").load_face_analyzer(fm.tiny_pack(), providers="cpu")
    identity = identity_modules(booted).multishot.encode_identity(analyzer, [fm.tiny_face_image()])
    assert identity.embedding_dim == 512
    return identity


@pytest.fixture(scope="module")
def env(comfy_host, booted, tiny_sd15, tiny_identity):
    """The tiny checkpoint, a FaceID adapter in models/ipadapter, and identity files in the output folder
    made with glintr100, with w600k_r50 and with a recognizer no one knows (a new hash each run, so its
    warning cannot have been logged by an earlier test)."""
    import folder_paths

    ident = identity_modules(booted)
    adapter = af.write_adapter(booted.models / "ipadapter" / FACEID, af.shared_state_dict("faceid", af.SD15))
    folder_paths.filename_list_cache.pop("ipadapter", None)
    unknown = secrets.token_hex(8)
    root = Path(booted.pack_module("nodes.identity").identities_folder())
    files = {
        "glintr100": ("glintr100.onnx", GLINTR100_SHA256_16),
        "w600k_r50": ("w600k_r50.onnx", W600K_R50_SHA256_16),
        "unknown": ("my_arcface.onnx", unknown),
    }
    written = {}
    for label, (name, sha) in files.items():
        path = ident.files.save_identity(as_made_by(tiny_identity, name, sha), root / f"fs_reccheck_{label}.safetensors")
        written[label] = path.name
    yield {"checkpoint": tiny_sd15, "files": written, "unknown": unknown}
    adapter.unlink()
    folder_paths.filename_list_cache.pop("ipadapter", None)
    for name in written.values():
        (root / name).unlink()


def apply_graph(env, identity_file: str, weight: float = 1.0) -> tuple[graphs.Graph, str]:
    """Load Identity -> Person -> Apply (FaceID) -> KSampler, as a user wires a saved identity."""
    g = graphs.txt2img(env["checkpoint"], output="latent")
    load = g.add("FaceStudioIdentityLoad", {"identity_file": identity_file})
    person = g.add("FaceStudioPerson", {"identity": [load, 0], "weight": weight, "start": 0.0, "end": 1.0,
                                        "mask_index": 0})
    loader = g.add("FaceStudioAdapterLoader", {"adapter_name": FACEID, "kind": "auto"})
    node = g.insert_model_node("FaceStudioApply", {"adapter": [loader, 0], "persons": [person, 0], "alpha": 0.5,
                                                   "style_weight": 1.0})
    return g, node


def test_an_antelopev2_identity_is_refused_by_apply_naming_both_recognizers(comfy_host, env):
    g, node = apply_graph(env, env["files"]["glintr100"])
    result = comfy_host.run(g.prompt)
    assert not result.success
    assert result.error_node == node, result.error
    for part in ("glintr100", GLINTR100_SHA256_16, "w600k_r50", "buffalo_l", FACEID, "encode the identity again"):
        assert part in result.error, (part, result.error)


def test_a_buffalo_l_identity_runs_without_a_recognizer_warning(comfy_host, env, caplog):
    g, _ = apply_graph(env, env["files"]["w600k_r50"])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = comfy_host.run(g.prompt)
    assert result.success, result.error
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_an_unknown_recognizer_warns_once_and_runs(comfy_host, env, caplog):
    """Two Applies (the second with another weight, so the host runs it again), each over every layer and
    sampling step: one warning, naming the recognizer and the one the adapter expects."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for weight in (1.0, 0.9):
            g, _ = apply_graph(env, env["files"]["unknown"], weight)
            result = comfy_host.run(g.prompt)
            assert result.success, result.error
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and env["unknown"] in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "my_arcface.onnx" in warnings[0] and "w600k_r50" in warnings[0] and "buffalo_l" in warnings[0]


@pytest.fixture(scope="module")
def adapters(booted, tmp_path_factory):
    load = booted.pack_module("attention.adapters").load_adapter
    folder = tmp_path_factory.mktemp("reccheck_adapters")
    return {kind: load(str(af.write_adapter(folder / f"{kind}.safetensors", af.shared_state_dict(kind, af.SD15))))
            for kind in IDENTITY_KINDS}


@pytest.mark.parametrize("kind", IDENTITY_KINDS)
def test_every_faceid_kind_takes_buffalo_l_and_refuses_glintr100(booted, adapters, tiny_identity, kind):
    """The adapter's own inputs (what Apply projects), for every FaceID kind: all were trained on w600k_r50."""
    patch = booted.pack_module("attention.patch")
    errors = booted.pack_module("attention.adapters").AdapterError
    buffalo = as_made_by(tiny_identity, "w600k_r50.onnx", W600K_R50_SHA256_16)
    if kind in ("faceid-plus", "faceid-plus-v2"):  # these also need CLIP features; the recognizer is checked first
        with pytest.raises(errors, match="CLIP vision"):
            patch._identity_inputs(adapters[kind], buffalo)
    else:
        patch._identity_inputs(adapters[kind], buffalo)
    with pytest.raises(errors, match="glintr100") as refused:
        patch._identity_inputs(adapters[kind], as_made_by(tiny_identity, "glintr100.onnx", GLINTR100_SHA256_16),
                               "The negative identity")
    assert "The negative identity" in str(refused.value) and "w600k_r50" in str(refused.value)


def test_an_identity_file_without_a_recognizer_hash_warns_and_runs(booted, adapters, tiny_identity, tmp_path, caplog):
    """Every identity file format so far records the hash; one whose hash is blank (written by hand or by
    another tool) cannot be checked, so it is warned about, not refused."""
    ident, patch = identity_modules(booted), booted.pack_module("attention.patch")
    name = f"hashless_{secrets.token_hex(4)}.onnx"
    loaded = ident.files.load_identity(ident.files.save_identity(as_made_by(tiny_identity, name, ""), tmp_path / "old.safetensors"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            patch._identity_inputs(adapters["faceid"], loaded)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and name in r.getMessage()]
    assert len(warnings) == 1 and "records no hash" in warnings[0], warnings


def test_the_check_reads_the_hash_not_the_file_name(booted, adapters, tiny_identity):
    """glintr100's bytes renamed to w600k_r50.onnx are still glintr100; w600k_r50 in a folder called
    antelopev2 under another name is still buffalo_l's recognizer."""
    patch = booted.pack_module("attention.patch")
    errors = booted.pack_module("attention.adapters").AdapterError
    with pytest.raises(errors, match="glintr100"):
        patch._identity_inputs(adapters["faceid"], as_made_by(tiny_identity, "w600k_r50.onnx", GLINTR100_SHA256_16))
    patch._identity_inputs(adapters["faceid"], as_made_by(tiny_identity, "glintr100.onnx", W600K_R50_SHA256_16))
