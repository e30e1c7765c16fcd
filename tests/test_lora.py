"""FaceID's companion LoRA: the release-format paired file through the host's own LoRA loader, and
FaceStudio Apply's lora_strength (from the adapter file's LoRA, or else the paired file)."""
from __future__ import annotations

import collections
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from facestudio_testing import adapter_files as af

from facestudio_testing.sd15_apply import apply, base, identity, person, run_latent

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")

FACEID_NO_LORA = "fs_lora_faceid_sd15.safetensors"   # the adapter without its LoRA keys
PAIRED = "fs_lora_faceid_sd15_lora.safetensors"       # ... and its release-named companion
EXPECTED_MODULES = 16 * 2 * 4                         # 16 positions x (attn1, attn2) x (q, k, v, out)


def release_lora(nested: dict, unet_config: dict) -> dict[str, torch.Tensor]:
    """The adapter's LoRA as the release '<adapter>_lora.safetensors' files name it: kohya keys over
    diffusers module paths (lora_unet_down_blocks_0_attentions_0_..._attn1_to_q.lora_down.weight)."""
    import comfy.utils

    to_host = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> host key
    diffusers = {host: key for key, host in to_host.items()}
    attn2 = sorted({k.rsplit(".attn2.", 1)[0] for k in to_host.values() if ".attn2.to_k." in k}, key=_host_order)
    assert len(attn2) == 16
    out = {}
    for n, block in enumerate(attn2):
        for index, attn in ((2 * n, "attn1"), (2 * n + 1, "attn2")):
            for ours, host in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
                name = diffusers[f"{block}.{attn}.{host}.weight"][:-len(".weight")].replace(".", "_")
                for part in ("down", "up"):
                    out[f"lora_unet_{name}.lora_{part}.weight"] = nested["ip_adapter"][f"{index}.{ours}_lora.{part}.weight"]
    return out


def _host_order(block: str):
    # diffusers' processor order: input blocks, output blocks, then the middle block.
    kind, rest = block.split(".", 1)
    rank = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}[kind]
    return (rank, [int(p) if p.isdigit() else p for p in rest.split(".")])


@pytest.fixture(scope="module")
def lora_setup(comfy_host, booted, setup):
    import comfy.sd
    import folder_paths

    nested = af.shared_state_dict("faceid", af.SD15)
    model = comfy.sd.load_checkpoint_guess_config(str(booted.models / "checkpoints" / setup), output_vae=False,
                                                  output_clip=False)[0]
    loras = booted.models / "loras"
    loras.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in release_lora(nested, model.model.model_config.unet_config).items()},
              str(loras / PAIRED))
    stripped = {"image_proj": nested["image_proj"],
                "ip_adapter": {k: v for k, v in nested["ip_adapter"].items() if "_lora." not in k}}
    written = af.write_adapter(booted.models / "ipadapter" / FACEID_NO_LORA, stripped)
    for folder in ("loras", "ipadapter"):
        folder_paths.filename_list_cache.pop(folder, None)
    yield setup
    (loras / PAIRED).unlink()
    written.unlink()
    for folder in ("loras", "ipadapter"):
        folder_paths.filename_list_cache.pop(folder, None)


def test_the_paired_file_loads_fully_through_the_hosts_lora_loader(comfy_host, lora_setup, caplog):
    g = base(lora_setup)
    node = g.insert_model_node("LoraLoaderModelOnly", {"lora_name": PAIRED, "strength_model": 0.6})
    with caplog.at_level(logging.WARNING):
        result = comfy_host.run(g.prompt)
    assert result.success, result.error
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(comfy_host.output(result, node).patches) == EXPECTED_MODULES


@pytest.mark.parametrize("strength", [0.6, None], ids=["strength-0.6", "default"])
@pytest.mark.parametrize("adapter", ["fs_apply_faceid_sd15.safetensors", FACEID_NO_LORA],
                         ids=["lora-inside-the-adapter", "paired-file"])
