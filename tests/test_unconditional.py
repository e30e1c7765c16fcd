"""The uncond branch: zero-image CLIP features (as IP-Adapter's reference code makes them), where
they reach the projections, and the optional negative identity / negative style that replace them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facestudio_testing import adapter_files as af
from facestudio_testing import clip_models
from facestudio_testing import face_models as fm
from facestudio_testing.identity_modules import identity_modules

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

WIDTH = clip_models.TINY_CLIP_WIDTH


@pytest.fixture(scope="module")
def mods(booted):
    return {"identity": identity_modules(booted)} | {name: booted.pack_module(name) for name in (
        "encoders.clip_vision", "encoders.style", "encoders.faces", "attention.adapters",
        "attention.patch", "attention.projection")}


@pytest.fixture(scope="module")
def analyzer(mods):
    return mods["encoders.faces"].load_face_analyzer(fm.tiny_pack(), providers="cpu")


def photo(cells=((6, 6, "white"),)):
    return fm.tiny_face_image(cells).astype(np.float32) / 255.0


def load_adapter(mods, tmp_path, kind, **widths):
    path = af.write_adapter(tmp_path / (af.release_file_name(kind, af.SD15, ".safetensors")),
                            af.adapter_state_dict(kind, af.SD15, **widths))
    return mods["attention.adapters"].load_adapter(path)


def test_zero_image_features_equal_the_reference_encoder_on_zeros(mods, tiny_clip):
    """IP-Adapter: image_encoder(torch.zeros_like(clip_image), output_hidden_states=True).hidden_states[-2]."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_models.TINY_CLIP_CONFIG)).eval()
    missing, unexpected = reference.load_state_dict({k: v.float() for k, v in tiny_clip.get_sd().items()},
                                                    strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected
    with torch.no_grad():
        expected = reference(pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
    zero = mods["encoders.clip_vision"].zero_image_hidden_states(tiny_clip)
    torch.testing.assert_close(zero, expected, atol=1e-5, rtol=1e-4)
    assert mods["encoders.clip_vision"].zero_image_hidden_states(tiny_clip) is zero  # once per model
    # Not a black photo, and not the mean-colour photo either (the host rounds it to 8 bits).
    for value in (0.0, torch.tensor([0.48145466, 0.4578275, 0.40821073])):
        image = torch.zeros(1, 224, 224, 3) + value
        photo_features = tiny_clip.encode_image(image)["penultimate_hidden_states"].float()
        assert not torch.equal(photo_features, zero)
    with pytest.raises(mods["encoders.clip_vision"].ClipVisionError, match="CLIP_VISION"):
        mods["encoders.clip_vision"].zero_image_hidden_states(object())


def test_identities_and_styles_carry_the_zero_image_features(mods, analyzer, tiny_clip, tmp_path):
    ident, zero = mods["identity"], mods["encoders.clip_vision"].zero_image_hidden_states(tiny_clip)
    identity = ident.multishot.encode_identity(analyzer, [photo()], clip_vision=tiny_clip, cache=None)
    np.testing.assert_array_equal(identity.unconditional_clip_features, zero[0].numpy())
    loaded = ident.files.load_identity(ident.files.save_identity(identity, tmp_path / "i.safetensors"))
    np.testing.assert_array_equal(loaded.unconditional_clip_features, zero[0].numpy())
    style = mods["encoders.style"].encode_style(tiny_clip, torch.from_numpy(photo())[None])
    torch.testing.assert_close(style.unconditional_hidden_states, zero, atol=0, rtol=0)


def test_a_version_1_file_with_clip_features_asks_to_encode_again(mods, analyzer, tiny_clip, tmp_path):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    ident = mods["identity"]
    path = ident.files.save_identity(ident.multishot.encode_identity(analyzer, [photo()], clip_vision=tiny_clip, cache=None),
                               tmp_path / "new.safetensors")
    with safe_open(str(path), framework="numpy") as handle:
        metadata = {**handle.metadata(), "format_version": "1"}
    tensors = load_file(str(path))
    del tensors["unconditional_clip_features"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    with pytest.raises(ident.value.IdentityError, match="encode the photos again"):
        ident.files.load_identity(tmp_path / "old.safetensors")


def test_mixing_needs_one_clip_model(mods, analyzer, tiny_clip, tmp_path):
    ident = mods["identity"]
    other = clip_models.tiny_clip_vision(tmp_path, seed=1)
    a = ident.multishot.encode_identity(analyzer, [photo()], clip_vision=tiny_clip, cache=None)
    b = ident.multishot.encode_identity(analyzer, [photo(((4, 9, "white"),))], clip_vision=other, cache=None)
    with pytest.raises(ident.value.IdentityError, match="different CLIP vision models"):
        ident.mixing.mix_identities([(a, 0.5), (b, 0.5)])
    with pytest.raises(ident.value.IdentityError, match="another CLIP vision model"):
        ident.multishot.encode_identity(analyzer, [photo(((4, 9, "white"),))], base=a, clip_vision=other, cache=None)


def test_person_tokens_use_zero_image_features_or_the_negative_identity(mods, analyzer, tiny_clip, tmp_path):
    patch, proj = mods["attention.patch"], mods["attention.projection"]
    adapter = load_adapter(mods, tmp_path, "faceid-plus-v2", clip_hidden=WIDTH)
    module = proj.projection_for(adapter)
    ident = mods["identity"]
    person = ident.multishot.encode_identity(analyzer, [photo()], clip_vision=tiny_clip, cache=None)
    other = ident.multishot.encode_identity(analyzer, [photo(((8, 5, "green"),))], clip_vision=tiny_clip, cache=None)

    cond, uncond = patch._person_tokens(adapter, module, patch.Person(person))
    zero = torch.from_numpy(np.array(person.unconditional_clip_features))[None]
    torch.testing.assert_close(uncond, proj.unconditional_identity_tokens(adapter, zero, module=module))
    black = proj.unconditional_identity_tokens(adapter, torch.zeros_like(zero), module=module)
    assert (uncond - black).abs().max() > 1e-4  # zero *features* would be a different (wrong) uncond

    _, negative = patch._person_tokens(adapter, module, patch.Person(person, negative=other))
    emb = torch.from_numpy(np.array(other.embedding))[None]
    clip = torch.from_numpy(np.array(other.combined_clip_features))[None]
    torch.testing.assert_close(negative, proj.identity_tokens(adapter, emb, clip, module=module))

    plain = ident.multishot.encode_identity(analyzer, [photo()], cache=None)
    with pytest.raises(mods["attention.adapters"].AdapterError, match="the negative identity has none"):
        patch._person_tokens(adapter, module, patch.Person(person, negative=plain))


def test_style_uncond_is_zero_image_features_or_the_negative_style(mods, tiny_clip, tmp_path):
    patch, proj = mods["attention.patch"], mods["attention.projection"]
    encode = mods["encoders.style"].encode_style
    style = encode(tiny_clip, torch.from_numpy(photo())[None])
    negative = encode(tiny_clip, torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3)))
    plus = load_adapter(mods, tmp_path, "image-prompt-plus", clip_hidden=WIDTH)
    features, zero = patch._style_features(plus, style, "The style")
    torch.testing.assert_close(zero, style.unconditional_hidden_states)
    plain = load_adapter(mods, tmp_path, "image-prompt", image_embeds=clip_models.TINY_CLIP_CONFIG["projection_dim"])
    features, zero = patch._style_features(plain, style, "The style")
    assert zero is None and torch.equal(features, style.image_embeds)
    wide = load_adapter(mods, tmp_path, "image-prompt")  # reads ViT-H's 1024-wide image embeds
    with pytest.raises(mods["attention.adapters"].AdapterError, match="image embeds are 16 wide"):
        patch._style_features(wide, style, "The style")
    two = encode(tiny_clip, torch.rand(2, 64, 64, 3))
    with pytest.raises(ValueError, match="holds 2 images"):
        patch._style_features(plain, two, "The style")
    assert negative.batch_size == 1
