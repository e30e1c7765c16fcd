import os

import pytest


@pytest.fixture
def folders(booted):
    import folder_paths

    saved = {k: (list(v[0]), type(v[1])(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    yield booted.pack_module("startup.model_folders")
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


@pytest.mark.smoke
def test_the_entry_point_registers_the_folders_under_models(pack, folders):
    import asyncio

    import folder_paths

    for name in ("ipadapter", "insightface"):
        folder_paths.folder_names_and_paths.pop(name, None)
    extension = asyncio.run(pack.comfy_entrypoint())
    assert [n.GET_SCHEMA().node_id for n in asyncio.run(extension.get_node_list())]

    ipadapter_paths, ipadapter_exts = folder_paths.folder_names_and_paths["ipadapter"]
    assert os.path.join(folder_paths.models_dir, "ipadapter") in ipadapter_paths
    assert {".safetensors", ".bin"} <= set(ipadapter_exts)
    insightface_paths, insightface_exts = folder_paths.folder_names_and_paths["insightface"]
    assert os.path.join(folder_paths.models_dir, "insightface") in insightface_paths
    assert ".onnx" in insightface_exts


def test_another_packs_entry_is_merged_not_replaced(folders, tmp_path):
    import folder_paths

    theirs = str(tmp_path / "their_ipadapter")
    # cubiq's IPAdapter_plus registers a plain list of extensions.
    folder_paths.folder_names_and_paths["ipadapter"] = ([theirs], [".safetensors"])
    folder_paths.folder_names_and_paths["insightface"] = ([str(tmp_path / "their_insightface")], {""})
    folders.register_model_folders()
    folders.register_model_folders()  # idempotent: a second call adds nothing

    paths, exts = folder_paths.folder_names_and_paths["ipadapter"]
    assert paths == [theirs, os.path.join(folder_paths.models_dir, "ipadapter")]
    assert set(exts) == {".safetensors", ".bin"}
    paths, exts = folder_paths.folder_names_and_paths["insightface"]
    assert paths[0] == str(tmp_path / "their_insightface") and len(paths) == 2
    assert set(exts) == {"", ".onnx"}


def test_clip_vision_is_left_as_the_host_made_it(folders):
    import folder_paths

    before = (list(folder_paths.folder_names_and_paths["clip_vision"][0]),
              set(folder_paths.folder_names_and_paths["clip_vision"][1]))
    folders.register_model_folders()
    after = folder_paths.folder_names_and_paths["clip_vision"]
    assert (list(after[0]), set(after[1])) == before


@pytest.mark.smoke
def test_entry_point_then_on_load_registers_each_folder_once(pack, folders):
    """v0.33 awaits on_load after comfy_entrypoint; older hosts only call the entry point. Whichever
    runs, and however often, each folder is there once."""
    import asyncio

    import folder_paths

    for name in ("ipadapter", "insightface"):
        folder_paths.folder_names_and_paths.pop(name, None)
    extension = asyncio.run(pack.comfy_entrypoint())
    asyncio.run(extension.on_load())
    asyncio.run(extension.on_load())
    for name in ("ipadapter", "insightface"):
        paths = folder_paths.folder_names_and_paths[name][0]
        assert paths.count(os.path.join(folder_paths.models_dir, name)) == 1, paths

    folder_paths.folder_names_and_paths.pop("ipadapter")
    asyncio.run(extension.on_load())  # on_load alone registers too
    assert os.path.join(folder_paths.models_dir, "ipadapter") in folder_paths.folder_names_and_paths["ipadapter"][0]
