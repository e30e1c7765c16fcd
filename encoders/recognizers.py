"""Which face recognizer made an embedding, and which one each identity adapter was trained with.

Recognizers 512 wide are not interchangeable: buffalo_l's w600k_r50 and antelopev2's glintr100 are
separately trained networks whose embedding axes mean different things, so an adapter trained on one
reads the other's embedding as a different person, silently. A recognizer is identified by the
sha256 of its ONNX file (`RecognizerIdentity.sha256_16`, the first 16 hex digits), never by its file
or folder name: packs are renamed, re-zipped and nested freely.

Host-free and torch-free; keyed by the `AdapterKind` values of attention/adapters.py (plain strings,
so this module imports nothing from attention/). attention/patch.py calls `check_recognizer` at Apply.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from .faces import RecognizerIdentity

logger = logging.getLogger("FaceStudio.recognizers")


@dataclass(frozen=True)
class KnownRecognizer:
    name: str  # how messages name it: "<pack> <file>"
    pack: str  # the insightface pack that ships it
    file_name: str
    sha256: str  # of the whole .onnx file
    size: int  # bytes, where a source states it (0: not stated)
    embedding_dim: int
    source: str  # where the hash was read (public repositories; see the README)

    @property
    def sha256_16(self) -> str:
        return self.sha256[:16]


# Hashes from public pins that agree with one another (git-lfs pointers and download checks);
# none is computed here, since the files cannot be downloaded on the test machines.
W600K_R50 = KnownRecognizer(
    "buffalo_l w600k_r50", "buffalo_l", "w600k_r50.onnx",
    "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43", 174_383_860, 512,
    "git-lfs pointer thebiglaskowski/faceoff buffalo_l/w600k_r50.onnx; Visionatrix/Visionatrix "
    "visionatrix/basic_node_list.py (buffalo_l.zip); the same file is buffalo_m's recognizer")
GLINTR100 = KnownRecognizer(
    "antelopev2 glintr100", "antelopev2", "glintr100.onnx",
    "4ab1d6435d639628a6f3e5008dd4f929edf4c4124b1a7169e1048f9fef534cdf", 260_665_334, 512,
    "git-lfs pointer ZHO-ZHO-ZHO/ComfyUI-InstantID models/antelopev2/glintr100.onnx; Visionatrix/Visionatrix "
    "visionatrix/basic_node_list.py (antelopev2.zip); Hugging Face rupeshs/antelopev2 blob name")
W600K_MBF = KnownRecognizer(
    "buffalo_s w600k_mbf", "buffalo_s / buffalo_sc", "w600k_mbf.onnx",
    "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f", 13_616_099, 512,
    "three public download checks agree (MobileFaceNet: a third embedding space)")
KNOWN_RECOGNIZERS = (W600K_R50, GLINTR100, W600K_MBF)
_BY_SHA256_16 = {r.sha256_16: r for r in KNOWN_RECOGNIZERS}

# The recognizer each identity adapter kind was trained on. FaceID, Plus, Plus v2 and Portrait (and
# the SDXL unnorm Portrait): buffalo_l, per the h94/IP-Adapter-FaceID model card's demos
# (FaceAnalysis(name="buffalo_l")) and insightface's default pack (DEFAULT_MP_NAME). "pulid-flux"
# is PuLID-FLUX's, for the FLUX adapters (PuLID's pipeline loads antelopev2).
TRAINED_WITH: dict[str, KnownRecognizer] = {
    "faceid": W600K_R50,
    "faceid-plus": W600K_R50,
    "faceid-plus-v2": W600K_R50,
    "faceid-portrait": W600K_R50,
    "faceid-portrait-unnorm": W600K_R50,
    "pulid-flux": GLINTR100,
}

_HEX16 = re.compile(r"[0-9a-f]{16}")
_warned: set[tuple[str, str, str]] = set()
_warned_lock = threading.Lock()


def identify(recognizer: RecognizerIdentity) -> KnownRecognizer | None:
    """The known recognizer with this ONNX file's hash, or None (a custom or converted copy)."""
    return _BY_SHA256_16.get(str(recognizer.sha256_16).lower())


