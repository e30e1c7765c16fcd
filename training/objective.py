"""The training objective: the frozen base model's own prediction loss, with the adapter's tokens in its
cross-attention, and FaceStudio's condition dropout.

Per example: a noise level from the model's own `model_sampling` (percent_to_sigma of a uniform draw,
as the host's LoRA trainer draws it), the noised latent by `noise_scaling`, the model's denoised
prediction through BaseModel.apply_model (which applies the model's own parameterisation: eps, v or
flow), and the mean squared error against the clean latent measured in the model's own output space
(the denoised error divided by d(denoised)/d(output): the eps loss for an eps model, the velocity loss
for a flow model). The host's LoRA trainer measures the denoised (x0) error itself, which weights the
noisiest steps by sigma^2 and, on a base model that is far from the data, is all noise. The adapter's tokens reach every cross-attention position through the host's
attn2 replacement point (`transformer_options["patches_replace"]["attn2"]`): the text attention as the
host computes it, plus the decoupled attention over that example's tokens.

Condition dropout (the paper's): with probability `style` the image path is dropped and the example
trains the text + identity path (e_p); otherwise the image + identity path (e_i). With probability
`face` the face embedding is zeroed, so the adapter also learns the prompt/image alone. Every draw
comes from one torch.Generator, so a run is reproducible and resumable from that generator's state.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable

import torch

from .trainable_adapter import TrainableAdapter

__all__ = ["TrainingBatch", "Dropout", "NO_DROPOUT", "example_tokens", "training_loss", "predict", "attention_patches"]


@dataclass(frozen=True)
class TrainingBatch:
    """B examples, encoded: latents in the VAE's latent format (process_latent_in is applied here)."""

    latents: torch.Tensor        # [B, C, h, w]
    context: torch.Tensor        # [B, T, ctx]: the caption's text-encoder states (the base model's context)
    text_embeds: torch.Tensor    # [B, text_dim]: the caption's pooled embedding (e_T)
    image_embeds: torch.Tensor   # [B, clip_dim]: CLIP vision image_embeds of the face-masked image (e_h)
    faces: torch.Tensor          # [B, 512]: the L2-normed ArcFace embedding (e_f)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TrainingBatch":
        """The batch with `fn` applied to every field (a device move, a selection of examples)."""
        return TrainingBatch(*(fn(getattr(self, f.name)) for f in fields(self)))


@dataclass(frozen=True)
class Dropout:
    style: float = 0.64   # the paper's style-image dropout
    face: float = 0.1     # the paper's face dropout


NO_DROPOUT = Dropout(0.0, 0.0)


def example_tokens(adapter: TrainableAdapter, batch: TrainingBatch, image_path: torch.Tensor,
                   keep_face: torch.Tensor) -> torch.Tensor:
    """[B, N, ctx]: e_i for the examples where image_path is True, e_p elsewhere; faces zeroed where
    keep_face is False."""
    fusion = adapter.fusion
    faces = batch.faces * keep_face[:, None].to(batch.faces.dtype)
    text = fusion.text_identity(batch.text_embeds, faces)
    image = fusion.image_identity(batch.image_embeds, faces)
    return torch.where(image_path[:, None, None], image, text)


class _DecoupledAttention:
    """attn2 replacement while training: the host's text attention + attention over the adapter's K/V."""

    def __init__(self, adapter: TrainableAdapter, n: int, tokens: torch.Tensor, previous=None):
        self.adapter, self.n, self.tokens, self.previous = adapter, n, tokens, previous

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        text = self.previous(q, k, v, extra_options) if self.previous is not None else optimized_attention(q, k, v, heads)
        # The adapter computes in its own dtype (fp32) whatever the UNet runs in (fp16 on most GPUs); only its
        # keys and values meet the UNet's queries.
        k_ip, v_ip = self.adapter.layer_kv(self.n, self.tokens)
        if k_ip.shape[0] != q.shape[0]:
            raise ValueError(f"The training batch holds {k_ip.shape[0]} examples but the model was called on "
                             f"{q.shape[0]} latents.")
        return text + optimized_attention(q, k_ip.to(q.dtype), v_ip.to(q.dtype), heads)