def test_lora_strength_equals_the_hosts_lora_loader(comfy_host, lora_setup, adapter, strength):
    """Apply's LoRA at `strength` (None: the node's own default, 1.0) equals the host's LoraLoaderModelOnly at it."""
    by_loader = base(lora_setup)
    by_loader.insert_model_node("LoraLoaderModelOnly", {"lora_name": PAIRED,
                                                        "strength_model": 1.0 if strength is None else strength})
    loaded = apply(by_loader, person(by_loader, identity(by_loader, "fs_apply_a.png", "a")), adapter=adapter)
    by_loader.prompt[loaded]["inputs"]["lora_strength"] = 0.0  # the loader's LoRA only
    by_apply = base(lora_setup)
    node = apply(by_apply, person(by_apply, identity(by_apply, "fs_apply_a.png", "a")), adapter=adapter,
                 lora_strength=strength)
    assert strength is not None or "lora_strength" not in by_apply.prompt[node]["inputs"]
    result = comfy_host.run(by_apply.prompt)
    assert result.success, result.error
    assert comfy_host.output(result, node, 1) == ""  # the LoRA was found: nothing to report
    expected = run_latent(comfy_host, by_loader)
    torch.testing.assert_close(comfy_host.output(result, by_apply["sampler"])["samples"], expected, atol=1e-6, rtol=0)
    if strength is not None:
        by_apply.prompt[node]["inputs"]["lora_strength"] = 0.0
        assert (run_latent(comfy_host, by_apply) - expected).abs().max() > 1e-4  # the LoRA made a difference


def test_the_default_strength_is_one(booted):
    inputs = {i.id: i for i in booted.pack_module("nodes.apply").FaceStudioApply.define_schema().inputs}
    assert inputs["lora_strength"].default == 1.0 and inputs["lora_strength"].optional
    outputs = booted.pack_module("nodes.apply").FaceStudioApply.define_schema().outputs
    assert [o.display_name for o in outputs] == ["model", "report"]  # report added last: saved links keep slot 0


def test_a_chained_apply_adds_the_lora_once(comfy_host, lora_setup):
    chained = base(lora_setup)
    apply(chained, person(chained, identity(chained, "fs_apply_a.png", "a")))
    second = apply(chained, person(chained, identity(chained, "fs_apply_b.png", "b"), 0.8))
    joint = base(lora_setup)
    first = person(joint, identity(joint, "fs_apply_a.png", "a"))
    apply(joint, person(joint, identity(joint, "fs_apply_b.png", "b"), 0.8, persons=first))
    result = comfy_host.run(chained.prompt)
    assert result.success, result.error
    patches = comfy_host.output(result, second).patches
    assert len(patches) == EXPECTED_MODULES and all(len(p) == 1 for p in patches.values())
    torch.testing.assert_close(comfy_host.output(result, chained["sampler"])["samples"],
                               run_latent(comfy_host, joint), atol=1e-5, rtol=0)


def test_no_lora_anywhere_runs_and_reports_where_it_looked(comfy_host, lora_setup, booted, caplog):
    import folder_paths

    paired = booted.models / "loras" / PAIRED
    hidden = paired.rename(paired.with_suffix(".off"))
    folder_paths.filename_list_cache.pop("loras", None)
    try:
        without = base(lora_setup)
        off = apply(without, person(without, identity(without, "fs_apply_a.png", "a")), adapter=FACEID_NO_LORA)
        without.prompt[off]["inputs"]["lora_strength"] = 0.0
        g = base(lora_setup)
        node = apply(g, person(g, identity(g, "fs_apply_a.png", "a")), adapter=FACEID_NO_LORA)  # default 1.0
        with caplog.at_level(logging.WARNING):
            result = comfy_host.run(g.prompt)
        assert result.success, result.error
        report = comfy_host.output(result, node, 1)
        assert FACEID_NO_LORA in report and f"'{PAIRED}' is not in the loras folders" in report
        assert "to_q_lora" in report and str(booted.models / "loras") in report
        assert any(report in r.getMessage() for r in caplog.records)
        torch.testing.assert_close(comfy_host.output(result, g["sampler"])["samples"],
                                   run_latent(comfy_host, without), atol=0, rtol=0)  # ran, without the LoRA
    finally:
        hidden.rename(paired)
        folder_paths.filename_list_cache.pop("loras", None)


