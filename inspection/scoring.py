"""Identity scoring: how much each face in generated images looks like each reference identity.

Host-free (numpy, scipy, encoders/faces.py). For every image of a batch, the faces are detected
and embedded (numbered left to right from 0, as FaceStudio Encode Identity numbers them), their
cosine similarity to every reference identity's combined embedding makes a faces x identities
matrix, and faces are paired with identities by the assignment that maximizes the summed
similarity (the Hungarian method, `scipy.optimize.linear_sum_assignment`). A greedy pairing (best
pair first) can give a face to the wrong person whenever one face resembles two identities: see
`optimal_assignment`.

What comes out (`ScoreResult`): per image the matrix, the pairs, the faces left without an
identity (more faces than identities) and the identities left without a face (fewer faces, or
none); per identity over the batch the mean and minimum similarity where it was found, where it
was missing, and its leakage (the highest similarity of its face to another identity: a face
that looks like two people). `report()` is the text for people, `to_json()` the same for
automation. Missing faces are results, never exceptions; identities made with another recognizer
than the analyzer's are refused (`ScoringError`): their cosines would mean nothing.

DEFAULT_THRESHOLD (0.4) only labels a pair as "below threshold: probably not this person"; it
never changes the pairing. It is the value the identity module uses to drop outlier shots, from
the same measurements with the trained SFace recognizer: the same person ~0.9, different people
below 0.36 (OpenCV's own SFace match threshold is 0.363). Other recognizers spread cosines
differently: the node lets the user set it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..encoders.faces import (
    DetectedFace,
    FaceAnalyzer,
    FaceError,
    FaceNotFound,
    RecognizerIdentity,
    detect_and_embed,
    images_list,
    to_bgr_uint8,
)

SCORE_FORMAT = "facestudio-identity-score"
SCORE_VERSION = 1
DEFAULT_THRESHOLD = 0.4

# ImageScore.status values
OK = "ok"
NO_FACE = "no_face"
MORE_FACES = "more_faces_than_identities"
FEWER_FACES = "fewer_faces_than_identities"


class ScoringError(FaceError):
    """Identities and faces that cannot be compared; the message says which and what to do."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


@dataclass(frozen=True, eq=False)
class Reference:
    """A reference identity under the name the user knows it by (the node's socket name)."""

    name: str
    embedding: np.ndarray  # (D,) float32, unit length
    recognizer: RecognizerIdentity


def make_references(named: Sequence[tuple[str, object]], recognizer: RecognizerIdentity) -> tuple[Reference, ...]:
    """References from (name, FaceIdentity) pairs; every identity must come from `recognizer`.

    Raises ScoringError naming the identity, both recognizers and the fix when one was made with
    another recognizer (another model pack, or another file of the same name).
    """
    if not named:
        raise ScoringError("no reference identity given: connect at least one identity (from FaceStudio Encode "
                           "Identity or Load Identity)")
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ScoringError(f"reference names must differ, got {', '.join(names)}")
    references = []
    for name, identity in named:
        theirs = getattr(identity, "recognizer", None)
        embedding = getattr(identity, "embedding", None)
        if not isinstance(theirs, RecognizerIdentity) or embedding is None:
            raise ScoringError(f"{name} is not a FaceStudio identity (got {type(identity).__name__})")
        if theirs != recognizer:
            raise ScoringError(
                f"{name} was encoded with the face recognizer {theirs}, but the face analyzer uses {recognizer}. "
                "Embeddings of different recognizers cannot be compared. Encode the photos of "
                f"{name} with this face analyzer, or score with the analyzer (model pack) {name} was made with."
            )
        vector = np.asarray(embedding, np.float64).reshape(-1)
        norm = float(np.linalg.norm(vector))
        if vector.shape[0] != recognizer.embedding_dim or not math.isfinite(norm) or norm == 0.0:
            raise ScoringError(f"{name} has an unusable embedding (shape {vector.shape}, norm {norm}): the identity "
                               "is damaged; encode it again")
        references.append(Reference(name, (vector / norm).astype(np.float32), theirs))
    return tuple(references)


