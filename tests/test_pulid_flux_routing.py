"""PuLID-FLUX's identity injection, routed for several persons (issue 16), on a tiny FLUX.1 model the host loads.

The yardstick is the reference's own PerceiverAttentionCA (PuLID clone) on the same random weights:
for one person, a patched block's output must be `img + w * ca(id, img)` on the block's unpatched output.
Block inputs are the real ones: recorded during host sampling (comfy.sample) of the tiny model.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from facestudio_testing import tiny_flux
from facestudio_testing import pulid_flux_reference as reference

LATENT = (1, 16, 16, 16)  # FLUX latent: 16 channels; 8x8 = 64 image tokens
TEXT_TOKENS = 8
BLOCKS = (("double", 2, 1), ("single", 4, 3))  # (kind, block index, its CA module)


@pytest.fixture(scope="module")
def fp(booted):
    return booted.pack_module("attention.flux_patch")


@pytest.fixture(scope="module")
def adapter(booted):
    return booted.pack_module("attention.pulid_flux_adapter")


@pytest.fixture(scope="module")
def flux(booted):
    return tiny_flux.load_tiny_flux()


@pytest.fixture(scope="module")
def weights(adapter):
    return adapter.load_pulid_flux(str(tiny_flux.pulid_flux_file()))


@pytest.fixture(scope="module")
def ref_ca(weights):
    """The reference's CA modules with the file's weights, fp32."""
    ca_class = reference.perceiver_attention_ca()
    modules = []
    for sd in weights.ca:
        m = ca_class(**tiny_flux.TINY_CA)
        m.load_state_dict(sd)
        modules.append(m.float().eval())
    return modules


def sample(model, steps=2, cfg=1.0, seed=0, negative=None, positive=None):
    import comfy.sample

    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))
    positive = positive or tiny_flux.conditioning(1, TEXT_TOKENS)
    negative = negative or tiny_flux.conditioning(2, TEXT_TOKENS)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative,
                               torch.zeros(LATENT), disable_pbar=True, seed=seed)


def dit(model) -> dict:
    return model.model_options["transformer_options"]["patches_replace"]["dit"]


class Recorder:
    """A dit replacement put over a block on the sampled model: at each call, the unpatched block's output and
    each candidate patch's output (and torch op count, in a second, steady-state call) on the very same
    inputs (patches from other Applies); returns the plain one."""

    def __init__(self, candidates: dict):
        self.candidates, self.calls = candidates, []

    def __call__(self, args, extra):
        # The host's blocks add to their input in place (`img += ...`): each run gets its own copy.
        fresh = lambda: {**args, **{k: args[k].clone() for k in ("img", "txt") if k in args}}  # noqa: E731
        with torch.no_grad():
            plain = extra["original_block"](fresh())
            outs, ops = {}, {}
            for name, patch in self.candidates.items():
                patch(fresh(), extra)  # the first call lays out the masks and K/V views (cached per Apply)
                inputs = fresh()
                with OpCounter() as counter:
                    outs[name] = patch(inputs, extra)["img"]
                ops[name] = counter.count
        self.calls.append({"plain": plain["img"], "outs": outs, "ops": ops})
        return extra["original_block"](args)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def person(fp, seed, weight=1.0, mask=None, uncond=False, start=0.0, end=1.0):
    return fp.FluxPerson(tiny_flux.id_tokens(seed), tiny_flux.id_tokens(seed + 100) if uncond else None, weight, mask,
                         start, end)


def recorded(fp, flux, weights, kind, index, candidates: dict[str, list], positive=None):
    """Sample the tiny model (its token-grid wrapper from one Apply) with a Recorder over one block whose
    candidates are that block's patch from an Apply of each person list."""
    base = fp.apply_pulid_flux(flux, weights, [person(fp, 0)])
    patches = {name: dit(fp.apply_pulid_flux(flux, weights, persons))[(f"{kind}_block", index)]
               for name, persons in candidates.items()}
    recorder = Recorder(patches)
    base.set_model_patch_replace(recorder, "dit", f"{kind}_block", index)
    sample(base, steps=1, positive=positive)
    assert recorder.calls, "the host never called the block"
    return recorder.calls[0]


def image_part(kind, img):
    return img if kind == "double" else img[:, TEXT_TOKENS:]


