"""Host fixtures shared by every test. See tests/facestudio_testing/ for the machinery."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for facestudio_testing only; never the pack root

from facestudio_testing import bootstrap  # noqa: E402


def pytest_configure(config):
    # Before collection: test modules may import host modules at top level.
    bootstrap.boot()


@pytest.fixture(scope="session")
def booted() -> bootstrap.BootedHost:
    return bootstrap.boot()


@pytest.fixture(scope="session")
def pack(booted):
    """The pack's top-level module, as the host loads it."""
    return booted.pack_module()


@pytest.fixture(scope="session")
def comfy_host(booted):
    """The real host in this process (node loader with custom nodes, PromptExecutor)."""
    from facestudio_testing.inprocess import InProcessHost

    return InProcessHost(booted)


@pytest.fixture(scope="session")
def comfy_server():
    """The real ComfyUI server on a free loopback port, with this pack linked in; always stopped."""
    from facestudio_testing.server import ComfyServer

    server = ComfyServer()
    try:
        yield server.start()
    finally:
        server.cleanup()