# ------------------------------------------------------------------------------------------------
# Similarity and matching
# ------------------------------------------------------------------------------------------------
def similarity_matrix(face_embeddings, reference_embeddings) -> np.ndarray:
    """Cosine similarities, faces x references, float64. Either side may be empty."""
    faces = np.asarray(face_embeddings, np.float64)
    refs = np.asarray(reference_embeddings, np.float64)
    if faces.ndim != 2 or refs.ndim != 2:
        raise ScoringError(f"expected 2-D embedding arrays, got shapes {faces.shape} and {refs.shape}")
    if len(faces) and len(refs) and faces.shape[1] != refs.shape[1]:
        raise ScoringError(f"face embeddings are {faces.shape[1]}-d but the identities are {refs.shape[1]}-d: "
                           "they come from different recognizers")
    if not len(faces) or not len(refs):
        return np.zeros((len(faces), len(refs)), np.float64)
    faces = faces / np.linalg.norm(faces, axis=1, keepdims=True)
    refs = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    return np.clip(faces @ refs.T, -1.0, 1.0)


def optimal_assignment(similarity) -> list[tuple[int, int]]:
    """(face, reference) pairs maximizing the summed similarity, one face per reference and one
    reference per face, min(faces, references) pairs, sorted by reference.

    Not greedy: with faces A, B and identities X, Y at A-X 0.9, A-Y 0.8, B-X 0.85, B-Y 0.1, taking
    the best pair first gives A-X + B-Y (1.0), where A-Y + B-X (1.65) is what the faces show.
    """
    matrix = np.asarray(similarity, np.float64)
    if matrix.ndim != 2:
        raise ScoringError(f"expected a faces x identities matrix, got shape {matrix.shape}")
    if 0 in matrix.shape:
        return []
    if not np.isfinite(matrix).all():
        raise ScoringError("the similarity matrix holds NaN or infinite values")
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return sorted(((int(r), int(c)) for r, c in zip(rows, cols)), key=lambda pair: pair[1])


# ------------------------------------------------------------------------------------------------
# One image
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ScoredFace:
    index: int  # left to right from 0, as Encode Identity's `index`
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in the image's pixels
    kps: tuple[tuple[float, float], ...]  # five landmarks
    det_score: float


@dataclass(frozen=True, eq=False)
class Match:
    face: int
    reference: int
    similarity: float
    closest_other: int | None  # the other reference this face resembles most (leakage), or None
    closest_other_similarity: float | None


@dataclass(frozen=True, eq=False)
class ImageScore:
    image_index: int
    width: int
    height: int
    faces: tuple[ScoredFace, ...]
    similarity: np.ndarray  # (faces, references) float64
    matches: tuple[Match, ...]  # sorted by reference
    unmatched_faces: tuple[int, ...]
    unmatched_references: tuple[int, ...]

    @property
    def status(self) -> str:
        faces, refs = self.similarity.shape
        if faces == 0:
            return NO_FACE
        if faces > refs:
            return MORE_FACES
        if faces < refs:
            return FEWER_FACES
        return OK

    def match_for(self, reference: int) -> Match | None:
        return next((m for m in self.matches if m.reference == reference), None)

    def per_reference(self) -> list[float | None]:
        """Each reference's similarity to its matched face, None where it was not found."""
        count = self.similarity.shape[1]
        return [None if (m := self.match_for(r)) is None else m.similarity for r in range(count)]

    def matched_matrix(self) -> np.ndarray:
        """(references, references): row r is the similarity of the face matched to reference r to
        every reference (diagonal: its own; off-diagonal: leakage). NaN rows where r was not found."""
        count = self.similarity.shape[1]
        out = np.full((count, count), np.nan)
        for match in self.matches:
            out[match.reference] = self.similarity[match.face]
        return out


def score_faces(image_index: int, width: int, height: int, faces: Sequence[DetectedFace],
                references: Sequence[Reference]) -> ImageScore:
    """Score one image's faces (in the order given) against the references."""
    for face in faces:
        if references and face.recognizer != references[0].recognizer:
            raise ScoringError(f"a face of image {image_index} was embedded with {face.recognizer}, the identities "
                               f"with {references[0].recognizer}")
    dim = references[0].embedding.shape[0] if references else 0
    embeddings = np.stack([f.normed_embedding for f in faces]) if faces else np.zeros((0, dim), np.float32)
    refs = np.stack([r.embedding for r in references]) if references else np.zeros((0, dim), np.float32)
    matrix = similarity_matrix(embeddings, refs)
    matches = []
    for face, ref in optimal_assignment(matrix):
        others = [r for r in range(matrix.shape[1]) if r != ref]
        other = max(others, key=lambda r: matrix[face, r]) if others else None
        matches.append(Match(face, ref, float(matrix[face, ref]), other,
                             None if other is None else float(matrix[face, other])))
    matched_faces = {m.face for m in matches}
    matched_refs = {m.reference for m in matches}
    scored = tuple(
        ScoredFace(i, tuple(float(v) for v in f.bbox[:4]), tuple((float(x), float(y)) for x, y in f.kps),
                   float(f.det_score))
        for i, f in enumerate(faces)
    )
    return ImageScore(
        image_index=image_index,
        width=int(width),
        height=int(height),
        faces=scored,
        similarity=matrix,
        matches=tuple(matches),
        unmatched_faces=tuple(i for i in range(len(faces)) if i not in matched_faces),
        unmatched_references=tuple(r for r in range(len(references)) if r not in matched_refs),
    )