def attention_patches(adapter: TrainableAdapter, tokens: torch.Tensor, existing: dict | None = None) -> dict:
    """The attn2 replacement entries for `tokens`, keyed as set_model_attn2_replace keys them; an entry
    already there (another pack's, from the model's options) is wrapped, not overwritten."""
    existing = existing or {}
    return {p.patch_key: _DecoupledAttention(adapter, n, tokens, existing.get(p.patch_key, existing.get(p.patch_key[:2])))
            for n, p in enumerate(adapter.positions)}


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """The base model's parameters take no gradient while the adapter trains (their flags restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def training_loss(model, adapter: TrainableAdapter, batch: TrainingBatch, generator: torch.Generator,
                  dropout: Dropout = Dropout(), device: torch.device | None = None) -> torch.Tensor:
    """The mean loss of one batch on `model` (a MODEL: ModelPatcher) with `adapter`; differentiable in
    the adapter's parameters only. Draws (noise levels, noise, dropout) from `generator`, in that order."""
    base = model.model
    sampling = model.get_model_object("model_sampling")
    device = device or next(adapter.parameters()).device
    b = len(batch)
    percents = torch.rand(b, generator=generator)
    noise = torch.randn(batch.latents.shape, generator=generator)
    image_path = torch.rand(b, generator=generator) >= dropout.style
    keep_face = torch.rand(b, generator=generator) >= dropout.face
    sigmas = torch.tensor([float(sampling.percent_to_sigma(float(p))) for p in percents], device=device)

    batch = batch.map(lambda t: t.to(device))
    latents = base.process_latent_in(batch.latents)
    noised = sampling.noise_scaling(sigmas, noise.to(device), latents, False)
    tokens = example_tokens(adapter, batch, image_path.to(device), keep_face.to(device))
    denoised = predict(model, adapter, noised, sigmas, batch.context, tokens, **_adm_conds(base, batch))
    # In the model's own output space (eps, v, flow velocity, x0): the denoised latent is affine in the
    # model's output, so dividing its error by d(denoised)/d(output) gives the output's error.
    per_unit = _output_gain(sampling, sigmas, denoised)
    return (((denoised.float() - latents.float()) / per_unit) ** 2).mean()


def _adm_conds(base, batch: TrainingBatch) -> dict:
    """SDXL's `y` (the pooled text + size embedding) from the model's own encode_adm, a row per example:
    the caption's pooled embedding is e_T, and the size is the training image's (uncropped, as encoded),
    the same for the whole batch. Nothing for a model without one (SD1.5)."""
    if not getattr(base, "adm_channels", 0):
        return {}
    height, width = (8 * s for s in batch.latents.shape[-2:])  # SD and SDXL VAEs: 8 pixels per latent
    y = base.encode_adm(pooled_output=batch.text_embeds, width=width, height=height, device=batch.text_embeds.device)
    return {"y": y.to(batch.text_embeds.device)}


def predict(model, adapter: TrainableAdapter, noised: torch.Tensor, sigmas: torch.Tensor, context: torch.Tensor,
            tokens: torch.Tensor, **conds) -> torch.Tensor:
    """The frozen model's denoised prediction of `noised` at `sigmas` with the adapter's `tokens` in its
    cross-attention (one row of tokens per latent); `conds`: the model's other inputs (SDXL's y)."""
    options = model.model_options.get("transformer_options", {})
    existing = options.get("patches_replace", {}).get("attn2", {})
    transformer_options = {**options, "patches_replace": {**options.get("patches_replace", {}),
                                                          "attn2": {**existing, **attention_patches(adapter, tokens, existing)}}}
    with _frozen(model.model):
        return model.model.apply_model(noised, sigmas, c_crossattn=context, transformer_options=transformer_options,
                                       **conds)


def _output_gain(sampling, sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """d(denoised)/d(model output) per example, from the model's own calculate_denoised: -sigma for eps and
    flow models, -sigma*sd/sqrt(sigma^2+sd^2) for v-prediction, 1 for x0 models."""
    shape = (like.shape[0],) + (1,) * (like.ndim - 1)
    one = torch.ones(shape, device=like.device, dtype=torch.float32)
    zero = torch.zeros_like(one)
    gain = sampling.calculate_denoised(sigmas.float(), one, zero) - sampling.calculate_denoised(sigmas.float(), zero, zero)
    if not torch.all(gain.abs() > 0):
        raise ValueError("The model's denoised prediction does not depend on its output at these noise levels.")
    return gain

