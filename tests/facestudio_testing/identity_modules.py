"""The pack's identity modules, one attribute each, for tests that use several of them:
`ident.multishot.encode_identity(...)`, `ident.files.save_identity(...)`, `ident.value.IdentityError`."""
from __future__ import annotations

from types import SimpleNamespace

MODULES = {
    "value": "encoders.identity",  # FaceIdentity, IdentityError, combining
    "multishot": "encoders.multishot",  # photos -> identity, outliers, CLIP features of the crops
    "mixing": "encoders.mixing",
    "files": "encoders.identity_files",
    "folder": "encoders.identity_folder",
    "cache": "encoders.face_cache",
}


def identity_modules(booted) -> SimpleNamespace:
    return SimpleNamespace(**{attribute: booted.pack_module(name) for attribute, name in MODULES.items()})