# ------------------------------------------------------------------------------------------------
# A batch
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ReferenceSummary:
    name: str
    similarities: tuple[float | None, ...]  # per image; None where not found
    below_threshold_in: tuple[int, ...]  # images where it was matched below the threshold
    max_leakage: float | None  # the highest similarity of its matched faces to another identity
    max_leakage_to: str | None

    @property
    def found_in(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.similarities) if s is not None)

    @property
    def missing_in(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.similarities) if s is None)

    @property
    def mean(self) -> float | None:
        found = [s for s in self.similarities if s is not None]
        return float(np.mean(found)) if found else None

    @property
    def min(self) -> float | None:
        found = [s for s in self.similarities if s is not None]
        return float(min(found)) if found else None


@dataclass(frozen=True, eq=False)
class ScoreResult:
    references: tuple[Reference, ...]
    images: tuple[ImageScore, ...]
    threshold: float
    recognizer: RecognizerIdentity

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.references]

    def summary(self) -> tuple[ReferenceSummary, ...]:
        out = []
        for r, ref in enumerate(self.references):
            sims, below, leak, leak_to = [], [], None, None
            for image in self.images:
                match = image.match_for(r)
                sims.append(None if match is None else match.similarity)
                if match is None:
                    continue
                if match.similarity < self.threshold:
                    below.append(image.image_index)
                if match.closest_other is not None and (leak is None or match.closest_other_similarity > leak):
                    leak, leak_to = match.closest_other_similarity, self.references[match.closest_other].name
            out.append(ReferenceSummary(ref.name, tuple(sims), tuple(below), leak, leak_to))
        return tuple(out)

    # --- text ---------------------------------------------------------------------------------
    def _image_lines(self, image: ImageScore) -> list[str]:
        names = self.names
        faces, refs = image.similarity.shape
        head = f"Image {image.image_index} ({image.width}x{image.height}): "
        if image.status == NO_FACE:
            return [head + f"no face found; none of the {refs} identities can be scored in it."]
        lines = [head + f"{faces} face(s) for {refs} identit{'y' if refs == 1 else 'ies'}"
                 + {OK: ".", MORE_FACES: f": more faces than identities, {faces - refs} face(s) left unmatched.",
                    FEWER_FACES: f": fewer faces than identities, {refs - faces} identit"
                                 f"{'y' if refs - faces == 1 else 'ies'} not found."}[image.status]]
        for match in image.matches:
            line = f"  {names[match.reference]} -> face {match.face}: similarity {match.similarity:.3f}"
            if match.closest_other is not None:
                line += f" (closest other identity: {names[match.closest_other]} {match.closest_other_similarity:.3f})"
            if match.similarity < self.threshold:
                line += f"  BELOW THRESHOLD {self.threshold:.2f}: probably not this person"
            lines.append(line)
        for face in image.unmatched_faces:
            best = int(np.argmax(image.similarity[face]))
            lines.append(f"  face {face}: matched to no identity (more faces than identities; closest: "
                         f"{names[best]} {image.similarity[face, best]:.3f})")
        for ref in image.unmatched_references:
            lines.append(f"  {names[ref]}: NOT FOUND (fewer faces than identities)")
        width = max(6, *(len(n) for n in names))
        lines.append("  similarity, faces (rows, left to right) x identities:")
        lines.append("    " + " " * 8 + " ".join(n.rjust(width) for n in names))
        for f in range(faces):
            cells = (f"{image.similarity[f, r]:.3f}".rjust(width) for r in range(refs))
            lines.append(f"    face {f:<3}" + " ".join(cells))
        return lines

    def report(self) -> str:
        count = len(self.images)
        lines = [f"Identity score of {count} image(s) against {len(self.references)} identit"
                 f"{'y' if len(self.references) == 1 else 'ies'} (recognizer {self.recognizer}); "
                 f"faces paired with identities by optimal assignment; threshold {self.threshold:.2f}."]
        for image in self.images:
            lines += self._image_lines(image)
        lines.append("Summary per identity (over the images it was found in):")
        for summary in self.summary():
            if summary.mean is None:
                lines.append(f"  {summary.name}: NOT FOUND in any of the {count} image(s)")
                continue
            line = (f"  {summary.name}: mean {summary.mean:.3f}, min {summary.min:.3f}, found in "
                    f"{len(summary.found_in)} of {count} image(s)")
            if summary.missing_in:
                line += f"; missing in image(s) {', '.join(map(str, summary.missing_in))}"
            if summary.below_threshold_in:
                line += f"; below threshold in image(s) {', '.join(map(str, summary.below_threshold_in))}"
            if summary.max_leakage is not None:
                line += f"; highest similarity to another identity {summary.max_leakage:.3f} ({summary.max_leakage_to})"
            lines.append(line)
        return "\n".join(lines)

    # --- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        names = self.names

        def number(value):
            return None if value is None or not math.isfinite(value) else round(float(value), 6)

        def matrix(array):
            return [[number(v) for v in row] for row in np.asarray(array, np.float64)]

        images = []
        for image in self.images:
            images.append({
                "image": image.image_index,
                "width": image.width,
                "height": image.height,
                "status": image.status,
                "face_count": len(image.faces),
                "faces": [{"face": f.index, "bbox": [number(v) for v in f.bbox],
                           "kps": [[number(x), number(y)] for x, y in f.kps], "det_score": number(f.det_score)}
                          for f in image.faces],
                "similarity": matrix(image.similarity),
                "matches": [{
                    "identity": names[m.reference],
                    "identity_index": m.reference,
                    "face": m.face,
                    "similarity": number(m.similarity),
                    "below_threshold": bool(m.similarity < self.threshold),
                    "closest_other_identity": None if m.closest_other is None else names[m.closest_other],
                    "closest_other_similarity": number(m.closest_other_similarity),
                } for m in image.matches],
                "per_identity": {names[r]: number(s) for r, s in enumerate(image.per_reference())},
                "matched_matrix": matrix(image.matched_matrix()),
                "unmatched_faces": list(image.unmatched_faces),
                "unmatched_identities": [names[r] for r in image.unmatched_references],
            })
        summary = {}
        for s in self.summary():
            summary[s.name] = {
                "mean": number(s.mean),
                "min": number(s.min),
                "similarities": [number(v) for v in s.similarities],
                "found_in": list(s.found_in),
                "missing_in": list(s.missing_in),
                "below_threshold_in": list(s.below_threshold_in),
                "max_leakage": number(s.max_leakage),
                "max_leakage_to": s.max_leakage_to,
            }
        return {
            "format": SCORE_FORMAT,
            "version": SCORE_VERSION,
            "recognizer": {"file": self.recognizer.file_name, "sha256_16": self.recognizer.sha256_16,
                           "embedding_dim": self.recognizer.embedding_dim},
            "threshold": self.threshold,
            "identities": names,
            "images": images,
            "summary": summary,
            "all_found": all(not s.missing_in for s in self.summary()),
            "all_above_threshold": all(not s.missing_in and not s.below_threshold_in for s in self.summary()),
        }

    def json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def score_images(
    analyzer: FaceAnalyzer,
    images,
    identities: Sequence[tuple[str, object]],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    progress: Callable[[int, int], None] | None = None,
) -> ScoreResult:
    """Detect and embed every face of every image (a [B, H, W, C] batch or a list) and score them
    against the named identities. Raises ScoringError before any detection when an identity comes
    from another recognizer than the analyzer's."""
    if not math.isfinite(threshold):
        raise ScoringError(f"threshold must be a number, not {threshold}")
    references = make_references(identities, analyzer.recognizer_id)
    photos = images_list(images)
    if not photos:
        raise ScoringError("no image to score: the image batch is empty")
    scored = []
    for index, photo in enumerate(photos):
        bgr = to_bgr_uint8(photo)
        try:
            # The RGB view of bgr: detect_and_embed converts it back without a second float pass.
            faces = detect_and_embed(analyzer, bgr[:, :, ::-1], image_index=index, select="left-to-right")
        except FaceNotFound:
            faces = ()  # a result ("no face"), not an error
        scored.append(score_faces(index, bgr.shape[1], bgr.shape[0], faces, references))
        if progress is not None:
            progress(index + 1, len(photos))
    return ScoreResult(references, tuple(scored), float(threshold), analyzer.recognizer_id)
