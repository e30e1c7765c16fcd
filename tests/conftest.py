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


def pytest_unconfigure(config):
    bootstrap.remove_base_directory()


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


# --- a tiny real-format SD1.5 checkpoint (tests/facestudio_testing/tiny_models.py) -----------
@pytest.fixture(scope="session")
def tiny_sd15_file(booted):
    """The cached checkpoint file (generated on first use, about 3 s)."""
    from facestudio_testing import tiny_models

    return tiny_models.tiny_sd15_checkpoint()


@pytest.fixture(scope="session")
def tiny_sd15(booted, tiny_sd15_file) -> str:
    """The tiny SD1.5 checkpoint installed in the in-process host; its CheckpointLoaderSimple name."""
    from facestudio_testing import tiny_models

    return tiny_models.install_checkpoint(booted.models)


@pytest.fixture(scope="session")
def server_with_checkpoint(comfy_server, tiny_sd15_file):
    """`comfy_server` with the tiny SD1.5 checkpoint installed as tiny_models.CHECKPOINT_NAME.
    Installing after start-up is fine: the host rescans a model folder whose mtime changed."""
    from facestudio_testing import tiny_models

    tiny_models.install_checkpoint(comfy_server.models)
    return comfy_server


# ---- faces: the pack's face module, the trained YuNet + SFace pack on the CPU, insightface's t1 ----
@pytest.fixture(scope="session")
def faces(booted):
    return booted.pack_module("encoders.faces")


@pytest.fixture(scope="session")
def real(faces):
    from facestudio_testing import face_models

    return faces.load_face_analyzer(face_models.real_pack(), providers="cpu")


@pytest.fixture(scope="session")
def t1():
    """insightface's six-person photo (RGB uint8)."""
    from facestudio_testing import face_photos

    photo = face_photos.t1()
    photo.setflags(write=False)  # shared by every module: a test that writes to it must copy it first
    return photo


@pytest.fixture(scope="module")
def setup(comfy_host, booted, tiny_sd15):
    """The SD1.5 Apply tests' files in the host's folders (facestudio_testing/sd15_apply.py); the checkpoint name."""
    from facestudio_testing import sd15_apply

    yield from sd15_apply.installed_apply_models(booted, tiny_sd15)


@pytest.fixture(scope="module")
def loaded(booted, setup, tiny_sd15_file):
    """(MODEL, FaceID adapter, two identities) for calling apply_facestudio directly."""
    from facestudio_testing import sd15_apply

    return sd15_apply.loaded_apply_parts(booted, tiny_sd15_file)


@pytest.fixture(scope="module")
def tiny_clip(booted, tmp_path_factory):
    """comfy.clip_vision.ClipVisionModel (the host's CLIP_VISION object) at a tiny size, seeded weights."""
    from facestudio_testing import clip_models

    return clip_models.tiny_clip_vision(tmp_path_factory.mktemp("clip"))