# --- the kernel -----------------------------------------------------------------------------------------
def test_route_persons_is_eq2_with_overlapping_soft_masks(booted):
    from facestudio_testing.reference_attention import attend

    routing = booted.pack_module("attention.routing")
    g = torch.Generator().manual_seed(0)
    heads, d, n = 2, 16, 12
    q = torch.randn(2, n, heads * d, generator=g)
    kv = [(torch.randn(1, t, heads * d, generator=g), torch.randn(1, t, heads * d, generator=g)) for t in (5, 5, 5)]
    w = [0.5, 1.0, 2.0]
    masks = [torch.rand(1, n, generator=g) for _ in kv]
    out = routing.route_persons(q, routing.TokenGroups.build([(k, v, wi) for (k, v), wi in zip(kv, w)], heads), masks)
    total = torch.stack(masks).sum(0).clamp_min(1.0).double()[..., None]  # max(1, sum_j m_j)
    expected = sum(wi * m.double()[..., None] / total * attend(q, k, v, heads) for (k, v), wi, m in zip(kv, w, masks))
    assert (out.double() - expected).abs().max() < 1e-5


# --- the file layout ---------------------------------------------------------------------------------
def test_real_layout_is_read_and_matches_the_reference_modules(adapter):
    sd = tiny_flux.real_pulid_flux_state_dict()
    w = adapter.pulid_flux_weights(sd, "pulid_flux_v0.9.1.safetensors")
    assert len(w.ca) == 20 and w.layout == adapter.FLUX1_CA_LAYOUT
    ref = {k.split(".", 2)[2]: tuple(v.shape) for k, v in sd.items() if k.startswith("pulid_ca.0.")}
    assert adapter.FLUX1_CA_LAYOUT.module_shapes() == ref
    assert set(w.encoder) == {k[len("pulid_encoder."):] for k in sd if k.startswith("pulid_encoder.")}


@pytest.mark.parametrize("variant", [dict(modules=19), dict(dim=6144), dict(kv_dim=1024)])
def test_other_layouts_are_read_from_the_tensors_and_refused_by_apply(fp, adapter, flux, variant):
    """The file says its layout; whether it fits the MODEL is Apply's check, which names both."""
    w = adapter.pulid_flux_weights(tiny_flux.real_pulid_flux_state_dict(**variant), "other.safetensors")
    fields = {"modules": 20, "dim": 3072, "id_dim": 2048, "heads": 16, "dim_head": 128}
    fields.update({"id_dim" if k == "kv_dim" else k: v for k, v in variant.items()})
    assert w.layout == adapter.CALayout(**fields)
    with pytest.raises(fp.PuLIDFluxError, match=r"other.safetensors has \d+ identity cross-attentions.*256 wide"):
        fp.apply_pulid_flux(flux, w, [fp.FluxPerson(torch.zeros(1, 32, w.layout.id_dim))])


def _drop(sd: dict, prefix: str) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


@pytest.mark.parametrize("broken, message", [
    (lambda sd: _drop(sd, "pulid_ca.7."), r"pulid_ca.0..19 without pulid_ca.7: the file is not whole"),
    (lambda sd: {**_drop(sd, "pulid_ca.3."), **{k.replace("pulid_ca.0.", "pulid_ca.3."): v for k, v in
                                                 tiny_flux.real_pulid_flux_state_dict(1, kv_dim=1024).items()
                                                 if k.startswith("pulid_ca.0.")}},
     r"pulid_ca.3.norm1.weight is \(1024,\), but pulid_ca.0's is \(2048,\)"),
    (lambda sd: _drop(sd, "pulid_ca.5.to_out."), r"pulid_ca.5 has not the keys.*missing \['to_out.weight'\]"),
    (lambda sd: tiny_flux.real_pulid_flux_state_dict(dim_head=64, heads=3),
     r"to_q is 192 wide, not a whole number of PuLID's 128-wide heads"),
])
def test_files_that_are_not_whole_are_refused_naming_the_file(adapter, broken, message):
    with pytest.raises(adapter.PuLIDFluxError, match=message) as error:
        adapter.pulid_flux_weights(broken(tiny_flux.real_pulid_flux_state_dict()), "other.safetensors")
    assert "other.safetensors" in str(error.value)


def test_scaled_down_file_is_read_with_its_own_layout(adapter):
    w = adapter.load_pulid_flux(str(tiny_flux.pulid_flux_file()))
    assert w.layout == adapter.CALayout(**tiny_flux.tiny_ca_layout_fields())


