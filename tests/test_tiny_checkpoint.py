"""The generated tiny SD1.5 checkpoint is what later tests assume: the host loads it as SD1.5,
cross-attention sits where SD1.5 has it, and its outputs depend on input, prompt and weights
(a model whose output is constant would make every comparison test pass vacuously)."""
from __future__ import annotations

import pytest
import safetensors
import torch

from facestudio_testing import graphs, tiny_models

# SD1.5's cross-attention layers, written out rather than derived from the generator.
SD15_ATTN2 = (
    [f"input_blocks.{i}.1.transformer_blocks.0.attn2" for i in (1, 2, 4, 5, 7, 8)]
    + ["middle_block.1.transformer_blocks.0.attn2"]
    + [f"output_blocks.{i}.1.transformer_blocks.0.attn2" for i in range(3, 12)]
)


@pytest.fixture(scope="module")
def sd15_run(comfy_host, tiny_sd15):
    """One 2-step run (seed 0); its graph and result hold the loaded MODEL, CLIP and VAE."""
    graph = graphs.txt2img(tiny_sd15, output="latent", seed=0)
    result = comfy_host.run(graph.prompt)
    assert result.success, result.error
    return graph, result


def latent_of(comfy_host, graph, result) -> torch.Tensor:
    return comfy_host.output(result, graph["sampler"])["samples"]


def test_loads_as_sd15(comfy_host, sd15_run):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models

    graph, result = sd15_run
    model = comfy_host.output(result, graph["checkpoint"], 0)
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert isinstance(model.model.latent_format, comfy.latent_formats.SD15)
    config = model.model.model_config.unet_config
    assert (config["model_channels"], config["context_dim"]) == (320, 768)
    assert config["transformer_depth_middle"] == 1
    vae = comfy_host.output(result, graph["checkpoint"], 2)
    assert type(vae.first_stage_model).__name__ == "TAESD"


def test_every_stored_tensor_is_loaded_and_nothing_is_missing(comfy_host, sd15_run, tiny_sd15_file):
    graph, result = sd15_run
    model, clip, vae = (comfy_host.output(result, graph["checkpoint"], i) for i in range(3))
    with safetensors.safe_open(str(tiny_sd15_file), "pt") as f:
        keys = set(f.keys())

    def under(prefix, new_prefix=""):
        return {new_prefix + k[len(prefix):] for k in keys if k.startswith(prefix)}

    assert under("model.diffusion_model.") == set(model.model.diffusion_model.state_dict())
    assert under("first_stage_model.") == set(vae.first_stage_model.state_dict())
    # The host itself tolerates exactly these two missing (SD1.5 files never had them).
    assert set(clip.cond_stage_model.state_dict()) - under("cond_stage_model.transformer.", "clip_l.transformer.") \
        == {"clip_l.transformer.text_projection.weight", "clip_l.logit_scale"}
    assert under("cond_stage_model.transformer.", "clip_l.transformer.") <= set(clip.cond_stage_model.state_dict())
    # The real SD1.5 single-file layout: nothing outside its three prefixes.
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.transformer.text_model.", "first_stage_model."))
               for k in keys)


def test_norm_weights_are_one_after_loading(comfy_host, sd15_run):
    graph, result = sd15_run
    model = comfy_host.output(result, graph["checkpoint"], 0)
    norms = [m for m in model.model.diffusion_model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert len(norms) > 50
    for norm in norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_cross_attention_at_sd15_positions(comfy_host, sd15_run):
    graph, result = sd15_run
    unet = comfy_host.output(result, graph["checkpoint"], 0).model.diffusion_model
    attn2 = {name: m for name, m in unet.named_modules() if name.endswith(".attn2")}
    assert sorted(attn2) == sorted(SD15_ATTN2)
    assert len(attn2) == 16
    assert all(m.to_k.in_features == 768 for m in attn2.values())
    # The generator's own list (for patch keys) names the same blocks.
    block_names = {"input": "input_blocks.{}", "middle": "middle_block", "output": "output_blocks.{}"}
    assert sorted(
        block_names[kind].format(i) + ".1.transformer_blocks.0.attn2" for kind, i in tiny_models.SD15_CROSS_ATTENTION_BLOCKS
    ) == sorted(SD15_ATTN2)


@pytest.mark.smoke
def test_two_step_sampling_gives_a_finite_latent(comfy_host, sd15_run):
    graph, result = sd15_run
    latent = latent_of(comfy_host, graph, result)
    assert latent.shape == (1, 4, 8, 8)
    assert torch.isfinite(latent).all()
    assert latent.std() > 0.1


def test_latent_changes_with_seed_and_prompt(comfy_host, sd15_run):
    graph, result = sd15_run
    base = latent_of(comfy_host, graph, result)
    other_seed = graph.copy().set("sampler", seed=1)
    other_prompt = graph.copy().set("positive", text="an oil painting of a lighthouse")
    for variant in (other_seed, other_prompt):
        run = comfy_host.run(variant.prompt)
        assert run.success, run.error
        latent = latent_of(comfy_host, variant, run)
        assert torch.isfinite(latent).all()
        # Far above float noise: the prompt reaches the UNet only through cross-attention.
        assert (latent - base).abs().mean() > 1e-2 * base.abs().mean()


def test_unet_output_changes_with_input_and_weights(comfy_host, sd15_run):
    graph, result = sd15_run
    unet = comfy_host.output(result, graph["checkpoint"], 0).model.diffusion_model
    generator = torch.Generator().manual_seed(123)
    x, x2 = torch.randn(2, 1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 768, generator=generator)
    timesteps = torch.tensor([500.0])

    prefix = tiny_models.UNET_PREFIX
    # Stored fp16, used as the host does (fp32), swapped in only for this call.
    other_weights = {k[len(prefix):]: v.float() for k, v in tiny_models.state_dict(seed=1, prefixes=(prefix,)).items()}
    assert other_weights.keys() == unet.state_dict().keys()

    with torch.no_grad():
        out = unet(x, timesteps, context=context)
        out_input = unet(x2, timesteps, context=context)
        out_weights = torch.func.functional_call(unet, other_weights, (x, timesteps), {"context": context})
    # Activations stay at a sane scale: not vanishing, not exploding.
    assert 0.05 < out.std() < 20
    assert torch.isfinite(out).all()
    for changed in (out_input, out_weights):
        assert (changed - out).abs().mean() > 0.05 * out.abs().mean()


def test_a_model_node_spliced_before_the_sampler_is_used(comfy_host, sd15_run):
    """graphs.Graph.insert_model_node, which later tests use to put the pack's nodes in."""
    graph, result = sd15_run
    spliced = graph.copy()
    node = spliced.insert_model_node("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False})
    assert spliced.prompt[node]["inputs"]["model"] == [graph["checkpoint"], 0]
    assert spliced.model == [node, 0]
    run = comfy_host.run(spliced.prompt)
    assert run.success, run.error
    # A different parameterisation of the same UNet output: the latent must change.
    assert not torch.allclose(latent_of(comfy_host, spliced, run), latent_of(comfy_host, graph, result))
