"""PuLID-FLUX's identity: photos -> ArcFace (raw) + EVA-CLIP features -> IDFormer -> 32 ID tokens.

What the reference does (pulid/pipeline_flux.py get_id_embedding), per photo:
- insightface (antelopev2) on the photo, the largest face: its RAW embedding (`face_info['embedding']`,
  not the normed one), 512 wide;
- facexlib's centre face aligned, parsed and greyed at 336 px (encoders/face_parsing.py) through
  EVA02-CLIP-L-14-336 (encoders/eva_clip.py): the normed CLS [1, 768] and five hidden states;
- IDFormer([arcface || eva_cls], hidden) (attention/idformer.py) -> [1, 32, 2048].
The negative side is the IDFormer on all-zero inputs (unconditional_id_tokens), computed once per load.
Several photos of one person: their ID tokens are averaged (the reference takes one photo; the
PuLID-FLUX ComfyUI ports average theirs the same way).

The loaded models travel as one PuLIDFlux value (FaceStudio Load PuLID-FLUX's output); the
identity as a PuLIDFluxIdentity (Encode Identity PuLID-FLUX's output). No host imports: the host's
model management of the encoders is encoders/pulid_flux_host.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..attention.idformer import IDFormer, idformer_from_state_dict, unconditional_id_tokens
from ..attention.pulid_flux_adapter import PuLIDFluxWeights, load_pulid_flux
from .eva_clip import EvaClipVision, load_eva_clip
from .face_parsing import FaceParser, face_features_image, load_face_parser
from .faces import FaceAnalyzer, FaceError, RecognizerIdentity, detect_and_embed, to_rgb_uint8
from .recognizers import check_recognizer

__all__ = ["PuLIDFlux", "PuLIDFluxNetworks", "PuLIDFluxIdentity", "PuLIDFluxIdentityError", "load_pulid_flux_models",
           "encode_pulid_flux_identity", "ARCFACE_WIDTH", "RECOGNIZER_KIND"]

ARCFACE_WIDTH = 512  # antelopev2's glintr100
RECOGNIZER_KIND = "pulid-flux"  # encoders/recognizers.py TRAINED_WITH key: antelopev2's glintr100


class PuLIDFluxIdentityError(FaceError):
    """A photo, face analyzer or model that cannot make a PuLID-FLUX identity; the message says why."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


@dataclass(frozen=True, eq=False)
class PuLIDFlux:
    """A PuLID-FLUX file with everything its identity needs, loaded: the CA weights (for Apply), the
    IDFormer, the EVA-CLIP tower, facexlib's detector + parser, and the unconditional ID tokens."""

    weights: PuLIDFluxWeights
    idformer: IDFormer
    eva: EvaClipVision
    face_parser: FaceParser
    uncond_tokens: torch.Tensor  # [1, 32, id width], fp32, on the CPU
    networks: "PuLIDFluxNetworks"  # the four networks above as one module (what the host manages)
    patcher: object | None = None  # the host's ModelPatcher of `networks` (encoders/pulid_flux_host.py)

    @property
    def source(self) -> str:
        return self.weights.source


class PuLIDFluxNetworks(torch.nn.Module):
    """The IDFormer, the EVA-CLIP tower and facexlib's two networks under one root, the same module
    objects: moving this module (as the host's ModelPatcher does) moves every network the identity uses."""

    def __init__(self, idformer: IDFormer, eva: EvaClipVision, face_parser: FaceParser):
        super().__init__()
        self.idformer, self.eva = idformer, eva.model
        self.detector, self.parser = face_parser.detector, face_parser.parser


@dataclass(frozen=True, eq=False)
class PuLIDFluxIdentity:
    """One person's PuLID-FLUX ID tokens (fp32, CPU) and where they came from."""

    id_tokens: torch.Tensor  # [1, 32, id width]
    uncond_tokens: torch.Tensor  # [1, 32, id width]: the negative side (true CFG)
    source: str  # the PuLID-FLUX file whose IDFormer made them
    recognizer: RecognizerIdentity
    shots: int  # photos used

    def report(self) -> str:
        return (f"{self.shots} photo(s) encoded with {self.source}'s IDFormer, ArcFace from {self.recognizer}: "
                f"ID tokens {list(self.id_tokens.shape)}.")