def test_not_a_pulid_flux_file(adapter, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ip-adapter-faceid_sd15.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(2, 2), "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(adapter.PuLIDFluxError, match="ip-adapter-faceid_sd15.safetensors is an IP-Adapter"):
        adapter.load_pulid_flux(str(path))


# --- the host -----------------------------------------------------------------------------------------
def test_the_tiny_model_is_a_real_flux_and_reacts(flux):
    import comfy.ldm.flux.model

    assert isinstance(flux.model.diffusion_model, comfy.ldm.flux.model.Flux)
    assert flux.model.model_config.unet_config["image_model"] == "flux"
    a, b = sample(flux, seed=0), sample(flux, seed=1)
    assert not torch.allclose(a, b)  # output depends on the input (norms are not zero)


def test_non_flux_models_are_refused(fp, weights, booted):
    from facestudio_testing import meta_models

    with pytest.raises(fp.PuLIDFluxError, match="PuLID for FLUX.1"):
        fp.apply_pulid_flux(meta_models.comfy_model("tiny-sd15"), weights, [person(fp, 0)])


def test_a_real_layout_file_is_refused_on_the_tiny_width(fp, adapter, flux):
    real = adapter.pulid_flux_weights(tiny_flux.real_pulid_flux_state_dict(), "pulid_flux_v0.9.1.safetensors")
    with pytest.raises(fp.PuLIDFluxError, match="this FLUX model is 256 wide"):
        fp.apply_pulid_flux(flux, real, [fp.FluxPerson(torch.zeros(1, 32, 2048))])


# --- agreement with the reference ------------------------------------------------------------------------
@pytest.mark.parametrize("kind, index, module", BLOCKS)
def test_one_person_agrees_with_the_reference(fp, flux, weights, ref_ca, kind, index, module):
    w = 0.8
    call = recorded(fp, flux, weights, kind, index, {"one": [person(fp, 0, weight=w)]})
    plain, ours = call["plain"], call["outs"]["one"]
    with torch.no_grad():
        x = image_part(kind, plain)
        expected = x + w * ref_ca[module](tiny_flux.id_tokens(0), x)
    diff = (image_part(kind, ours) - expected).abs().max().item()
    print(f"{kind} block {index}: max |ours - reference| = {diff:.3g} (CA output max {expected.sub(x).abs().max():.3g})")
    assert diff < 1e-5
    assert (expected - x).abs().max() > 1e-2  # the identity really acts
    if kind == "single":  # text tokens untouched
        assert torch.equal(ours[:, :TEXT_TOKENS], plain[:, :TEXT_TOKENS])


@pytest.mark.parametrize("kind, index, module", BLOCKS)
def test_two_persons_in_disjoint_regions(fp, flux, weights, kind, index, module):
    left, right = torch.zeros(1, 16, 16), torch.zeros(1, 16, 16)
    left[..., :6], right[..., 10:] = 1.0, 1.0  # token columns 0-2 and 5-7 of the 8x8 grid; 3-4 nobody's
    call = recorded(fp, flux, weights, kind, index, {
        "both": [person(fp, 0, 0.9, left), person(fp, 1, 1.2, right)],
        "a": [person(fp, 0, 0.9)], "b": [person(fp, 1, 1.2)]})
    grid = lambda img: image_part(kind, img).reshape(1, 8, 8, -1)  # noqa: E731
    both, a, b = (grid(call["outs"][n]) for n in ("both", "a", "b"))
    plain = grid(call["plain"])
    da = (both[:, :, :3] - a[:, :, :3]).abs().max().item()
    db = (both[:, :, 5:] - b[:, :, 5:]).abs().max().item()
    print(f"{kind} block {index}: region A vs A alone {da:.3g}, region B vs B alone {db:.3g}")
    assert da < 1e-5 and db < 1e-5
    assert torch.equal(both[:, :, 3:5], plain[:, :, 3:5])  # outside every region: exactly unpatched
    assert (a[:, :, :3] - plain[:, :, :3]).abs().max() > 1e-2


@pytest.mark.parametrize("kind, index, module", BLOCKS)
def test_reference_latent_and_text_tokens_are_left_alone(fp, flux, weights, kind, index, module):
    # A Kontext-style reference latent: the host appends its 4x4 = 16 tokens after the image's 64.
    positive = tiny_flux.conditioning(1, TEXT_TOKENS)
    positive[0][1]["reference_latents"] = [torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))]
    call = recorded(fp, flux, weights, kind, index, {"one": [person(fp, 0)]}, positive=positive)
    plain, ours = call["plain"], call["outs"]["one"]
    text = 0 if kind == "double" else TEXT_TOKENS
    assert plain.shape[1] == text + 64 + 16
    assert torch.equal(ours[:, :text], plain[:, :text]) and torch.equal(ours[:, text + 64:], plain[:, text + 64:])
    assert (ours[:, text:text + 64] - plain[:, text:text + 64]).abs().max() > 1e-2


