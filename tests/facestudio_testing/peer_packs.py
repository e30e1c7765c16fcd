"""Other custom node packs the tests chain with FaceStudio, each in a server of its own.

cubiq's ComfyUI_IPAdapter_plus (GPL-3.0) is cloned at the commit of scripts/ipadapter-plus.pin by
scripts/setup.sh into .comfyui/ComfyUI_IPAdapter_plus, never committed. It goes only into the
custom_nodes of a ComfyServer started for the tests that chain it: the in-process host that every
other test shares never loads it (its folder registrations would change what those tests see).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .bootstrap import PACK_ROOT
from .server import ComfyServer

IPADAPTER_PLUS_PIN = PACK_ROOT / "scripts" / "ipadapter-plus.pin"
IPADAPTER_PLUS_LINK_NAME = "ComfyUI_IPAdapter_plus"
TESTS_DIR = PACK_ROOT / "tests"

# A single-file custom node: test-only nodes for graphs run over HTTP (SDXL conditioning without
# text encoders; see tiny_sdxl.RandomSDXLConditioning).
_TEST_NODES = '''"""FaceStudio's test-only nodes (written by tests/facestudio_testing/peer_packs.py)."""
import sys

sys.path.insert(0, {tests!r})
from facestudio_testing.tiny_sdxl import RandomSDXLConditioning

NODE_CLASS_MAPPINGS = {{RandomSDXLConditioning.NODE_ID: RandomSDXLConditioning}}
'''


def _pin(name: str) -> str:
    for line in IPADAPTER_PLUS_PIN.read_text().splitlines():
        if line.startswith(name + "="):
            return line.split("=", 1)[1].strip()
    raise RuntimeError(f"{IPADAPTER_PLUS_PIN} has no '{name}=' line")


def ipadapter_plus_dir() -> Path:
    """The clone of the pinned commit: $FACESTUDIO_IPADAPTER_PLUS_DIR (set by scripts/setup.sh), else
    .comfyui/ComfyUI_IPAdapter_plus. A missing or different checkout is an error, not a skip."""
    path = Path(os.environ.get("FACESTUDIO_IPADAPTER_PLUS_DIR") or PACK_ROOT / ".comfyui" / IPADAPTER_PLUS_LINK_NAME)
    commit = _pin("commit")
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0 or head.stdout.strip() != commit:
        raise RuntimeError(f"No ComfyUI_IPAdapter_plus checkout of {commit} at {path} (found "
                           f"{head.stdout.strip() or 'none'}): run scripts/setup.sh, which clones it.")
    return path.resolve()


class PeerServer(ComfyServer):
    """A ComfyServer whose custom_nodes hold FaceStudio, cubiq's ComfyUI_IPAdapter_plus and the test nodes."""

    def __init__(self, startup_timeout: float = 180.0):
        super().__init__(startup_timeout)
        nodes = self.base / "custom_nodes"
        (nodes / IPADAPTER_PLUS_LINK_NAME).symlink_to(ipadapter_plus_dir(), target_is_directory=True)
        (nodes / "facestudio_test_nodes.py").write_text(_TEST_NODES.format(tests=str(TESTS_DIR)))

    def import_failures(self) -> list[str]:
        """The start-up log's lines about custom nodes that failed to import (the host still starts)."""
        return [line for line in self.log_messages() if "IMPORT FAILED" in line or "Cannot import" in line]
