"""FaceStudio Apply: build the routed attention (replacement.py) from an adapter and the persons, and
install it on a clone of a ModelPatcher as attn2 replacements.

Per Apply, every person's identity tokens (and the style's) are projected once and turned into each
layer's K/V once (fp32, on the offload device), then laid out for `routing.route` (one TokenGroups
per layer and CFG side). Those tensors are the parameters of one `TokenStore` module that the MODEL
carries as an additional model (attention/token_store.py), so the host's model management loads it to
the compute device with the UNet (counted in its memory budget) and offloads it with it; nothing is
kept on a GPU behind the host's back. A second Apply on a model already carrying ours builds merged
replacements and one new store with both person lists, so all persons share one A_text and one
routed call. Another pack's replacement already on a position is wrapped (replacement.py).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from ..encoders.recognizers import check_recognizer, check_recorded_recognizer
from .adapters import AdapterError, AdapterKind, IPAdapterWeights
from .controls import scale_kv, style_layer_scales
from .layers import cross_attention_positions, map_adapter_layers
from .lora import APPLIED_LORAS, LORA_KINDS, applied_lora_key, faceid_lora
from .persons import Person, add_person
from .projection import (
    facestudio_tokens,
    identity_tokens,
    layer_kvs,
    projection_for,
    style_tokens,
    unconditional_identity_tokens,
    unconditional_style_tokens,
)
from .replacement import KV, FaceStudioAttention, PatchOrderError, PersonLayer, StyleLayer, layer_token_groups
from .routing import text_gain
from .token_store import TokenStore, store_patcher

__all__ = ["Person", "add_person", "apply_facestudio", "persons_tokens", "FaceStudioAttention", "PatchOrderError", "PersonLayer",
           "StyleLayer", "TokenStore", "STORE_KEY"]

STORE_KEY = "facestudio_tokens"  # the MODEL's additional_models entry for the TokenStore


# --- building from an adapter and identities ------------------------------------------------------

def _identity_inputs(adapter: IPAdapterWeights, identity, what: str = "The identity"):
    """(embeddings, clip features, unconditional clip features, shots) the adapter's projection takes."""
    width = adapter.id_embedding_width
    if identity.embedding_dim != width:
        raise AdapterError(
            f"{what} was made with a {identity.embedding_dim}-wide face recognizer ({identity.recognizer}), "
            f"but {adapter.source} reads {width}-wide ArcFace embeddings: encode the identity with the ArcFace "
            f"pack it was trained with (buffalo_l for the FaceID family).")
    # Same width is not the same embedding space (antelopev2's glintr100 is 512 wide too): check which
    # recognizer, by its file's hash, against the one this kind (or this trained file) was trained on.
    if adapter.facestudio is not None:
        problem = check_recorded_recognizer(adapter.facestudio.recognizer, identity.recognizer, adapter.source, what)
    else:
        problem = check_recognizer(adapter.kind, identity.recognizer, adapter.source, what)
    if problem is not None:
        raise AdapterError(problem)
    kind = adapter.kind
    if kind is AdapterKind.FACEID_PORTRAIT:
        emb = identity.shot_rows(normed=True)
    elif kind is AdapterKind.FACEID_PORTRAIT_UNNORM:
        emb = identity.shot_rows(normed=False)
    else:
        emb = identity.embedding[None]
    clip = uncond_clip = None
    if kind in (AdapterKind.FACEID_PLUS, AdapterKind.FACEID_PLUS_V2):
        if identity.combined_clip_features is None:
            raise AdapterError(f"{adapter.source} is {kind.label}, which also reads CLIP vision features of the face "
                               f"({what.lower()} has none): connect a CLIP vision model (ViT-H) to FaceStudio Encode "
                               "Identity and encode again.")
        if identity.clip_width != adapter.clip_width:
            raise AdapterError(f"{what} was encoded with a CLIP vision model whose hidden states are "
                               f"{identity.clip_width} wide, but {adapter.source} ({kind.label}) reads "
                               f"{adapter.clip_width}: connect the CLIP vision model the adapter was trained with "
                               "(ViT-H) to FaceStudio Encode Identity and encode again.")
        clip = torch.from_numpy(np.array(identity.combined_clip_features, np.float32))[None]
        uncond_clip = torch.from_numpy(np.array(identity.unconditional_clip_features, np.float32))[None]
    return torch.from_numpy(np.array(emb, np.float32)), clip, uncond_clip, emb.shape[0]