def test_op_count_does_not_grow_with_persons(fp, flux, weights):
    lists = {n: [person(fp, i, 1.0 / n) for i in range(n)] for n in (1, 2, 4)}
    for kind, index, _ in BLOCKS:
        ops = recorded(fp, flux, weights, kind, index, lists)["ops"]
        print(f"{kind} block {index}: torch ops per patched call {ops}")
        assert len(set(ops.values())) == 1


def test_sigma_range_and_true_cfg(fp, flux, weights):
    plain = sample(fp.apply_pulid_flux(flux, weights, [person(fp, 0, start=0.99, end=1.0)]), steps=2)
    assert torch.equal(plain, sample(flux, steps=2))  # acts at no step of a 2-step schedule: untouched
    with pytest.raises(fp.PuLIDFluxError, match="uncond_tokens"):
        sample(fp.apply_pulid_flux(flux, weights, [person(fp, 0)]), steps=1, cfg=2.0)
    with_uncond = fp.apply_pulid_flux(flux, weights, [person(fp, 0, uncond=True)])
    assert not torch.equal(sample(with_uncond, steps=1, cfg=2.0), sample(flux, steps=1, cfg=2.0))


# --- sampling through the host --------------------------------------------------------------------------
def foreign_replacement(calls: list):
    """Another pack's dit replacement: the block, then a fixed shift of the image stream (a varying one: the next
    block's LayerNorm would take out a constant). A function, so ModelPatcher.clone's deepcopy of the model
    options (0.3.64) keeps this very one and its call list."""
    shift = 0.1 * torch.randn(tiny_flux.TINY_FLUX_PARAMS["hidden_size"], generator=torch.Generator().manual_seed(5))

    def replacement(args, extra):
        calls.append(1)
        out = extra["original_block"](args)
        return {**out, "img": out["img"] + shift}

    return replacement


def test_sampling_patched_differs_and_wraps_a_foreign_replacement(fp, flux, weights):
    persons = [person(fp, 0)]
    unpatched = sample(flux)
    patched_model = fp.apply_pulid_flux(flux, weights, persons)
    assert fp.STORE_KEY in patched_model.additional_models  # the host manages the K/V and CA weights
    patched = sample(patched_model)
    assert not torch.allclose(patched, unpatched, atol=1e-4)

    foreign_model = flux.clone()
    calls = []
    foreign = foreign_replacement(calls)
    foreign_model.set_model_patch_replace(foreign, "dit", "double_block", 0)
    foreign_model.set_model_patch_replace(foreign, "dit", "single_block", 0)
    only_foreign = sample(foreign_model)
    before = len(calls)
    both = sample(fp.apply_pulid_flux(foreign_model, weights, persons))
    assert len(calls) > before  # still runs, under ours
    assert not torch.allclose(both, only_foreign, atol=1e-4) and not torch.allclose(both, patched, atol=1e-4)
    assert "dit" not in flux.model_options.get("transformer_options", {}).get("patches_replace", {})


def test_a_second_apply_wraps_the_first(fp, flux, weights):
    first = fp.apply_pulid_flux(flux, weights, [person(fp, 0)])
    second = fp.apply_pulid_flux(first, weights, [person(fp, 1)])
    assert {fp.STORE_KEY, fp.STORE_KEY + ".1"} <= set(second.additional_models)  # both stores host-managed
    assert dit(second)[("single_block", 4)].wrapped is dit(first)[("single_block", 4)]
    assert len(second.get_wrappers("diffusion_model", fp.GRID_KEY)) == 1
    assert not torch.allclose(sample(second), sample(first), atol=1e-4)
