"""FaceStudio's multi-identity cross-attention (Eq. 2): the routing kernel, in pure torch.

Per cross-attention layer, with already projected queries q and text attention A_text:

    out(x) = F(x) + t_l(alpha) * A_text(x) + g(alpha) * s * A_style(x) + R(x)
    R(x)   = sum_i w_hat_i(x) * softmax(q K_i^T / sqrt(d)) V_i      (softmax over person i's tokens only)
    w_hat_i(x) = w_i * m_i(x) / max(1, sum_j m_j(x))
    t(alpha) = min(1, 2 (1 - alpha)),  g(alpha) = min(1, 2 alpha)
    t_l(alpha) = t(alpha) where a style acts at the layer (a style with a non-zero scale s), else 1

alpha is the text / style-image balance only: where no style acts (none connected, style_weight 0,
or a block the style is not applied to) the text is never scaled and alpha changes nothing at all.
F(x) is the contribution of a foreign attn2 replacement the patch wraps (another pack's IP-Adapter):
it is never scaled. Such a replacement returns A_text + F in one tensor, so `route` takes that output
as `wrapped` and adds it as is, plus (t_l - 1) * A_text with A_text the host's plain text attention,
which the patch computes separately only where t_l != 1 (a style acting and alpha > 0.5).

Masks weight each person's output after its own softmax, never the logits: a mask of 0 gives an
exact 0 contribution, so rows outside every region are exactly A_text (+ style).

Cost: every person's tokens and the style's sit in one concatenated K/V, each segment padded to a
common length, so a call is one K q^T product, one softmax over a [..., segments, length, Nq] view and
one product with V, whatever the number of persons. The region weights are folded into the
probabilities before the V product, which therefore also does the sum over persons. Scores are kept
token-major ([L, Nq], not [Nq, L]): a softmax over a tiny innermost axis (4 tokens) is ~30x slower on
CPU than over an outer axis with Nq contiguous.

No host imports here: the model patch (attention/patch.py) computes q, A_text and the per-layer
K_i/V_i with the layer's own projections and calls `route` / `route_chunks`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "TokenGroups",
    "route",
    "route_chunks",
    "route_persons",
    "text_gain",
    "layer_text_gain",
    "style_gain",
    "token_grid",
    "find_downscale",
    "masks_to_tokens",
    "combine_regions",
    "stack_masks",
]


def text_gain(alpha: float) -> float:
    """t(alpha) = min(1, 2(1 - alpha)): full text strength up to alpha = 0.5."""
    _check_alpha(alpha)
    return min(1.0, 2.0 * (1.0 - alpha))


def layer_text_gain(groups: "TokenGroups", alpha: float) -> float:
    """The text's gain at a layer: t(alpha) where a style acts there (`groups.style_acts`), else exactly 1."""
    t = text_gain(alpha)
    return t if groups.style_acts else 1.0


def style_gain(alpha: float) -> float:
    """g(alpha) = min(1, 2 alpha): full style strength from alpha = 0.5."""
    _check_alpha(alpha)
    return min(1.0, 2.0 * alpha)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


