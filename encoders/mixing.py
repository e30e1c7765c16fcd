"""Identity mixing: a weighted blend of identities, as one `FaceIdentity`, whose weights act on every
adapter kind (the combined embedding, the Portrait rows and the CLIP features alike).

Host-free (numpy).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .identity import CANCEL_NORM, DroppedShot, FaceIdentity, IdentityError, readonly


def mix_identities(parts: Sequence[tuple[FaceIdentity, float]]) -> FaceIdentity:
    """The weighted sum of the identities' combined embeddings, renormalized.

    Parts with weight 0 are left out; with one part left, its identity comes back unchanged (so
    weights 1/0 give the first identity's embedding exactly). The shots of the mixed identities
    (weight != 0) are kept, in order (the report, scoring). Adapters that take shots as tokens
    (Portrait) read `shot_rows`: as many rows as the largest mixed identity has, row k the weighted
    sum of each identity's row k (cycling through a smaller one's), so the weights act there too and
    not the shot counts (see _mixed_rows). CLIP features (when
    every mixed identity has them) mix with the same weights: sum(w * combined) / sum(w). Raises
    IdentityError when the recognizers differ, the mix cancels out, or only some mixed identities
    have CLIP features, or theirs differ in shape.
    """
    parts = [(identity, float(weight)) for identity, weight in parts if identity is not None]
    if not parts:
        raise IdentityError("nothing to mix: give at least one identity")
    for identity, weight in parts:
        if not math.isfinite(weight):
            raise IdentityError(f"mix weight {weight} is not a finite number")
    first = parts[0][0].recognizer
    for identity, _ in parts[1:]:
        if identity.recognizer != first:
            raise IdentityError(f"cannot mix identities from different face recognizers: {first} and "
                                f"{identity.recognizer}. Encode every photo with the same face analyzer.")
    active = [(identity, weight) for identity, weight in parts if weight != 0.0]
    if not active:
        raise IdentityError("every mix weight is 0: give at least one identity a weight")
    if len(active) == 1 and active[0][1] > 0:
        return active[0][0]
    total = np.zeros(first.embedding_dim, np.float64)
    for identity, weight in active:
        total += weight * identity.embedding.astype(np.float64)
    norm = float(np.linalg.norm(total))
    if norm < CANCEL_NORM:
        raise IdentityError(f"the mix cancels out (its embedding has norm {norm:.2e}): the weighted identities "
                            "point in opposite directions. Change the weights.")
    identities = [identity for identity, _ in active]

    def cat(name):
        return np.concatenate([getattr(i, name) for i in identities])

    used, offset = [], 0
    for identity in identities:
        used += [offset + u for u in identity.used]
        offset += identity.photo_count
    dropped, offset = [], 0
    for identity in identities:
        dropped += [DroppedShot(offset + d.image_index, d.reason) for d in identity.dropped]
        offset += identity.photo_count
    clip = combined_clip = clip_width = unconditional_clip = None
    with_clip = [i.clip_features is not None for i in identities]
    if any(with_clip) and not all(with_clip):
        raise IdentityError(f"cannot mix identities with and without CLIP vision features ({sum(with_clip)} of the "
                            f"{len(identities)} identities with a nonzero weight have them): encode them all with, "
                            "or all without, a CLIP vision model")
    if all(with_clip):
        shapes = {tuple(i.clip_features.shape[1:]) for i in identities}
        if len(shapes) != 1:
            raise IdentityError("cannot mix identities whose CLIP vision features differ in shape "
                                f"({', '.join(f'{t} tokens x width {w}' for t, w in sorted(shapes))}): encode them "
                                "with the same CLIP vision model")
        unconditional_clip = identities[0].unconditional_clip_features
        if any(not np.array_equal(i.unconditional_clip_features, unconditional_clip) for i in identities[1:]):
            raise IdentityError("cannot mix identities encoded with different CLIP vision models: encode them all "
                                "with the same one")
        weight_sum = sum(w for _, w in active)
        if abs(weight_sum) < CANCEL_NORM:
            raise IdentityError("the mix weights sum to 0, so the CLIP vision features cannot be averaged. "
                                "Change the weights.")
        mixed = sum(w * i.combined_clip_features.astype(np.float64) for i, w in active) / weight_sum
        clip, combined_clip, clip_width = cat("clip_features"), mixed.astype(np.float32), identities[0].clip_width
    mixed_raw, mixed_normed = _mixed_rows(active)
    crops = [i.crops for i in identities]
    if len({c.shape[1:] for c in crops}) != 1:
        raise IdentityError("cannot mix identities whose face crops differ in size")
    return FaceIdentity(
        embeddings=cat("embeddings"),
        normed_embeddings=cat("normed_embeddings"),
        embedding=(total / norm).astype(np.float32),
        recognizer=first,
        crops=np.concatenate(crops),
        det_scores=cat("det_scores"),
        bboxes=cat("bboxes"),
        kps=cat("kps"),
        used=tuple(used),
        dropped=tuple(dropped),
        photo_count=offset,
        clip_features=clip,
        clip_width=clip_width,
        combined_clip_features=combined_clip,
        unconditional_clip_features=unconditional_clip,
        mixed_embeddings=mixed_raw,
        mixed_normed_embeddings=mixed_normed,
    )


def _mixed_rows(active: Sequence[tuple[FaceIdentity, float]]) -> tuple[np.ndarray, np.ndarray]:
    """A mix's Portrait rows (raw, unit): row k = unit(sum_i w_i u_i[k mod n_i]) over the identities'
    unit rows u_i, as the combined embedding mixes; the raw row is that direction at the rows' mean
    norm weighted by |w_i| (Portrait unnorm reads the magnitude). Concatenating the shots instead would
    mix by shot count: 0.3 / 0.7 of a 3-shot and a 2-shot person gave 3/5 and 2/5 of the tokens."""
    parts = [(i.shot_rows(True).astype(np.float64), np.linalg.norm(i.shot_rows(False), axis=1), w) for i, w in active]
    weight_sum = sum(abs(w) for _, w in active)
    raw_rows, unit_rows = [], []
    for k in range(max(len(units) for units, _, _ in parts)):
        direction = sum(w * units[k % len(units)] for units, _, w in parts)
        norm = float(np.linalg.norm(direction))
        if norm < CANCEL_NORM:
            raise IdentityError(f"the mix cancels out in its shot {k} (norm {norm:.2e}): the weighted identities "
                                "point in opposite directions. Change the weights.")
        unit = direction / norm
        scale = sum(abs(w) * float(norms[k % len(norms)]) for _, norms, w in parts)
        unit_rows.append(unit)
        raw_rows.append(unit * scale / weight_sum)
    return readonly(raw_rows, np.float32), readonly(unit_rows, np.float32)