def trained_with(kind) -> KnownRecognizer | None:
    """The recognizer adapter kind `kind` (an AdapterKind or its value) was trained with; None: no face."""
    return TRAINED_WITH.get(getattr(kind, "value", kind))


def _warn_once(key: tuple[str, str, str], message: str, *args) -> None:
    # Once per recognizer and expected one for the process: Apply runs per graph execution, and a
    # warning repeated at every run would bury the rest of the log.
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(message, *args)


def check_recognizer(kind, recognizer: RecognizerIdentity, adapter_name: str, what: str = "The identity") -> str | None:
    """Why an identity made by `recognizer` must not drive an adapter of `kind`, or None when it may.

    A known recognizer other than the one the kind was trained with: the refusal message. An unknown
    hash (a custom pack, a converted copy) or none recorded: a warning, logged once per recognizer,
    and None. Widths are checked by the caller."""
    expected = trained_with(kind)
    if expected is None:
        return None
    sha = str(recognizer.sha256_16 or "").lower()
    if not _HEX16.fullmatch(sha):
        _warn_once(("no-hash", recognizer.file_name, expected.sha256_16),
                   "%s records no hash of its face recognizer (%s), so FaceStudio cannot check that it is %s, which "
                   "%s was trained with. If it was made with another recognizer the likeness will be wrong: encode "
                   "the photos again with the %s pack to be sure.",
                   what, recognizer.file_name, expected.name, adapter_name, expected.pack)
        return None
    found = _BY_SHA256_16.get(sha)
    if found is None:
        _warn_once(("unknown", sha, expected.sha256_16),
                   "The face recognizer %s is not one FaceStudio knows, so it cannot check that its embeddings are "
                   "those %s was trained with (%s, sha256 %s...). A converted copy of %s works; any other "
                   "recognizer gives a different person: use the %s pack if the likeness is off.",
                   recognizer, adapter_name, expected.name, expected.sha256_16, expected.file_name, expected.pack)
        return None
    if found is expected:
        return None
    return (f"{what} was made with {found.name} ({recognizer}), but {adapter_name} was trained on {expected.name} "
            f"embeddings (sha256 {expected.sha256_16}...): the two recognizers are both {found.embedding_dim} wide but "
            f"unrelated, so this would give a different person. Load the {expected.pack} pack in FaceStudio Load Face "
            f"Analyzer and encode the identity again (models/insightface/models/{expected.pack}/ with "
            f"{expected.file_name}).")


def check_recorded_recognizer(recorded: RecognizerIdentity, recognizer: RecognizerIdentity, adapter_name: str,
                              what: str = "The identity") -> str | None:
    """Why an identity made by `recognizer` must not drive an adapter that records (in its file) the
    recognizer it was trained with, or None when it may: FaceStudio's trained adapters name theirs
    exactly, so any other hash is refused, known or not. An identity recording no hash is let through
    with a warning, as check_recognizer does."""
    sha, expected = str(recognizer.sha256_16 or "").lower(), str(recorded.sha256_16).lower()
    if not _HEX16.fullmatch(sha):
        _warn_once(("no-hash", recognizer.file_name, expected),
                   "%s records no hash of its face recognizer (%s), so FaceStudio cannot check that it is %s, which "
                   "%s was trained with.", what, recognizer.file_name, recorded, adapter_name)
        return None
    if sha == expected:
        return None
    known = identify(recorded)
    pack = f"the {known.pack} pack" if known else f"the pack holding {recorded.file_name} (sha256 {recorded.sha256_16}...)"
    return (f"{what} was made with {recognizer}, but {adapter_name} was trained on embeddings of {recorded}: "
            f"another recognizer's embeddings describe another person to it. Load {pack} in FaceStudio Load Face "
            "Analyzer and encode the identity again.")
