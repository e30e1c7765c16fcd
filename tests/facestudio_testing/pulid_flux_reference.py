"""PuLID's reference modules for the FLUX injection: PerceiverAttentionCA, IDFormer and its FLUX model
(Black Forest Labs' layout), imported from the pinned PuLID clone at test time.

The clone is found and checked (the commit of scripts/pulid.pin) by pulid_reference.pulid_dir, which
also puts it on sys.path for the identity tests; this module adds the FLUX-side classes. Its top-level
packages are `flux`, `pulid` and `eva_clip`, which nothing in the host or the pack is named.
"""
from __future__ import annotations

import importlib
import sys

from .pulid_reference import idformer_class, pulid_dir


def _module(name: str):
    root = str(pulid_dir())
    if root not in sys.path:
        # Appended: the clone's root holds an app.py and a models/ folder, which must not shadow the host's
        # `app` package. The same string pulid_reference uses, so there is one entry and one copy of each module.
        sys.path.append(root)
    return importlib.import_module(name)


def perceiver_attention_ca():
    """The class PuLID-FLUX injects after FLUX blocks (pulid/encoders_transformer.py)."""
    return _module("pulid.encoders_transformer").PerceiverAttentionCA


def idformer():
    _module("pulid.encoders_transformer")  # the clone on sys.path, appended
    return idformer_class()


def flux_model():
    """(Flux, FluxParams) of the reference's flux/model.py: BFL's FLUX with PuLID's injection points."""
    module = _module("flux.model")
    return module.Flux, module.FluxParams
