"""PuLID-FLUX Apply's inputs: person lists of PuLID-FLUX identities, checked, then apply_pulid_flux.

The person list is a tuple of flux_patch.FluxPerson (never changed in place: each Person node makes a
new tuple). What a FaceStudio Person node makes for the SD adapters (attention.persons.Person, an
IP-Adapter identity) is refused here with what to connect instead.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..encoders.pulid_flux_identity import PuLIDFlux, PuLIDFluxIdentity
from .flux_patch import FluxPerson, apply_pulid_flux
from .persons import Person, add_person
from .pulid_flux_adapter import PuLIDFluxError

__all__ = ["add_flux_person", "apply_pulid_flux_persons"]


def add_flux_person(persons: Sequence[FluxPerson] | None, identity, weight: float = 1.0, start: float = 0.0,
                    end: float = 1.0, mask: torch.Tensor | None = None, mask_index: int = 0) -> tuple[FluxPerson, ...]:
    """A new tuple: `persons` plus this PuLID-FLUX identity (the mask batch's `mask_index`-th, as FaceStudio
    Person picks it)."""
    if not isinstance(identity, PuLIDFluxIdentity):
        raise PuLIDFluxError(f"The identity is {_not_flux_identity(identity)}")
    _check_list(persons)
    picked = add_person(None, identity, mask, mask_index, weight, start, end)[0]  # the same mask/range checks
    person = FluxPerson(identity.id_tokens, identity.uncond_tokens, picked.weight, picked.mask, picked.start,
                        picked.end)
    return tuple(persons or ()) + (person,)


def apply_pulid_flux_persons(model, pulid: PuLIDFlux, persons: Sequence[FluxPerson]):
    """A clone of the FLUX `model` with the persons' identities (apply_pulid_flux)."""
    if not isinstance(pulid, PuLIDFlux):
        raise PuLIDFluxError(f"Expected the output of FaceStudio Load PuLID-FLUX, got {type(pulid).__name__}.")
    _check_list(persons)
    if not persons:
        raise PuLIDFluxError("No persons: connect FaceStudio Person PuLID-FLUX.")
    return apply_pulid_flux(model, pulid.weights, tuple(persons))


def _check_list(persons) -> None:
    if persons is None:
        return
    if not isinstance(persons, (tuple, list)):
        raise PuLIDFluxError(f"persons must be a person list from FaceStudio Person PuLID-FLUX, got "
                             f"{type(persons).__name__}.")
    for n, p in enumerate(persons):
        if isinstance(p, Person):
            raise PuLIDFluxError(f"person {n} comes from FaceStudio Person with {_not_flux_identity(p.identity)}")
        if not isinstance(p, FluxPerson):
            raise PuLIDFluxError(f"person {n} is a {type(p).__name__}, not a PuLID-FLUX person: build the list with "
                                 "FaceStudio Person PuLID-FLUX.")


def _not_flux_identity(identity) -> str:
    return (f"a {type(identity).__name__}, an identity for the IP-Adapter (SD1.5 / SDXL) nodes, not PuLID-FLUX ID "
            "tokens: encode the photos with FaceStudio Encode Identity PuLID-FLUX and add them with FaceStudio "
            "Person PuLID-FLUX.")