def _person_tokens(adapter: IPAdapterWeights, module, person: Person, guidance=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) identity tokens: uncond from a zero embedding (and zero-image CLIP features),
    or the person's negative identity. Both sides with the person's own shortcut scale (FaceID Plus v2;
    the reference's get_image_embeds passes the same s_scale to both).

    guidance: a FaceStudio adapter's (prompt pooled embedding, style image_embeds or None, blend); its
    uncond side is the same hybrid of a zero face (what face dropout trained), so CFG pushes along the
    identity only, not along the prompt or style, which the uncond side shares."""
    emb, clip, uncond_clip, shots = _identity_inputs(adapter, person.identity)
    if adapter.kind is AdapterKind.FACESTUDIO:
        text, image, blend = guidance
        cond = facestudio_tokens(adapter, emb, text, image, blend, module)
        negative = (_identity_inputs(adapter, person.negative, "The negative identity")[0]
                    if person.negative is not None else torch.zeros_like(emb))
        return cond, facestudio_tokens(adapter, negative, text, image, blend, module)
    scale = person.shortcut_scale
    cond = identity_tokens(adapter, emb, clip, scale, module=module)
    if person.negative is not None:
        n_emb, n_clip, _, _ = _identity_inputs(adapter, person.negative, "The negative identity")
        return cond, identity_tokens(adapter, n_emb, n_clip, scale, module=module)
    return cond, unconditional_identity_tokens(adapter, uncond_clip, scale, shots=shots, module=module)


def _style_features(adapter: IPAdapterWeights, style, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features the adapter takes, its zero-image features or None for plain image-prompt)."""
    if style.batch_size != 1:
        raise ValueError(f"{what} holds {style.batch_size} images; FaceStudio Apply takes one style image: encode "
                         "a single image (or pick one with an image batch node).")
    plain = adapter.kind.clip_input == "image_embeds"  # image-prompt, and FaceStudio's e_h
    features = (style.image_embeds if plain else style.penultimate_hidden_states).float().cpu()
    if features.shape[-1] != adapter.clip_width:
        raise AdapterError(f"{what} was encoded with a CLIP vision model whose {'image embeds' if plain else 'hidden states'} "
                           f"are {features.shape[-1]} wide, but {adapter.source} reads {adapter.clip_width}: encode it "
                           "with the CLIP vision model the adapter was trained with (ViT-H for SD1.5 and most SDXL "
                           "adapters, ViT-bigG for the original SDXL one).")
    return features, None if plain else style.unconditional_hidden_states.float().cpu()


def persons_tokens(adapter: IPAdapterWeights, persons: Sequence[Person], *, style=None,
                   prompt_embeds: torch.Tensor | None = None, blend: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each person's (cond, uncond) context tokens [1, T, ctx], as Apply routes them; style, prompt_embeds
    and blend are read by FaceStudio adapters only (see apply_facestudio)."""
    guidance = (_facestudio_guidance(adapter, style, prompt_embeds, blend)
                if adapter.kind is AdapterKind.FACESTUDIO else None)
    module = projection_for(adapter)
    return [_person_tokens(adapter, module, p, guidance) for p in persons]


def _facestudio_guidance(adapter: IPAdapterWeights, style, prompt_embeds, blend: float):
    """(e_T, e_h or None, blend) for a FaceStudio adapter's hybrid guidance, checked."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be within 0..1 (a in a*e_i + (1-a)*e_p), got {blend}.")
    image = None
    if style is not None:
        image, _ = _style_features(adapter, style, "The style")
    if prompt_embeds is None:
        if image is None or blend < 1.0:
            raise ValueError(
                f"{adapter.source} is a FaceStudio adapter: it reads the prompt's pooled text embedding (its text + "
                "identity path). Connect the positive prompt's CONDITIONING (from CLIP Text Encode) to FaceStudio "
                "Apply's 'prompt', or set blend to 1 with a style image to guide by the image path alone.")
        prompt_embeds = torch.zeros(1, adapter.text_width)  # weighted 0 by blend 1; the fusion needs a row
    text = prompt_embeds.float().cpu().reshape(-1, prompt_embeds.shape[-1])[:1]
    if text.shape[-1] != adapter.text_width:
        raise AdapterError(f"The prompt's pooled text embedding is {text.shape[-1]} wide, but {adapter.source} was "
                           f"trained on {adapter.text_width}-wide ones ({adapter.base_model}'s text encoder): encode "
                           "the prompt with the checkpoint's own CLIP.")
    return text, image, float(blend)


def _scaled_person(cond: KV, uncond: KV, person: Person, sigma_start: float, sigma_end: float,
                   embeds_scaling: str) -> PersonLayer:
    (cond, weight), (uncond, _) = (scale_kv(kv, person.weight, embeds_scaling) for kv in (cond, uncond))
    return PersonLayer(cond, uncond, weight, sigma_start, sigma_end, person.mask)


def _sigma(model, percent: float) -> float:
    return float(model.get_model_object("model_sampling").percent_to_sigma(percent))


def apply_facestudio(model, adapter: IPAdapterWeights, persons: Sequence[Person], *, alpha: float = 0.5,
                     style_adapter: IPAdapterWeights | None = None, style=None, style_weight: float = 1.0,
                     negative_style=None, lora_strength: float = 0.0, embeds_scaling: str = "V only",
                     style_blocks: str = "all", style_block_weights: str = "", unfold_batch: bool = False,
                     blend: float = 0.5, prompt_embeds: torch.Tensor | None = None,
                     reports: list[str] | None = None):
    """A clone of `model` with FaceStudio's routed attention at every cross-attention position.

    Settings after `persons` are keyword-only: the node passes a dozen, and a reordering must fail loudly.
    negative_style: a StyleEncoding whose tokens replace the style's unconditional ones.
    lora_strength: above 0 (the Apply node's default is 1.0; 0 here, so a bare call adds only the persons),
    the FaceID LoRA trained with `adapter` (FaceID, Plus, Plus v2) is added to the clone
    (attention/lora.py), once per MODEL: a chained Apply finding it there does not add it again. When
    it is nowhere to be found the clone runs without it, and the report is logged and appended to `reports`.
    embeds_scaling, style_blocks, style_block_weights: see attention/controls.py.
    unfold_batch: latent b of the batch gets person b (mod the number of persons) only.
    blend, prompt_embeds: FaceStudio adapters only (attention/facestudio_fusion.py): the hybrid guidance
    a * e_i + (1 - a) * e_p, e_i from the style image's CLIP image_embeds (the style needs no style
    adapter then; one connected as well adds its own tokens), e_p from `prompt_embeds`, the prompt's pooled
    text embedding [1, text]. Other kinds do not read them (a prompt connected to one is reported)."""
    facestudio = adapter.kind is AdapterKind.FACESTUDIO
    if not adapter.is_identity:
        raise AdapterError(f"{adapter.source} is {adapter.kind.label}, a style (image-prompt) adapter: connect a "
                           "FaceID adapter as 'adapter' and this one as 'style_adapter'.")
    if style_adapter is not None and not style_adapter.is_style:
        raise AdapterError(f"{style_adapter.source} is {style_adapter.kind.label}, a face-identity adapter: "
                           "connect an image-prompt (style) adapter as 'style_adapter' and this one as 'adapter'.")
    if style_adapter is not None and style is None:
        raise ValueError("A style needs both 'style_adapter' and 'style' connected (or neither).")
    if style is not None and style_adapter is None and not facestudio:
        raise ValueError("A style needs both 'style_adapter' and 'style' connected (or neither); only a FaceStudio "
                         "adapter reads a style without a style adapter (its image + identity path).")
    if negative_style is not None and style is None:
        raise ValueError("'negative_style' only acts on a style: connect 'style' and 'style_adapter' too, or "
                         "disconnect 'negative_style'.")
    if negative_style is not None and style_adapter is None:
        raise ValueError("'negative_style' acts through a style adapter: connect an image-prompt adapter as "
                         "'style_adapter', or disconnect 'negative_style'.")
    if not persons:
        raise ValueError("No persons: add at least one with FaceStudio Person.")
    text_gain(alpha)
    positions = cross_attention_positions(model)
    mapped = map_adapter_layers(adapter, positions)
    style_scales = style_layer_scales(positions, (style_adapter or adapter).base_model, style_blocks,
                                      style_block_weights)
    scale_kv((torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)), 1.0, embeds_scaling)  # validates the mode early

    if prompt_embeds is not None and not facestudio and reports is not None:
        reports.append(f"'prompt' is read by FaceStudio adapters only; {adapter.source} is {adapter.kind.label}, "
                       "so the prompt acts only through the sampler's conditioning.")
    tokens = [t for pair in persons_tokens(adapter, persons, style=style, prompt_embeds=prompt_embeds, blend=blend)
              for t in pair]  # cond, uncond per person
    kvs = layer_kvs(adapter, tokens)
    person_kv = [(kvs[2 * i], kvs[2 * i + 1], p, _sigma(model, p.start), _sigma(model, p.end))
                 for i, p in enumerate(persons)]

    style_kv = None
    if style is not None and style_adapter is not None:
        map_adapter_layers(style_adapter, positions)
        smodule = projection_for(style_adapter)
        features, zero = _style_features(style_adapter, style, "The style")
        if negative_style is not None:
            uncond = style_tokens(style_adapter, _style_features(style_adapter, negative_style,
                                                                 "The negative style")[0], smodule)
        else:
            uncond = unconditional_style_tokens(style_adapter, zero, smodule)
        style_kv = tuple(layer_kvs(style_adapter, [style_tokens(style_adapter, features, smodule), uncond]))

    lora, lora_key = None, applied_lora_key(adapter)
    applied = model.model_options.get(APPLIED_LORAS, {})
    if lora_strength and adapter.kind in LORA_KINDS and lora_key not in applied:
        lora, lora_report = faceid_lora(model, adapter, positions)
        if lora is None:
            logging.getLogger(__name__).warning("FaceStudio Apply: %s", lora_report)
            if reports is not None:
                reports.append(lora_report)

    clone = model.clone()
    if lora is not None:
        clone.add_patches(lora, float(lora_strength))
        clone.model_options[APPLIED_LORAS] = {**applied, lora_key: float(lora_strength)}
    existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    patches = []
    for n, layer in enumerate(mapped):
        people = [_scaled_person(cond[n], uncond[n], p, s_start, s_end, embeds_scaling)
                  for cond, uncond, p, s_start, s_end in person_kv]
        style_n = None
        if style_kv is not None:
            (s_cond, scale), (s_uncond, _) = (scale_kv(kv[n], float(style_weight) * style_scales[n], embeds_scaling)
                                              for kv in style_kv)
            style_n = StyleLayer(s_cond, s_uncond, scale)
        patch = FaceStudioAttention(people, style_n, alpha, unfold_batch=unfold_batch)
        key = layer.position.patch_key
        previous = existing.get(key, existing.get(key[:2]))
        if getattr(previous, "is_facestudio_attention", False):
            patch = previous.merged_with(patch)
        elif previous is not None:
            patch = patch.wrapping(previous)
        patches.append(patch)

    # One store per MODEL: a chained Apply's merged store replaces the earlier one.
    store = TokenStore([layer_token_groups(p.persons, p.style, pos.heads) for p, pos in zip(patches, positions)])
    clone.set_additional_models(STORE_KEY, [store_patcher(store, model.load_device, model.offload_device)])
    # The host calls the (block, index, transformer) entry, else the (block, index) one; cubiq's IPAdapter
    # uses the 2-tuple on SD1.5 and .add()s to an entry already there. Where a block holds one transformer
    # both keys name the same attention, so ours goes at both: a later IPAdapter then finds it (and gets
    # PatchOrderError) instead of adding an entry the host never calls.
    blocks = [layer.position.patch_key[:2] for layer in mapped]
    for n, (patch, layer) in enumerate(zip(patches, mapped)):
        bound, key = patch.bound_to(store, n), layer.position.patch_key
        clone.set_model_attn2_replace(bound, *key)
        if blocks.count(key[:2]) == 1:
            clone.set_model_attn2_replace(bound, *key[:2])
    return clone