@pytest.mark.parametrize("kind", ["faceid-portrait", "faceid-portrait-unnorm"])
def test_portrait_has_no_lora_and_no_report(comfy_host, lora_setup, booted, kind, caplog):
    import folder_paths

    name = f"fs_lora_{kind}_sd15.safetensors"
    written = af.write_adapter(booted.models / "ipadapter" / name, af.shared_state_dict(kind, af.SD15))
    folder_paths.filename_list_cache.pop("ipadapter", None)
    try:
        g = base(lora_setup)
        node = apply(g, person(g, identity(g, "fs_apply_a.png", "a")), adapter=name)
        g.prompt[g.prompt[node]["inputs"]["adapter"][0]]["inputs"]["kind"] = kind
        with caplog.at_level(logging.WARNING):
            result = comfy_host.run(g.prompt)
        assert result.success, result.error
        assert comfy_host.output(result, node, 1) == ""
        assert not comfy_host.output(result, node).patches
        assert not [r for r in caplog.records if "LoRA" in r.getMessage()]
    finally:
        written.unlink()
        folder_paths.filename_list_cache.pop("ipadapter", None)


def test_a_lora_for_another_model_is_refused(booted, lora_setup):
    import comfy.sd

    lora = booted.pack_module("attention.lora")
    adapters = booted.pack_module("attention.adapters")
    model = comfy.sd.load_checkpoint_guess_config(str(booted.models / "checkpoints" / lora_setup), output_vae=False,
                                                  output_clip=False)[0]
    positions = booted.pack_module("attention.layers").cross_attention_positions(model)
    adapter = adapters.load_adapter(str(booted.models / "ipadapter" / "fs_apply_faceid_sd15.safetensors"))
    state = lora.embedded_lora_state_dict(adapter, positions)
    assert len(state) == 2 * EXPECTED_MODULES
    assert len(lora.lora_patches(model, state, "x")) == EXPECTED_MODULES
    wrong = dict(state)
    key = next(k for k in state if k.endswith("attn2_to_k.lora_down.weight"))
    wrong[key] = torch.zeros(state[key].shape[0], 5)
    with pytest.raises(adapters.AdapterError, match="made for another model"):
        lora.lora_patches(model, wrong, "other.safetensors")
    extra = {**state, "lora_unet_nowhere_to_q.lora_down.weight": state[key],
             "lora_unet_nowhere_to_q.lora_up.weight": state[key.replace("down", "up")]}
    with pytest.raises(adapters.AdapterError, match="lora_unet_nowhere_to_q"):
        lora.lora_patches(model, extra, "other.safetensors")


# --- the adapter's LoRA numbering, against the official layout and diffusers' own conversion ---------
# The official IPAdapterFaceID builds one LoRA processor per entry of diffusers' `unet.attn_processors` and saves
# `torch.nn.ModuleList(unet.attn_processors.values())` as `ip_adapter`, so a key's number is its processor's
# place in that order (tencent-ailab/IP-Adapter ip_adapter/ip_adapter_faceid.py, set_ip_adapter and
# load_ip_adapter). Everything expected below comes from diffusers and the host, never from attention/lora.py.

OFFICIAL_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}  # LoRA -> module


