"""Training a FaceStudio adapter (training/): on the tiny SD1.5 checkpoint and a synthetic dataset in
which the identity decides something visible.

The dataset: 8x8 latents (64 px images) with a 4x4 patch in the top-left corner whose value is +1.5 for
person A and -1.5 for person B in every channel (in the model's latent space), over a smooth random background. Each example has its
person's face embedding (a fixed unit vector per person, plus a little per-photo noise, as shots of one
person differ), one caption for all (so the text cannot tell the persons apart) and a random
face-masked image embedding. Only the face embedding tells which value the patch takes, so only an
adapter that learnt to read it can lower the loss on held-out examples.
"""
from __future__ import annotations

import pytest
import torch

SEEDS = (0, 1, 2)
PATCH = 1.5


@pytest.fixture(scope="module")
def modules(booted):
    return (booted.pack_module("training.trainable_adapter"), booted.pack_module("training.objective"),
            booted.pack_module("training.trainer"))


@pytest.fixture(scope="module")
def model(booted, tiny_sd15_file):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_vae=False, output_clip=False)[0]


def person_faces(seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    faces = torch.randn(2, 512, generator=gen)
    return faces / faces.norm(dim=-1, keepdim=True)


def dataset(objective, count: int, seed: int, clip_dim: int = 1024, text_dim: int = 768):
    """`count` examples, persons alternating A, B; returns (TrainingBatch, person index per example)."""
    gen = torch.Generator().manual_seed(seed)
    people = torch.arange(count) % 2
    background = torch.nn.functional.interpolate(torch.randn(count, 4, 2, 2, generator=gen), size=(8, 8),
                                                 mode="bilinear", align_corners=False) * 0.5
    latents = background.clone()
    latents[:, :, :4, :4] = torch.where(people == 0, PATCH, -PATCH)[:, None, None, None]
    faces = person_faces()[people] + 0.05 * torch.randn(count, 512, generator=gen)
    faces = faces / faces.norm(dim=-1, keepdim=True)
    caption = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(99))
    pooled = torch.randn(1, text_dim, generator=torch.Generator().manual_seed(98))
    # Latents are handed over in the VAE's format: process_latent_in (x 0.18215 for SD1.5) is the trainer's.
    scale = 0.18215
    return objective.TrainingBatch(latents / scale, caption.expand(count, -1, -1).clone(),
                                   pooled.expand(count, -1).clone(),
                                   torch.randn(count, clip_dim, generator=gen), faces), people


def swapped_faces(objective, data):
    """The same examples with each one's face replaced by the other person's (examples alternate A, B)."""
    swap = torch.arange(len(data)) ^ 1
    return objective.TrainingBatch(data.latents, data.context, data.text_embeds, data.image_embeds, data.faces[swap])


def test_training_lowers_the_held_out_loss_and_learns_the_identity(modules, model):
    """On each of 3 seeds, 80 steps of 2 examples: the held-out loss falls by at least 20%, and the face
    decides the patch. The statistic: the held-out loss with each example's faces swapped for the other
    person's, over the loss with its own (the same noise levels and noise for both), minus 1. The
    untrained adapter reads the faces at random (within +-3%); the trained one predicts better with the
    right face, by more than it did untrained and by at least 2%."""
    trainable, objective, trainer = modules
    train_data, _ = dataset(objective, 16, seed=10)
    held_out, _ = dataset(objective, 8, seed=20)
    swapped = swapped_faces(objective, held_out)
    for seed in SEEDS:
        adapter = trainable.TrainableAdapter.for_model(model, clip_dim=1024, text_dim=768, seed=seed)
        before, before_swapped = (trainer.evaluate(model, adapter, d) for d in (held_out, swapped))
        settings = trainer.TrainingSettings(steps=80, batch_size=2, learning_rate=2e-3, seed=seed)
        state = trainer.train(model, adapter, train_data, settings)
        after, after_swapped = (trainer.evaluate(model, adapter, d) for d in (held_out, swapped))
        gap_before, gap_after = before_swapped / before - 1, after_swapped / after - 1
        print(f"seed {seed}: held-out loss {before:.4f} -> {after:.4f} ({after / before - 1:+.1%}); batch loss "
              f"first {state.losses[1]:.4f} last {state.losses[80]:.4f}; swapped faces {gap_before:+.1%} -> "
              f"{gap_after:+.1%}")
        assert after <= 0.8 * before, f"seed {seed}: held-out loss {before:.4f} -> {after:.4f}"
        assert abs(gap_before) < 0.03 and gap_after >= 0.02 and gap_after > gap_before, (seed, gap_before, gap_after)


def test_the_base_model_is_untouched(modules, model):
    trainable, objective, trainer = modules
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = {k: p.requires_grad for k, p in unet.named_parameters()}
    data, _ = dataset(objective, 4, seed=3)
    adapter = trainable.TrainableAdapter.for_model(model, clip_dim=1024, text_dim=768)
    trainer.train(model, adapter, data, trainer.TrainingSettings(steps=2, batch_size=2, learning_rate=1e-2))
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: p.requires_grad for k, p in unet.named_parameters()} == flags
    assert all(p.grad is None for p in unet.parameters())


