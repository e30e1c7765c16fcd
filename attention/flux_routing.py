"""PuLID-FLUX's identity cross-attention, routed for several persons: pure torch, no host imports.

PuLID-FLUX adds, after some of FLUX's blocks, to the image tokens x:

    x + id_weight * CA(id, x),   CA(id, x) = to_out(softmax(q K^T / sqrt(d)) V)
    q = to_q(LN2(x)),  K, V = to_kv(LN1(id))      (PerceiverAttentionCA: one softmax over the 32 ID tokens)

For persons i with regions m_i and weights w_i this gives x + sum_i w_hat_i(x) * CA(id_i, x), with the
overlap normalisation of Eq. 2 (routing.py): w_hat_i = w_i m_i / max(1, sum_j m_j). to_out has no bias,
so the sum goes inside it: x + to_out(R(x)) with R = routing.route_persons over every person's K/V at
once. A block therefore costs one LN, one to_q, one routed product and one to_out whatever the number
of persons; the reference layout (one CA call per person) repeats all four per person.

K/V depend only on the ID tokens, so they are made once per Apply (`ca_kv`); the patch
(attention/flux_patch.py) keeps them and the per-call weights (`CallWeights`) in a host-managed model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .routing import TokenGroups, combine_regions, route_persons

__all__ = ["CallWeights", "ca_kv", "routed_ca", "person_activity", "active_regions", "LAYER_NORM_EPS"]

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which PerceiverAttentionCA's norm1/norm2 use


@dataclass(frozen=True, eq=False)
class CallWeights:
    """What one CA module applies at every call (its norm1 and to_kv act on ID tokens only, once per Apply).

    norm_weight, norm_bias: norm2 [dim]; to_q [inner, dim]; to_out [dim, inner]; heads of inner / heads width."""

    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    to_q: torch.Tensor
    to_out: torch.Tensor
    heads: int


def ca_kv(norm_weight: torch.Tensor, norm_bias: torch.Tensor, to_kv: torch.Tensor,
          id_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) [B, T, inner] fp32 of one CA module over ID tokens [B, T, kv_dim]: norm1 then to_kv, split in half
    (the order PerceiverAttentionCA's `to_kv(x).chunk(2, -1)` gives)."""
    x = F.layer_norm(id_tokens.float(), (id_tokens.shape[-1],), norm_weight.float(), norm_bias.float(),
                     LAYER_NORM_EPS)
    k, v = F.linear(x, to_kv.float()).chunk(2, dim=-1)
    return k.contiguous(), v.contiguous()


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.device == like.device and t.dtype == like.dtype else t.to(like.device, like.dtype)


def routed_ca(x: torch.Tensor, weights: CallWeights, groups: Sequence[TokenGroups],
              regions: torch.Tensor | None, precision: torch.dtype = torch.float32) -> torch.Tensor:
    """sum_i w_hat_i(x) * CA(id_i, x), [B, N, dim] in x's dtype, for image tokens x [B, N, dim].

    groups: one TokenGroups per CFG chunk of the rows (the host's cond_or_uncond order: cond or uncond
    K/V), each of B / len(groups) rows. regions: w_hat [1 or B/len(groups), 1 or N, P], shared by the
    chunks, or None (every person on the whole image at its weight). LN, to_q and to_out run once for
    all rows; only the routed product is per chunk (at most 2 under CFG), never per person.
    The weights run in x's dtype (as the reference runs its modules in the weight dtype); scores,
    softmax and the V product in `precision`.
    """
    n = len(groups)
    if n == 0 or x.shape[0] % n:
        raise ValueError(f"batch {x.shape[0]} cannot be split into {n} equal CFG chunks")
    h = F.layer_norm(x, (x.shape[-1],), _cast(weights.norm_weight, x), _cast(weights.norm_bias, x), LAYER_NORM_EPS)
    q = F.linear(h, _cast(weights.to_q, x))
    if n == 1:
        r = route_persons(q, groups[0], regions, precision=precision)
    else:
        r = torch.cat([route_persons(qc, g, regions, precision=precision) for qc, g in zip(q.chunk(n), groups)])
    return F.linear(r, _cast(weights.to_out, x))


def person_activity(sigmas: torch.Tensor | None, bounds: torch.Tensor, batch: int) -> torch.Tensor | None:
    """[S, 1, P] 1/0: person p acts in latent row s while bounds[p, 0] <= sigma_s <= bounds[p, 1] (its sigma
    end and start); S = 1 when every row has the same sigma. None when every person acts in every row.

    On a GPU the decision stays on the device (reading the sigmas back would stall it at every block)."""
    if sigmas is None:
        return None
    s = sigmas.detach().reshape(-1)
    if s.shape[0] > batch and s.shape[0] % batch == 0:
        s = s[:batch]  # the CFG chunks repeat the latents' sigmas
    if s.shape[0] not in (1, batch):
        raise ValueError(f"{s.shape[0]} sigmas for a latent batch of {batch}")
    b = bounds.to(s.device, torch.float64 if s.device.type == "cpu" else s.dtype)
    s = s.to(b.dtype)
    active = (b[:, 0] <= s[:, None]) & (s[:, None] <= b[:, 1])  # [S, P]
    if s.device.type == "cpu":
        if bool(active.all()):
            return None
        if bool((active == active[:1]).all()):
            active = active[:1]
    return active.float()[:, None, :]


def active_regions(stacked: torch.Tensor, weights: torch.Tensor, activity: torch.Tensor | None) -> torch.Tensor:
    """w_hat from the stacked token masks [Bm, N or 1, P] and the weights [P], leaving out persons not acting
    (they do not count in the others' overlap normalisation either)."""
    return combine_regions(stacked, weights, None if activity is None else activity.to(stacked.device))