def load_pulid_flux_models(pulid_path: str | Path, eva_path: str | Path, detector_path: str | Path,
                           parser_path: str | Path, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> PuLIDFlux:
    """Load and check every file (the PuLID file first: it is the one most often wrong, and the quickest).
    `dtype` is the IDFormer's and EVA-CLIP's; facexlib's networks stay fp32, as facexlib runs them."""
    weights = load_pulid_flux(str(pulid_path))
    idformer = idformer_from_state_dict(weights.encoder, weights.source, device=device, dtype=dtype)
    if idformer.output_dim != weights.layout.id_dim:
        raise PuLIDFluxIdentityError(f"{weights.source}: its IDFormer makes {idformer.output_dim}-wide ID tokens but "
                                     f"its cross-attention reads {weights.layout.id_dim}: the file is not whole. "
                                     "Download pulid_flux_v0.9.1.safetensors again.")
    face_parser = load_face_parser(detector_path, parser_path, device=device)
    eva = load_eva_clip(eva_path, device=device, dtype=dtype)
    uncond = unconditional_id_tokens(idformer).float().cpu()
    return PuLIDFlux(weights, idformer, eva, face_parser, uncond, PuLIDFluxNetworks(idformer, eva, face_parser))


def _arcface(analyzer: FaceAnalyzer, photo, index: int, source: str) -> tuple[np.ndarray, RecognizerIdentity]:
    if analyzer.embedding_dim != ARCFACE_WIDTH:
        raise PuLIDFluxIdentityError(
            f"The face analyzer's recognizer ({analyzer.recognizer_id}) makes {analyzer.embedding_dim}-wide "
            f"embeddings, but {source} reads antelopev2's {ARCFACE_WIDTH}-wide ArcFace (glintr100): load the "
            "antelopev2 pack in FaceStudio Load Face Analyzer.")
    problem = check_recognizer(RECOGNIZER_KIND, analyzer.recognizer_id, source, "The face analyzer")
    if problem is not None:
        raise PuLIDFluxIdentityError(problem)
    face = detect_and_embed(analyzer, photo, image_index=index, select="largest")[0]
    return face.embedding, face.recognizer  # raw, as the reference's face_info['embedding']


@torch.no_grad()
def encode_pulid_flux_identity(models: PuLIDFlux, analyzer: FaceAnalyzer, photos: Sequence,
                               progress: Callable[[int, int], None] | None = None) -> PuLIDFluxIdentity:
    """One person's ID tokens from `photos` (ComfyUI IMAGE rows [H, W, 3] in 0..1, or RGB uint8), averaged
    over the photos. Raises FaceNotFound naming the photo when a detector finds no face."""
    if not len(photos):
        raise PuLIDFluxIdentityError("No photo given: connect at least one image.")
    if not isinstance(models, PuLIDFlux):
        raise PuLIDFluxIdentityError(f"Expected the output of FaceStudio Load PuLID-FLUX, got {type(models).__name__}.")
    param = models.idformer.latents
    tokens, recognizer = [], None
    for i, photo in enumerate(photos):
        rgb = to_rgb_uint8(photo)
        embedding, recognizer = _arcface(analyzer, rgb, i, models.source)
        parsed = face_features_image(models.face_parser, rgb, image_index=i)
        eva_cls, hidden = models.eva.encode(parsed.image.to(models.eva.device))
        arcface = torch.from_numpy(np.array(embedding, np.float32))[None].to(param.device, param.dtype)
        tokens.append(models.idformer(arcface, eva_cls.to(param.device, param.dtype),
                                      [h.to(param.device, param.dtype) for h in hidden]).float().cpu())
        if progress is not None:
            progress(i + 1, len(photos))
    id_tokens = torch.stack(tokens).mean(0)
    return PuLIDFluxIdentity(id_tokens, models.uncond_tokens, models.source, recognizer, len(tokens))