def official_faceid_ip_adapter(unet, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """`ip_adapter` as the official FaceID code saves it for `unet` (a diffusers UNet): LoRAAttnProcessor /
    LoRAIPAttnProcessor tensors (attention_processor_faceid.py: down [rank, in], up [hidden, rank]) under each
    processor's index, every tensor random so each index is recognisable; to_k_ip / to_v_ip only for the shapes."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for index, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden, kv_in = attn.to_q.in_features, attn.to_k.in_features
        for proj, inp in (("to_q", hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
            state[f"{index}.{proj}_lora.down.weight"] = torch.randn(rank, inp, generator=gen).half()
            state[f"{index}.{proj}_lora.up.weight"] = torch.randn(hidden, rank, generator=gen).half()
        if name.endswith(".attn2.processor"):
            for ip in ("to_k_ip", "to_v_ip"):  # a broadcast zero: real shapes without SDXL's 1.4 GB
                state[f"{index}.{ip}.weight"] = torch.zeros((), dtype=torch.float16).expand(hidden, kv_in)
    return state


def _fingerprint(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.contiguous().cpu().numpy().tobytes()


@pytest.fixture(scope="module")
def official_layouts():
    """{name: (diffusers UNet, host MODEL)} on the meta device, real SD1.5 and SDXL structure."""
    from facestudio_testing import meta_models

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (meta_models.diffusers_unet(name), meta_models.comfy_model(name))
        return cache[name]
    return get


@pytest.mark.parametrize("name, base", [("sd15", af.SD15), ("sdxl", af.SDXL)])
def test_each_lora_index_lands_on_its_official_module(booted, official_layouts, tmp_path, name, base):
    import comfy.lora
    import comfy.utils

    lora = booted.pack_module("attention.lora")
    unet, model = official_layouts(name)
    ip_adapter = official_faceid_ip_adapter(unet)
    path = tmp_path / f"ip-adapter-faceid_{name}.bin"  # the release layout: a nested torch.save
    image_proj = af.shared_state_dict("faceid", base)["image_proj"]
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, path)
    adapter = booted.pack_module("attention.adapters").load_adapter(str(path))
    positions = booted.pack_module("attention.layers").cross_attention_positions(model)
    assert 2 * len(positions) == len(unet.attn_processors) == {"sd15": 32, "sdxl": 140}[name]
    patches, source = lora.faceid_lora(model, adapter, positions)
    assert source == f"the LoRA inside {path.name}"

    # 1. The official numbering, module by module: index i is the i-th processor; its diffusers module goes to
    #    the host weight through the host's own diffusers -> host key map.
    to_host = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    by_value = {_fingerprint(t): key for key, t in ip_adapter.items() if "_lora." in key}
    assert len(by_value) == len(ip_adapter) - 2 * len(positions)  # every LoRA tensor tells its key apart
    expected = {}
    for index, processor in enumerate(unet.attn_processors):
        module = processor.removesuffix(".processor")
        for proj, target in OFFICIAL_PROJECTIONS.items():
            host_key = "diffusion_model." + to_host[f"{module}.{target}.weight"]
            expected[host_key] = (index, proj)
            assert host_key in patches, f"{module}.{target} ({host_key}) got no LoRA"
            for part, tensor in zip(("up", "down"), patches[host_key].weights[:2]):
                landed = by_value.get(_fingerprint(tensor), "a tensor not from the file")
                assert landed == f"{index}.{proj}_lora.{part}.weight", \
                    f"{module}.{target} ({host_key}) got {landed}, not index {index}'s {proj}_lora.{part}.weight"
            assert patches[host_key].weights[2] is None  # no alpha: the official LoRALinearLayer has no network_alpha
    assert set(patches) == set(expected)  # every processor's q, k, v, out, and nothing else
    # q, k, v and out.0 of each position's self- and cross-attention, as both official processors change.
    covered = collections.Counter(re.search(r"\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)\.weight$", k).groups()
                                  for k in expected)
    assert covered == {(a, t): len(positions) for a in ("attn1", "attn2") for t in OFFICIAL_PROJECTIONS.values()}

    # 2. diffusers' own FaceID LoRA conversion (UNet2DConditionModel._load_ip_adapter_loras, which
    #    load_ip_adapter hands to load_lora_weights) read by the host's own diffusers-LoRA key map.
    converted = unet._load_ip_adapter_loras([{"image_proj": image_proj, "ip_adapter": ip_adapter}])[0]
    assert len(converted) == adapter.lora_key_count == 8 * len(unet.attn_processors)
    reference = comfy.lora.load_lora(converted, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    assert set(reference) == set(patches)
    for key, patch in reference.items():
        for ours, theirs in zip(patches[key].weights[:2], patch.weights[:2]):
            assert torch.equal(ours, theirs), key

    # 3. The host takes the patches onto a MODEL clone as it does any LoRA's (Apply's add_patches).
    clone = model.clone()
    assert set(clone.add_patches(patches, 1.0)) == set(expected)
