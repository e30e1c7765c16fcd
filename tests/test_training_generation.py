"""A trained FaceStudio adapter, saved, loaded and sampled with: the identity decides what the image
takes, in each person's own region.

Trained once for the module (80 steps, about 40 s) on the tiny SD1.5 checkpoint and a synthetic dataset:
8x8 latents (64 px images) whose every value is offset by +OFFSET for person A and -OFFSET for person B
(in the model's latent space) over a smooth random background, with the two persons' real face
embeddings (the tiny face pack's recognizer on two tiny face photos), one caption for all (encoded by
the checkpoint's own CLIP) and random face-masked image embeddings. So only the face tells which way
the picture goes. Generation is the host's own sampling (KSampler's comfy.sample.sample, euler, 8 steps,
cfg 4) from the same noise for A and B.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facestudio_testing import face_models as fm
from facestudio_testing import graphs
from facestudio_testing.identity_modules import identity_modules

OFFSET = 1.5
LATENT_SCALE = 0.18215  # SD1.5's: the dataset's latents are in the VAE's format, as the trainer takes them
# The trained separation of A from B in the VAE's latent format: what a perfect adapter would give.
SEPARATION = 2 * OFFSET / LATENT_SCALE
CAPTION, NEGATIVE = "a photo of a person", "blurry"
ADAPTER = "fs_trained_sd15.safetensors"
PHOTOS = {"fs_train_a.png": ((6, 6, "white"),), "fs_train_b.png": ((8, 5, "green"),)}
SAMPLING = {"steps": 8, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal"}


@pytest.fixture(scope="module")
def parts(booted, tiny_sd15, tiny_sd15_file):
    """The model, its CLIP's caption encodings, the two identities, the trained adapter file (in
    models/ipadapter) and its loaded weights."""
    import comfy.sd
    import folder_paths

    model, clip = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_file), output_vae=False, output_clip=True)[:2]
    analyzer = booted.pack_module("encoders.faces").load_face_analyzer(fm.tiny_pack(), providers="cpu")
    ident = identity_modules(booted)
    packs = booted.models / "insightface" / "models"
    packs.mkdir(parents=True, exist_ok=True)
    if not (packs / fm.TINY_PACK).exists():
        (packs / fm.TINY_PACK).symlink_to(fm.tiny_pack(), target_is_directory=True)
    inputs = booted.base / "input"
    inputs.mkdir(exist_ok=True)
    people = []
    for name, cells in PHOTOS.items():
        photo = fm.tiny_face_image(cells)
        Image.fromarray(photo).save(inputs / name)
        people.append(ident.multishot.encode_identity(analyzer, [photo.astype(np.float32) / 255.0], cache=None))
    prompts = {text: clip.encode_from_tokens(clip.tokenize(text), return_pooled=True) for text in (CAPTION, NEGATIVE)}

    objective, trainer = booted.pack_module("training.objective"), booted.pack_module("training.trainer")
    trainable, adapter_file = booted.pack_module("training.trainable_adapter"), booted.pack_module("training.adapter_file")
    metadata = booted.pack_module("attention.facestudio_metadata")
    data = dataset(objective, people, *prompts[CAPTION], count=16, seed=10)
    adapter = trainable.TrainableAdapter.for_model(model, clip_dim=1024, text_dim=768, seed=0)
    settings = trainer.TrainingSettings(steps=80, batch_size=2, learning_rate=2e-3, seed=0)
    trainer.train(model, adapter, data, settings)
    meta = metadata.FaceStudioMetadata(
        base_model="SD1.5", recognizer=analyzer.recognizer_id,
        clip_vision={"name": "random image embeds", "image_embeds_width": 1024},
        text_encoder={"name": "tiny checkpoint's CLIP-L", "pooled_width": 768}, num_tokens=4,
        training={**settings.as_dict(), "steps_done": 80, "examples": len(data), "resolution": 64},
        dataset_licence="synthetic (test)", face_models_licence="tiny test pack")
    path = adapter_file.save_adapter(adapter, meta, booted.models / "ipadapter" / ADAPTER)
    folder_paths.filename_list_cache.pop("ipadapter", None)
    weights = booted.pack_module("attention.adapters").load_adapter(str(path))
    yield model, prompts, people, weights, adapter
    path.unlink()
    folder_paths.filename_list_cache.pop("ipadapter", None)


def dataset(objective, people, context, pooled, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    who = torch.arange(count) % 2
    background = torch.nn.functional.interpolate(torch.randn(count, 4, 2, 2, generator=gen), size=(8, 8),
                                                 mode="bilinear", align_corners=False) * 0.5
    latents = background + torch.where(who == 0, OFFSET, -OFFSET)[:, None, None, None]
    faces = torch.stack([torch.from_numpy(np.array(p.embedding)) for p in people])[who]
    faces = faces + 0.05 * torch.randn(count, 512, generator=gen)  # shots of one person differ a little
    return objective.TrainingBatch(latents / LATENT_SCALE, context.expand(count, -1, -1).clone(),
                                   pooled.expand(count, -1).clone(), torch.randn(count, 1024, generator=gen),
                                   faces / faces.norm(dim=-1, keepdim=True))


def sample(booted, parts, persons, seed: int, blend: float = 0.5) -> torch.Tensor:
    import comfy.sample

    model, prompts, _, weights, _ = parts
    (cond, pooled), (ncond, npooled) = prompts[CAPTION], prompts[NEGATIVE]
    patched = booted.pack_module("attention.patch").apply_facestudio(model, weights, persons, prompt_embeds=pooled,
                                                                     blend=blend)
    latent = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, seed), SAMPLING["steps"], SAMPLING["cfg"],
                               SAMPLING["sampler_name"], SAMPLING["scheduler"], [[cond, {"pooled_output": pooled}]],
                               [[ncond, {"pooled_output": npooled}]], latent, denoise=1.0, seed=seed)


def test_the_file_is_recognised_with_what_it_was_trained_with(parts, booted):
    _, _, people, weights, adapter = parts
    adapters = booted.pack_module("attention.adapters")
    assert weights.kind is adapters.AdapterKind.FACESTUDIO
    assert (weights.base_model, weights.layer_count, weights.num_tokens) == ("SD1.5", len(adapter.positions), 4)
    assert (weights.clip_width, weights.text_width, weights.id_embedding_width) == (1024, 768, 512)
    assert weights.facestudio.recognizer == people[0].recognizer
    assert weights.facestudio.training["steps_done"] == 80
    assert weights.facestudio.dataset_licence == "synthetic (test)"
    described = weights.describe()
    assert "trained 80 steps on 16 images" in described and "dataset synthetic (test)" in described
    # The tokens Apply computes from the file are the trained module's own.
    projection = booted.pack_module("attention.projection")
    face = torch.from_numpy(np.array(people[0].embedding))[None]
    text = torch.randn(1, 768)
    image = torch.randn(1, 1024)
    expected = 0.3 * adapter.fusion.image_identity(image, face) + 0.7 * adapter.fusion.text_identity(text, face)
    assert torch.allclose(projection.facestudio_tokens(weights, face, text, image, 0.3), expected, atol=1e-6)


def test_identity_a_and_b_give_images_that_differ_in_the_trained_direction(parts, booted):
    """The statistic: the mean of the sampled latent with A minus that with B (the same noise), over the
    trained separation (2 x OFFSET in the VAE's latent format). Measured: about 0.23 on each of 3 seeds;
    asserted above 0.1 on every seed. Without the adapter A and B are the same picture (0)."""
    add = booted.pack_module("attention.persons").add_person
    people = parts[2]
    for seed in range(3):
        a, b = (sample(booted, parts, add(None, p), seed) for p in people)
        shift = float(a.mean() - b.mean()) / SEPARATION
        print(f"seed {seed}: mean A {float(a.mean()):+.3f}, B {float(b.mean()):+.3f}, (A - B) / separation {shift:+.3f}")
        assert shift > 0.1, (seed, shift)


def test_two_persons_are_routed_to_their_own_halves(parts, booted):
    """A on the left half and B on the right, against B left and A right, from the same noise: the left
    half's mean minus the right half's rises when A is on the left. The statistic, over the trained
    separation, asserted above 0.05 on each of 3 seeds (the noise's own layout cancels in the difference)."""
    add = booted.pack_module("attention.persons").add_person
    a, b = parts[2]
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1
    for seed in range(3):
        ab = sample(booted, parts, add(add(None, a, left), b, 1 - left), seed)
        ba = sample(booted, parts, add(add(None, b, left), a, 1 - left), seed)
        gap = ((ab[..., :4].mean() - ab[..., 4:].mean()) - (ba[..., :4].mean() - ba[..., 4:].mean())) / SEPARATION
        print(f"seed {seed}: A-left minus B-left, left-right contrast / separation {float(gap):+.3f}")
        assert gap > 0.05, (seed, float(gap))


def test_the_blend_moves_the_tokens_between_the_image_and_text_paths(parts, booted):
    """Apply's blend is the paper's a: a person's tokens at a are a*e_i + (1-a)*e_p of the style image's
    image_embeds and the prompt's pooled embedding, the uncond side the same of a zero face; blend 1
    without a prompt guides by the image alone; without a prompt and below 1 it says what to connect."""
    model, prompts, people, weights, adapter = parts
    patch, persons = booted.pack_module("attention.patch"), booted.pack_module("attention.persons")
    style = booted.pack_module("encoders.style").StyleEncoding(
        image_embeds=torch.randn(1, 1024), penultimate_hidden_states=torch.randn(1, 5, 16), clip_width=16,
        masked_faces=(1,), unconditional_hidden_states=torch.randn(1, 5, 16))
    one = persons.add_person(None, people[0])
    pooled = prompts[CAPTION][1].float()
    face = torch.from_numpy(np.array(people[0].embedding))[None]
    fusion = adapter.fusion
    with torch.no_grad():
        for blend in (0.0, 0.4, 1.0):
            (cond, uncond), = patch.persons_tokens(weights, one, style=style, prompt_embeds=pooled, blend=blend)
            for f, tokens in ((face, cond), (torch.zeros_like(face), uncond)):
                expected = blend * fusion.image_identity(style.image_embeds, f) + (1 - blend) * fusion.text_identity(pooled, f)
                assert torch.allclose(tokens, expected, atol=1e-5), blend
        (cond, _), = patch.persons_tokens(weights, one, style=style, blend=1.0)
        assert torch.allclose(cond, fusion.image_identity(style.image_embeds, face), atol=1e-5)
    with pytest.raises(ValueError, match="Connect the positive prompt's CONDITIONING"):
        patch.persons_tokens(weights, one, style=style, blend=0.5)
    with pytest.raises(booted.pack_module("attention.adapters").AdapterError, match="pooled text embedding is 1280 wide"):
        patch.persons_tokens(weights, one, prompt_embeds=torch.zeros(1, 1280))


def test_another_recognizers_identity_is_refused(parts, booted):
    """The file records its recognizer's hash: an identity from another 512-wide recognizer (a tiny one of
    other weights) is refused, with what to load instead."""
    model, prompts, _, weights, _ = parts
    pack = fm.ensure_pack("tiny_scrfd_arcface_other", {fm.TINY_DETECTOR: fm.tiny_detector_model,
                                                       fm.TINY_RECOGNIZER: lambda: fm.tiny_recognizer_model(seed=3)})
    analyzer = booted.pack_module("encoders.faces").load_face_analyzer(pack, providers="cpu")
    other = identity_modules(booted).multishot.encode_identity(
        analyzer, [fm.tiny_face_image().astype(np.float32) / 255.0], cache=None)
    assert other.embedding_dim == 512 and other.recognizer.sha256_16 != weights.facestudio.recognizer.sha256_16
    add = booted.pack_module("attention.persons").add_person
    with pytest.raises(booted.pack_module("attention.adapters").AdapterError,
                       match="trained on embeddings of rec_tiny_arcface.onnx"):
        booted.pack_module("attention.patch").apply_facestudio(model, weights, add(None, other),
                                                               prompt_embeds=prompts[CAPTION][1])


def test_the_graph_runs_the_file_through_the_nodes(parts, booted, comfy_host, tiny_sd15):
    """Load Adapter -> Encode Identity -> Person -> Apply (prompt from CLIP Text Encode) -> KSampler in the
    real executor gives the latent the direct call gives."""
    g = graphs.txt2img(tiny_sd15, output="latent", positive=CAPTION, negative=NEGATIVE, seed=1, **SAMPLING)
    g.add("FaceStudioFaceAnalyzerLoader", {"pack": fm.TINY_PACK, "provider": "CPU", "det_size": 640}, "analyzer")
    g.add("LoadImage", {"image": "fs_train_a.png"}, "photo")
    g.add("FaceStudioIdentityEncode", {"face_analyzer": g.link("analyzer"), "image": g.link("photo"),
                                       "face": "largest", "index": 0, "on_missing": "error",
                                       "outlier_threshold": 0.4}, "identity")
    person = g.add("FaceStudioPerson", {"identity": g.link("identity"), "weight": 1.0, "start": 0.0, "end": 1.0,
                                        "mask_index": 0})
    loader = g.add("FaceStudioAdapterLoader", {"adapter_name": ADAPTER, "kind": "auto"})
    g.insert_model_node("FaceStudioApply", {"adapter": [loader, 0], "persons": [person, 0], "alpha": 0.5,
                                            "style_weight": 1.0, "image_text_blend": 0.5, "prompt": g.link("positive")})
    result = comfy_host.run(g.prompt)
    assert result.success, result.error
    latent = comfy_host.output(result, g["sampler"])["samples"]
    direct = sample(booted, parts, booted.pack_module("attention.persons").add_person(None, parts[2][0]), seed=1)
    assert torch.allclose(latent, direct, atol=1e-3), float((latent - direct).abs().max())


def test_a_header_that_is_missing_or_disagrees_is_refused(parts, booted, tmp_path):
    """The tensors alone do not make a FaceStudio adapter: without its header (a .bin copy) or with one
    that disagrees with the tensors, Load Adapter says what is wrong."""
    adapters = booted.pack_module("attention.adapters")
    path = str(booted.models / "ipadapter" / ADAPTER)
    image_proj, ip_adapter = adapters.split_sections(adapters.read_state_dict(path), ADAPTER)
    header = adapters.read_header(path)
    cases = (({"format": "something-else"}, "does not say format 'facestudio-adapter'"),
             ({"format_version": "2"}, "format version 2; this FaceStudio reads up to version 1"),
             ({"num_tokens": "8"}, "header says SD1.5 with 8 tokens, but its tensors are SD1.5's with 4"),
             ({"base_model": "SDXL"}, "header says SDXL"),
             ({"recognizer": None}, "has no 'recognizer'"),
             ({"recognizer": '{"file_name": "x.onnx"}'}, "lacks file_name, sha256_16 or embedding_dim"))
    for change, message in cases:
        edited = {k: v for k, v in {**header, **change}.items() if v is not None}
        with pytest.raises(adapters.AdapterError, match=message):
            adapters.recognise(image_proj, ip_adapter, ADAPTER, header=edited)
    copy = tmp_path / "fs_trained_sd15.bin"
    torch.save({"image_proj": dict(image_proj), "ip_adapter": dict(ip_adapter)}, copy)
    with pytest.raises(adapters.AdapterError, match="a .bin copy loses the header"):
        adapters.load_adapter(str(copy))
