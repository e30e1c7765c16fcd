"""FaceStudio's fused identity tokens (arXiv 2312.02663, section 3), adapted to a frozen base model.

The paper fuses the face's ArcFace embedding e_f with an image embedding e_h (the style/content
image with the face masked out) and with the prompt's text embedding e_T through ONE linear map L:

    e_i = L(e_h || e_f)     image + identity
    e_p = L(e_T || e_f)     text + identity
    e_g = a * e_i + (1 - a) * e_p       the hybrid guidance, a set by the user

Shapes (pooled embeddings, one row per image):
- e_f: [B, 512], the L2-normed ArcFace embedding (the recognizer is recorded in the adapter file);
- e_h: [B, clip_dim], the host's CLIP vision `image_embeds` (projected, pooled) of the face-masked
  image: 1024 for ViT-H/14, 1280 for ViT-bigG/14;
- e_T: [B, text_dim], the text encoder's pooled output for the caption (the empty prompt's when there
  is none): SD1.5's CLIP-L 768, SDXL's CLIP-G 1280.
The paper's towers give e_h and e_T in one joint CLIP space of one width; the host's CLIP vision and
text encoder are different CLIP models of different widths, so each path first goes through its own
linear map into a common `width` (image_in, text_in), and L (`fusion`) is shared after that. L's
output is `num_tokens` tokens of the UNet's context width, each path LayerNorm'ed (`norm`, shared),
as IP-Adapter's projections do; e_g blends the normed tokens. The tokens then feed decoupled
cross-attention (per-layer to_k_ip / to_v_ip, attention/adapters.py's layout), so one file serves
every checkpoint of its base family. No host imports.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["FaceStudioFusion", "ARCFACE_WIDTH", "DEFAULT_TOKENS", "DEFAULT_WIDTH"]

ARCFACE_WIDTH = 512
DEFAULT_TOKENS = 4      # as IP-Adapter FaceID: a person's tokens stay a small part of the context
DEFAULT_WIDTH = 768     # the joint CLIP width of the paper's ViT-L/14 tower


class FaceStudioFusion(nn.Module):
    """image_in / text_in: each path into `width`; path_norm / face_norm: both inputs of L at one scale;
    fusion: L over [width || 512]; norm: per token."""

    def __init__(self, clip_dim: int, text_dim: int, context_dim: int, num_tokens: int = DEFAULT_TOKENS,
                 width: int = DEFAULT_WIDTH, id_dim: int = ARCFACE_WIDTH):
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.image_in = nn.Linear(clip_dim, width)
        self.text_in = nn.Linear(text_dim, width)
        # Both halves of L's input at one scale: an L2-normed ArcFace row has entries of about 0.04, a
        # CLIP embedding's are near 1, and without this the face would hardly move the tokens.
        self.path_norm = nn.LayerNorm(width)
        self.face_norm = nn.LayerNorm(id_dim)
        self.fusion = nn.Linear(width + id_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    @property
    def clip_dim(self) -> int:
        return self.image_in.in_features

    @property
    def text_dim(self) -> int:
        return self.text_in.in_features

    @property
    def id_dim(self) -> int:
        return self.face_norm.normalized_shape[0]

    def _tokens(self, path: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        fused = self.fusion(torch.cat([self.path_norm(path), self.face_norm(face)], dim=-1))
        return self.norm(fused.reshape(-1, self.num_tokens, self.context_dim))

    def image_identity(self, image_embeds: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        """e_i: [B, clip_dim], [B, 512] -> [B, num_tokens, context_dim]."""
        return self._tokens(self.image_in(image_embeds), face)

    def text_identity(self, text_embeds: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        """e_p: [B, text_dim], [B, 512] -> [B, num_tokens, context_dim]."""
        return self._tokens(self.text_in(text_embeds), face)

    def hybrid(self, face: torch.Tensor, text_embeds: torch.Tensor, image_embeds: torch.Tensor | None = None,
               alpha: float = 0.0) -> torch.Tensor:
        """e_g = alpha * e_i + (1 - alpha) * e_p; without an image (or alpha 0) the text path alone."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"FaceStudio's image/text blend must be within 0..1, got {alpha}")
        text = self.text_identity(text_embeds, face)
        if image_embeds is None or alpha == 0.0:
            return text
        image = self.image_identity(image_embeds, face)
        return image if alpha == 1.0 else alpha * image + (1.0 - alpha) * text
