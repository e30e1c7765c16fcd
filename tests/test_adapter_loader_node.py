"""FaceStudio Load Adapter in the host's real executor: validation, execution, failure reporting."""
from __future__ import annotations

import pytest

from facestudio_testing import adapter_files as af
from facestudio_testing.meta_models import comfy_model


@pytest.fixture
def ipadapter_dir(comfy_host, booted):
    """The session host's models/ipadapter; files a test writes there are removed after it."""
    import folder_paths

    folder = booted.models / "ipadapter"
    before = set(folder.rglob("*"))
    yield folder
    for path in set(folder.rglob("*")) - before:
        if path.is_file():
            path.unlink()
    # The host caches file lists by folder mtime; drop it so the next test sees the folder as it is.
    folder_paths.filename_list_cache.pop("ipadapter", None)


def loader_prompt(name: str, kind: str = "auto") -> dict:
    # The executor only runs what an output node needs; the core Preview Any node is one that takes any type.
    return {
        "1": {"class_type": "FaceStudioAdapterLoader", "inputs": {"adapter_name": name, "kind": kind}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }


def test_schema_as_the_editor_sees_it(comfy_host):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["FaceStudioAdapterLoader"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["FaceStudioAdapterLoader"] == "FaceStudio Load Adapter"
    info = cls.GET_NODE_INFO_V1()
    assert info["category"] == "FaceStudio/loaders"
    assert info["output"] == ["FACESTUDIO_ADAPTER"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(info["input"]["optional"]) == {"model"}
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert inputs["kind"][0] == "COMBO"
    assert inputs["kind"][1]["options"][0] == "auto" and "faceid-plus-v2" in inputs["kind"][1]["options"]
    assert inputs["model"][0] == "MODEL"


@pytest.mark.smoke
def test_loads_an_adapter_through_the_executor(comfy_host, ipadapter_dir, booted):
    path = af.write_adapter(ipadapter_dir / af.release_file_name("faceid-plus-v2", af.SD15, ".safetensors"),
                            af.shared_state_dict("faceid-plus-v2", af.SD15))
    result = comfy_host.run(loader_prompt(path.name))
    assert result.success, result.error

    adapter = comfy_host.output(result, "1")
    adapters = booted.pack_module("attention.adapters")
    assert isinstance(adapter, adapters.IPAdapterWeights)  # one copy of the pack: host and tests share it
    assert adapter.kind is adapters.AdapterKind.FACEID_PLUS_V2
    assert (adapter.base_model, adapter.layer_count, adapter.clip_width) == ("SD1.5", 16, 1280)
    assert adapter.source == path.name


def test_kind_override_reaches_the_loader(comfy_host, ipadapter_dir, booted):
    path = af.write_adapter(ipadapter_dir / "renamed-plus.bin", af.shared_state_dict("faceid-plus-v2", af.SD15))
    result = comfy_host.run(loader_prompt(path.name, "faceid-plus-v2"))
    assert result.success, result.error
    assert comfy_host.output(result, "1").kind.value == "faceid-plus-v2"


def test_bad_file_fails_the_node_with_the_reason(comfy_host, ipadapter_dir):
    path = af.write_adapter(ipadapter_dir / "ip-adapter-faceid_sd15-cut.safetensors",
                            af.shared_state_dict("faceid", af.SD15))
    path.write_bytes(path.read_bytes()[:1000])
    result = comfy_host.run(loader_prompt(path.name))
    assert not result.success
    assert result.error_node == "1"
    assert "ip-adapter-faceid_sd15-cut.safetensors is truncated or corrupt" in result.error
    assert "Download it again" in result.error


def test_names_outside_the_folder_are_refused(comfy_host, ipadapter_dir, booted):
    # Hosts up to 0.3.64 do not check V3 combo values against their options, so the loader must.
    outside = af.write_adapter(booted.models / "outside.safetensors", af.shared_state_dict("faceid", af.SD15))
    try:
        error = comfy_host.refusal(loader_prompt("../outside.safetensors"), "1")
    finally:
        outside.unlink()
    assert "is not a file name inside models/ipadapter" in error


def test_optional_model_is_checked_against_the_layers(comfy_host, ipadapter_dir):
    """No MODEL can be made in a graph without a checkpoint file, so the node's execute gets a meta-device one."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["FaceStudioAdapterLoader"]
    path = af.write_adapter(ipadapter_dir / af.release_file_name("faceid", af.SD15, ".bin"),
                            af.shared_state_dict("faceid", af.SD15))
    out = cls.execute(adapter_name=path.name, kind="auto", model=comfy_model("tiny-sd15"))
    assert out.result[0].layer_count == 16
    with pytest.raises(ValueError, match="is an SD1.5 adapter .* cannot be used on an SDXL model"):
        cls.execute(adapter_name=path.name, kind="auto", model=comfy_model("sdxl"))


def test_model_input_in_a_graph_with_the_tiny_checkpoint(comfy_host, ipadapter_dir, tiny_sd15):
    """CheckpointLoaderSimple's MODEL (tiny SD1.5, SD1.5's 16 cross-attention positions) into the loader."""
    fits = af.write_adapter(ipadapter_dir / af.release_file_name("faceid", af.SD15, ".safetensors"),
                            af.shared_state_dict("faceid", af.SD15))
    sdxl = af.write_adapter(ipadapter_dir / af.release_file_name("faceid", af.SDXL, ".safetensors"),
                            af.shared_state_dict("faceid", af.SDXL))

    def prompt(name):
        graph = loader_prompt(name)
        graph["0"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15}}
        graph["1"]["inputs"]["model"] = ["0", 0]
        return graph

    result = comfy_host.run(prompt(fits.name))
    assert result.success, result.error
    assert comfy_host.output(result, "1").layer_count == 16

    result = comfy_host.run(prompt(sdxl.name))
    assert not result.success and result.error_node == "1"
    assert "is an SDXL adapter (context width 2048) and cannot be used on an SD1.5 model" in result.error