@dataclass(frozen=True, eq=False)
class TokenGroups:
    """One layer's identity (and style) tokens, laid out once for `route`.

    Build with `TokenGroups.build`; treat the tensors as read-only. Segments are the persons in
    order, then the style if any; each is zero-padded to `segment_length` tokens.

    keys:     [Bk, H, S*T, d] (`route` scales the scores by d**-0.5, so the keys are the layer's K exactly and
              `segment_kv` gives each segment's K/V back bit for bit: a chained Apply rebuilds from them)
    values:   [Bk, H, S*T, d]
    pad_bias: [S*T, 1] with 0 on real tokens and -inf on padding, or None when no segment is padded;
              added to the scores before the per-segment softmax, so padding only ever competes
              within its own segment.
    weights:  [P] the persons' weights w_i.
    Bk is 1 (shared by every row) or the batch of the rows this is used with.
    """

    keys: torch.Tensor
    values: torch.Tensor
    pad_bias: torch.Tensor | None
    weights: torch.Tensor
    lengths: tuple[int, ...]
    heads: int
    style_scale: float | None = None
    # Moved copies by (device, dtype): the sampler calls every step with the same q device/dtype.
    _moved: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        persons: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
        heads: int,
        style: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> "TokenGroups":
        """persons: (K_i, V_i, w_i) with K_i, V_i [1 or B, T_i, H*d], already projected by the layer's
        to_k_ip / to_v_ip. style: (K_s, V_s, s) of the same layout, applied everywhere (no mask)."""
        groups = [(k, v) for k, v, _ in persons] + ([style[:2]] if style is not None else [])
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if not groups:
            empty = torch.zeros(1, heads, 0, 1)
            return cls(empty, empty.clone(), None, torch.zeros(0), (), heads, None)
        inner = groups[0][0].shape[-1]
        if inner % heads:
            raise ValueError(f"token width {inner} is not divisible by {heads} heads")
        batches = set()
        for i, (k, v) in enumerate(groups):
            if k.ndim != 3 or k.shape != v.shape or k.shape[-1] != inner or k.shape[1] < 1:
                raise ValueError(
                    f"group {i}: K and V must both be [1 or B, T >= 1, {inner}], got {tuple(k.shape)} and {tuple(v.shape)}"
                )
            batches.add(k.shape[0])
        if len(batches - {1}) > 1:
            raise ValueError(f"groups have incompatible batch sizes {sorted(batches)} (each must be 1 or B)")
        bk = max(batches)
        lengths = tuple(k.shape[1] for k, _ in groups)
        seg = max(lengths)
        d = inner // heads
        dtype = torch.promote_types(groups[0][0].dtype, torch.float32)

        def stack(tensors):
            # [S, Bk, T, H*d] -> [Bk, H, S*T, d]: segment s occupies tokens s*T .. s*T + T-1.
            padded = [F.pad(t.to(dtype).expand(bk, -1, -1), (0, 0, 0, seg - t.shape[1])) for t in tensors]
            x = torch.stack(padded, 1).reshape(bk, len(tensors) * seg, heads, d)
            return x.permute(0, 2, 1, 3).contiguous()

        keys = stack([k for k, _ in groups])
        values = stack([v for _, v in groups])
        pad_bias = None
        if any(n < seg for n in lengths):
            real = torch.arange(seg) < torch.tensor(lengths).unsqueeze(1)  # [S, T]
            pad_bias = torch.zeros(real.shape, dtype=dtype).masked_fill_(~real, float("-inf")).view(-1, 1)
        weights = torch.tensor([float(w) for _, _, w in persons], dtype=torch.float32)
        return cls(keys, values, pad_bias, weights, lengths, heads, None if style is None else float(style[2]))

    def segment_kv(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) [Bk, T_s, H*d] of segment s (persons in order, then the style) exactly as given to `build`
        (in `build`'s dtype): the inverse of the layout, without padding."""
        seg, n = self.segment_length, self.lengths[s]

        def unstack(x):
            part = x[:, :, s * seg: s * seg + n]  # [Bk, H, T_s, d]
            return part.permute(0, 2, 1, 3).reshape(x.shape[0], n, -1)

        return unstack(self.keys), unstack(self.values)

    @property
    def persons(self) -> int:
        return len(self.weights)

    @property
    def segments(self) -> int:
        return len(self.lengths)

    @property
    def style_acts(self) -> bool:
        """A style with a non-zero scale is among the segments (only then does alpha scale the text)."""
        return self.style_scale is not None and self.style_scale != 0.0

    @property
    def segment_length(self) -> int:
        return self.keys.shape[2] // max(1, self.segments)

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "TokenGroups":
        """A copy with K/V (and padding bias) in `dtype` on `device`, made once and cached."""
        device = torch.device(device)
        if self.keys.device == device and self.keys.dtype == dtype:
            return self
        key = (device, dtype)
        moved = self._moved.get(key)
        if moved is None:
            moved = TokenGroups(
                self.keys.to(device, dtype),
                self.values.to(device, dtype),
                None if self.pad_bias is None else self.pad_bias.to(device, dtype),
                self.weights.to(device),
                self.lengths,
                self.heads,
                self.style_scale,
            )
            self._moved[key] = moved
        return moved

    def region_weights(self, masks: Sequence[torch.Tensor | None] | None = None,
                       activity: torch.Tensor | None = None) -> torch.Tensor:
        """w_hat [Bm, Nq or 1, P] (fp32) from one mask per person: None (whole image) or
        [1 or B, Nq] soft values in [0, 1] on this layer's token grid (see `masks_to_tokens`).
        `activity` ([1 or B, 1, P] of 1/0) leaves out persons not acting in a row: they neither act
        nor count in the overlap normalisation of the others.

        Masks are fixed for a given Apply, so the caller may cache this per token grid and pass it to
        `route` as `regions`.
        """
        masks = [None] * self.persons if masks is None else list(masks)
        if len(masks) != self.persons:
            raise ValueError(f"{len(masks)} masks for {self.persons} persons")
        if not masks:
            return torch.zeros(1, 1, 0, device=self.weights.device)
        given = [m for m in masks if m is not None]
        for m in given:
            if m.ndim != 2:
                raise ValueError(f"masks must be [1 or B, Nq], got {tuple(m.shape)}")
        # On the masks' device, else the activity's (decided on the compute device), else the weights'.
        device = given[0].device if given else activity.device if activity is not None else self.weights.device
        return combine_regions(stack_masks(masks, device), self.weights.to(device), activity)


def stack_masks(masks: Sequence[torch.Tensor | None], device) -> torch.Tensor:
    """[Bm, Nq or 1, P] fp32 on `device`: one column per person, its token mask or 1 (None: the whole
    image); [1, 1, 0] for no persons."""
    if not masks:
        return torch.zeros(1, 1, 0, device=device)
    shape = torch.broadcast_shapes((1, 1), *(m.shape for m in masks if m is not None))
    one = torch.ones((), device=device)
    return torch.stack([one.expand(shape) if m is None else m.float().to(device).expand(shape) for m in masks], -1)


def combine_regions(masks: torch.Tensor, weights: torch.Tensor, activity: torch.Tensor | None = None) -> torch.Tensor:
    """w_hat = w_i m_i / max(1, sum_j m_j) from stacked masks [Bm, Nq or 1, P] and weights [P] on one
    device; `activity` [1 or B, 1, P] (1/0) first leaves out the persons not acting in a row."""
    if activity is not None:
        masks = masks * activity
    # Overlaps share the region (sum of masks > 1 is renormalised); elsewhere a soft mask fades out.
    return masks * weights / masks.sum(-1, keepdim=True).clamp_min(1.0)


def route(
    q: torch.Tensor,
    a_text: torch.Tensor | None,
    groups: TokenGroups,
    regions: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    *,
    alpha: float = 0.5,
    precision: torch.dtype = torch.float32,
    wrapped: torch.Tensor | None = None,
) -> torch.Tensor:
    """[wrapped] + t_l(alpha)*A_text + g(alpha)*s*A_style + R for one layer call (see the module docstring).

    q:       [B, Nq, H*d] projected queries (heads flattened, as optimized_attention takes them).
    a_text:  [B, Nq, H*d] the layer's plain text attention, before to_out. With `wrapped` it only
             supplies the (t_l - 1) * A_text correction and may be None where t_l is 1
             (`layer_text_gain(groups, alpha) == 1`: no style acting, or alpha <= 0.5).
    groups:  TokenGroups for these rows (K batch 1 or B). For CFG with different cond/uncond
             tokens, see `route_chunks`.
    regions: `groups.region_weights(masks)` ([1 or B, Nq or 1, P]), or the masks themselves, or None
             (every person on the whole image).
    precision: dtype of the scores, softmax and products; the result is cast back to q's dtype.
    wrapped: [B, Nq, H*d] the output of a foreign replacement the patch wraps, i.e. A_text plus that
             pack's own contribution: added unscaled, whatever alpha.
    """
    b, nq, inner = q.shape
    t, g = layer_text_gain(groups, alpha), style_gain(alpha)
    for name, x in (("a_text", a_text), ("wrapped", wrapped)):
        if x is not None and x.shape != q.shape:
            raise ValueError(f"{name} {tuple(x.shape)} must match q {tuple(q.shape)}")
    if a_text is None and (wrapped is None or t != 1.0):
        raise ValueError("route needs a_text (the plain text attention) unless a wrapped output is given and "
                         "no style scales the text at this layer")
    if groups.segments == 0:  # nothing routed, no style: t is 1
        return (a_text if wrapped is None else wrapped).to(q.dtype)
    seg_w = _checked_regions(q, groups, regions).to(q.device, precision)
    if groups.style_scale is not None:
        style_col = seg_w.new_full((*seg_w.shape[:2], 1), g * groups.style_scale)
        seg_w = torch.cat([seg_w, style_col], -1)
    out = _segment_attention(q, groups, seg_w, precision)
    if wrapped is None:
        out.add_(_in(a_text, precision), alpha=t)
    else:
        # The foreign output already holds A_text once: add it as is, then only the text's change.
        out.add_(_in(wrapped, precision))
        if t != 1.0:
            out.add_(_in(a_text, precision), alpha=t - 1.0)
    return out.to(q.dtype)


def route_persons(
    q: torch.Tensor,
    groups: TokenGroups,
    regions: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    *,
    precision: torch.dtype = torch.float32,
) -> torch.Tensor:
    """R(x) alone, [B, Nq, H*d] in q's dtype: the persons' routed attention, with no text attention to add.

    For an identity attention of its own that an adapter adds to the residual stream (PuLID-FLUX's
    PerceiverAttentionCA, attention/flux_routing.py) instead of to the text cross-attention. The same
    kernel as `route`: one product for every person, a softmax per person, weights after it.
    `groups` holds persons only (no style: there is no text here for alpha to balance it against)."""
    if groups.style_scale is not None:
        raise ValueError("route_persons routes persons only; a style needs route (it is balanced against the text)")
    if groups.segments == 0:
        return q.new_zeros(q.shape)
    seg_w = _checked_regions(q, groups, regions).to(q.device, precision)
    return _segment_attention(q, groups, seg_w, precision).to(q.dtype)


def _checked_regions(q: torch.Tensor, groups: TokenGroups, regions) -> torch.Tensor:
    """The region weights [1 or B, 1 or Nq, P] for these rows (made from masks if given masks), checked."""
    b, nq, inner = q.shape
    heads = groups.heads
    if inner != heads * groups.keys.shape[3]:
        raise ValueError(f"q width {inner} does not match the tokens' {heads * groups.keys.shape[3]}")
    if groups.batch not in (1, b):
        raise ValueError(f"tokens have batch {groups.batch}; rows have {b}")
    if regions is None or not torch.is_tensor(regions):
        regions = groups.region_weights(regions)
    if regions.ndim != 3 or regions.shape[0] not in (1, b) or regions.shape[1] not in (1, nq) or regions.shape[2] != groups.persons:
        raise ValueError(f"regions {tuple(regions.shape)} must be [1 or {b}, 1 or {nq}, {groups.persons}]")
    return regions


def _segment_attention(q: torch.Tensor, groups: TokenGroups, seg_w: torch.Tensor,
                       precision: torch.dtype) -> torch.Tensor:
    """sum_s seg_w[..., s] * softmax over segment s's tokens of (q K_s^T / sqrt(d)) V_s: [B, Nq, H*d] in
    `precision`; seg_w [1 or B, 1 or Nq, S] has one column per segment."""
    b, nq, inner = q.shape
    heads = groups.heads
    grp = groups.to(q.device, precision)
    seg, tok = groups.segments, groups.segment_length
    d = inner // heads

    # One copy makes q^T [B, H, d, Nq] contiguous in the score precision.
    qt = q.reshape(b, nq, heads, d).permute(0, 2, 3, 1).to(dtype=precision, memory_format=torch.contiguous_format)
    scores = torch.matmul(grp.keys, qt).mul_(d**-0.5)  # [B, H, S*T, Nq]: K q^T / sqrt(d)
    if grp.pad_bias is not None:
        scores += grp.pad_bias
    probs = torch.softmax(scores.view(b, heads, seg, tok, nq), dim=-2)  # per person's own tokens
    # Weight after the softmax: a zero weight is an exact zero, never a -inf/log(m) in the logits.
    probs *= seg_w.transpose(1, 2)[:, None, :, None, :]
    # P^T V as a transposed operand (no copy); the sum over tokens also sums over persons.
    out = torch.matmul(probs.view(b, heads, seg * tok, nq).transpose(-1, -2), grp.values)  # [B, H, Nq, d]
    out = out.transpose(1, 2).reshape(b, nq, inner)
    return out


def _in(x: torch.Tensor, precision: torch.dtype) -> torch.Tensor:
    return x if torch.promote_types(x.dtype, precision) == precision else x.to(precision)


def route_chunks(
    q: torch.Tensor,
    a_text: torch.Tensor | None,
    groups: Sequence[TokenGroups],
    regions: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    *,
    alpha: float = 0.5,
    precision: torch.dtype = torch.float32,
    wrapped: torch.Tensor | None = None,
) -> torch.Tensor:
    """`route` for a batch made of len(groups) equal chunks, chunk c using groups[c].

    This is ComfyUI's CFG layout: the rows are cond_or_uncond chunks in order, so the patch passes
    e.g. [cond if c == 0 else uncond for c in extra_options["cond_or_uncond"]]. `regions` (or masks)
    are per chunk ([1 or B/len(groups), ...]) and shared by every chunk; `a_text` and `wrapped` are
    split with the rows. One `route` per chunk: the op count grows with the number of chunks (at most
    2 under CFG), never with persons.
    """
    n = len(groups)
    if n == 0 or q.shape[0] % n:
        raise ValueError(f"batch {q.shape[0]} cannot be split into {n} equal chunks")
    if n == 1:
        return route(q, a_text, groups[0], regions, alpha=alpha, precision=precision, wrapped=wrapped)

    def split(x):
        return [None] * n if x is None else x.chunk(n)

    parts = [
        route(qc, ac, gc, regions, alpha=alpha, precision=precision, wrapped=wc)
        for qc, ac, gc, wc in zip(q.chunk(n), split(a_text), groups, split(wrapped))
    ]
    return torch.cat(parts)


def token_grid(latent_hw: tuple[int, int], downscale: int) -> tuple[int, int]:
    """The token grid of a layer `downscale` (1, 2, 4, ...) times below the latent: ceil-division per
    stride-2 level, as the UNet's 3x3/stride 2/padding 1 downsamplers give (13 -> 7 -> 4 -> 2)."""
    if downscale < 1 or downscale & (downscale - 1):
        raise ValueError(f"downscale must be a power of 2, got {downscale}")
    h, w = latent_hw
    while downscale > 1:
        h, w, downscale = -(-h // 2), -(-w // 2), downscale // 2
    return h, w


def find_downscale(latent_hw: tuple[int, int], n_tokens: int) -> int:
    """The downscale whose token grid has n_tokens (what the patch sees: the latent's shape and Nq)."""
    downscale, grid = 1, tuple(latent_hw)
    while True:
        if grid[0] * grid[1] == n_tokens:
            return downscale
        if grid == (1, 1):
            raise ValueError(f"no stride-2 level of a {tuple(latent_hw)} latent has {n_tokens} tokens")
        downscale *= 2
        grid = token_grid(latent_hw, downscale)


def masks_to_tokens(masks: torch.Tensor, latent_hw: tuple[int, int], downscale: int, batch: int) -> torch.Tensor:
    """Resize a MASK batch [M, h, w] (or [h, w]) to a layer's token grid: [batch, gh*gw] fp32, soft.

    First an antialiased bilinear resize to the latent size (a smoothing filter with non-negative
    weights: soft values stay in [0, 1] and thin regions do not alias away), then 2x2 average pools
    with ceil_mode per stride-2 level, so token j averages latent pixels 2j and 2j+1 (the last one
    alone on odd sizes), the same ceil-division grid as the UNet. The mask is stretched to the
    latent's aspect. M == 1 broadcasts over the batch (an expanded view); M == batch maps item i to
    latent i; anything else is an error.
    """
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [M, h, w], got {tuple(masks.shape)}")
    m = masks.shape[0]
    if m not in (1, batch):
        raise ValueError(f"mask batch {m} must be 1 (shared) or the latent batch {batch}")
    gh, gw = token_grid(latent_hw, downscale)
    x = masks.float().unsqueeze(1)
    if tuple(x.shape[-2:]) != tuple(latent_hw):
        x = F.interpolate(x, size=tuple(latent_hw), mode="bilinear", antialias=True, align_corners=False)
    for _ in range(int(math.log2(downscale))):
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
    x = x.clamp(0.0, 1.0).reshape(m, gh * gw)  # not in place: x may be the caller's tensor
    return x.expand(batch, -1) if m == 1 else x
