"""The pack inside the real ComfyUI server (main.py --cpu), driven over HTTP as a user's browser would."""
from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from facestudio_testing import graphs, tiny_models
from facestudio_testing.bootstrap import PACK_LINK_NAME
from facestudio_testing.server import ANSI_ESCAPE, execution_error


@pytest.mark.smoke
def test_text_to_image_over_http_returns_a_png_of_the_requested_size(server_with_checkpoint):
    server = server_with_checkpoint
    # Not square, so that swapped width and height cannot pass.
    graph = graphs.txt2img(tiny_models.CHECKPOINT_NAME, width=64, height=96, steps=2, seed=7,
                           filename_prefix="facestudio_http")
    entry = server.run(graph.prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["status"]["status_str"] == "success"
    images = entry["outputs"][graph["save"]]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"

    data = server.view(images[0]["filename"], images[0]["subfolder"])
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every chunk: a truncated or corrupt PNG fails here
    assert image.format == "PNG"
    assert image.size == (64, 96)  # PIL: (width, height)
    assert image.mode == "RGB"


@pytest.mark.smoke
def test_object_info_lists_every_pack_node(comfy_server, booted):
    node_list = booted.pack_module("nodes").NODE_LIST
    assert node_list, "the pack registers no nodes"
    object_info = comfy_server.get_json("/object_info")
    for node_cls in node_list:
        node_id = node_cls.GET_SCHEMA().node_id
        assert node_id in object_info, f"{node_id} missing from /object_info"
        # Ours, not a same-named node of another pack.
        assert object_info[node_id]["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"


@pytest.mark.smoke
def test_startup_log_shows_the_pack_loaded_without_import_errors(comfy_server):
    lines = comfy_server.log_messages()
    log = "\n".join(lines)
    pack_path = re.escape(f"custom_nodes/{PACK_LINK_NAME}")
    failures = [
        line for line in lines
        if ("IMPORT FAILED" in line or "Cannot import" in line or "Skip " in line) and PACK_LINK_NAME in line
        or "Error while calling comfy_entrypoint" in line
        or "comfy_entrypoint in" in line  # the host's other entrypoint complaints
    ]
    assert not failures, "\n".join(failures)
    # Nothing error-looking on a normal start (hosts from about 0.3.70 tag each line with its level).
    # Only the start-up: the server is shared, and later prompts of other tests may log refusals.
    tagged = [ANSI_ESCAPE.sub("", line) for line in comfy_server.log().split("got prompt", 1)[0].splitlines()]
    errors = [line for line in tagged if line.startswith(("[ERROR]", "[CRITICAL]")) or line.startswith("Traceback")]
    assert not errors, "\n".join(errors)
    # The host's "Import times for custom nodes" list names every pack it loaded.
    assert "Import times for custom nodes:" in log
    assert re.search(rf"^\s*\d+\.\d seconds: \S*{pack_path}\s*$", log, re.MULTILINE), log[-3000:]