def test_resume_continues_the_same_run(modules, model, tmp_path):
    """Stopped after 4 of 8 steps, saved (adapter weights + state file) and resumed in a fresh adapter:
    the same loss curve and the same weights as the run that never stopped."""
    trainable, objective, trainer = modules
    data, _ = dataset(objective, 8, seed=5)
    settings = trainer.TrainingSettings(steps=8, batch_size=2, learning_rate=1e-3, seed=4)

    whole = trainable.TrainableAdapter.for_model(model, clip_dim=1024, text_dim=768, seed=4)
    full = trainer.train(model, whole, data, settings)

    first = trainable.TrainableAdapter.for_model(model, clip_dim=1024, text_dim=768, seed=4)
    half = trainer.train(model, first, data, settings, until=4)
    assert half.step == 4 and sorted(half.losses) == [1, 2, 3, 4]
    trainer.save_state(half, settings, tmp_path / "a.state.pt")
    weights = {k: v.clone() for k, v in first.state_dict().items()}

    second = trainable.TrainableAdapter.for_model(model, clip_dim=1024, text_dim=768, seed=99)  # other init
    second.load_state_dict(weights)
    resumed = trainer.train(model, second, data, settings, resume=trainer.load_state(tmp_path / "a.state.pt", settings))
    assert resumed.losses == full.losses
    for k, v in whole.state_dict().items():
        assert torch.equal(second.state_dict()[k], v), k

    with pytest.raises(ValueError, match="learning_rate: 0.001 then, 0.002 now"):
        trainer.load_state(tmp_path / "a.state.pt", trainer.TrainingSettings(steps=8, batch_size=2,
                                                                               learning_rate=2e-3, seed=4))
    (tmp_path / "junk.state.pt").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="not a FaceStudio training state"):
        trainer.load_state(tmp_path / "junk.state.pt", settings)


def test_settings_are_checked(modules):
    trainer = modules[2]
    for bad, message in (({"optimizer": "Lion"}, "Unknown optimizer 'Lion'"), ({"steps": 0}, "'steps' must be"),
                         ({"learning_rate": 0.0}, "'learning_rate' must be above 0"),
                         ({"style_dropout": 1.5}, "'style_dropout' is a probability")):
        with pytest.raises(ValueError, match=message):
            trainer.TrainingSettings(**bad)


def test_a_few_sdxl_steps_train_and_the_file_runs_on_sdxl(modules, booted, tmp_path):
    """On the small SDXL UNet (SDXL's 70 cross-attention positions, its `y` from the model's own
    encode_adm): 2 steps change the adapter, the file saved from it loads as an SDXL FaceStudio adapter
    and routes two persons on that UNet through a sampling step."""
    import comfy.sample
    import numpy as np
    from facestudio_testing import face_models as fm
    from facestudio_testing import tiny_sdxl
    from facestudio_testing.identity_modules import identity_modules

    trainable, objective, trainer = modules
    model = tiny_sdxl.load_unet()
    (context, extra), = tiny_sdxl.conditioning(seed=3, batch=2)
    gen = torch.Generator().manual_seed(0)
    faces = torch.nn.functional.normalize(torch.randn(2, 512, generator=gen), dim=-1)
    data = objective.TrainingBatch(torch.randn(2, 4, 8, 8, generator=gen), context, extra["pooled_output"],
                                   torch.randn(2, 1280, generator=gen), faces)
    adapter = trainable.TrainableAdapter.for_model(model, clip_dim=1280, text_dim=1280, seed=0)
    assert len(adapter.positions) == 70
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    state = trainer.train(model, adapter, data, trainer.TrainingSettings(steps=2, batch_size=1, learning_rate=1e-3))
    assert all(np.isfinite(v) for v in state.losses.values()) and len(state.losses) == 2
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("fusion.") for k in changed) and any(k.startswith("to_k_ip.") for k in changed)

    analyzer = booted.pack_module("encoders.faces").load_face_analyzer(fm.tiny_pack(), providers="cpu")
    meta = booted.pack_module("attention.facestudio_metadata").FaceStudioMetadata(
        base_model="SDXL", recognizer=analyzer.recognizer_id, clip_vision={"image_embeds_width": 1280},
        text_encoder={"pooled_width": 1280}, num_tokens=4, training={"steps_done": 2, "examples": 2})
    path = booted.pack_module("training.adapter_file").save_adapter(adapter, meta, tmp_path / "sdxl.safetensors")
    weights = booted.pack_module("attention.adapters").load_adapter(str(path))
    assert (weights.kind.value, weights.base_model, weights.layer_count, weights.text_width) == ("facestudio", "SDXL", 70, 1280)

    ident = identity_modules(booted)
    people = [ident.multishot.encode_identity(analyzer, [fm.tiny_face_image(cells).astype(np.float32) / 255.0], cache=None)
              for cells in (((6, 6, "white"),), ((8, 5, "green"),))]
    add = booted.pack_module("attention.persons").add_person
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1
    persons = add(add(None, people[0], left), people[1], 1 - left)
    patched = booted.pack_module("attention.patch").apply_facestudio(model, weights, persons,
                                                                     prompt_embeds=extra["pooled_output"][:1])
    latent = torch.zeros(1, 4, 8, 8)
    positive, negative = tiny_sdxl.conditioning(seed=3), tiny_sdxl.conditioning(seed=4)
    routed = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), 1, 4.0, "euler", "normal", positive,
                                 negative, latent, denoise=1.0, seed=0)
    plain = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), 1, 4.0, "euler", "normal", positive,
                                negative, latent, denoise=1.0, seed=0)
    assert torch.isfinite(routed).all() and not torch.equal(routed, plain)
