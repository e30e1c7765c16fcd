"""One FLUX double block and one single block with PuLID-FLUX's identity injection, against the same blocks
unpatched and against the reference's layout (one PerceiverAttentionCA call per person).

    .venv/bin/python bench/bench_flux_blocks.py             # 1024x1024: 4096 image + 512 text tokens (GPU)
    .venv/bin/python bench/bench_flux_blocks.py --quick     # 256x256: 256 image + 128 text tokens (about 7 min on 2 cores)
    options: --device auto|cpu|cuda  --size PX  --text-tokens N  --rounds N  --persons 1,2,4,8  --threads N

The blocks are the host's own (comfy.ldm.flux.layers via a FLUX model of one double and one single block
at FLUX.1's real width 3072, 24 heads, built by the host's FLUX config and seeded random weights), in the
dtype the host picks for the device (bf16 on CUDA, fp32 on CPU). The CA weights are a random file in the
real per-module layout (3072 over 2048-wide ID tokens), loaded through the pack's loader; every person
has random ID tokens [1, 32, 2048] and a left-to-right strip mask. Configurations, timed in interleaved
rounds (C.medians; each call on fresh copies of the inputs: the host's blocks add in place):
- unpatched: the host block alone, the baseline of every ratio;
- FaceStudio: the block replacement apply_pulid_flux installs, N persons in one routed product;
- reference: the block, then per person x += w_hat_i * PerceiverAttentionCA(id_i, x) with the reference's
  module (the PuLID clone) on the same weights.
Peak memory: what the call allocates at its peak, its inputs' copies included (the same for every
configuration); on CUDA torch.cuda.max_memory_allocated, on CPU the profiler's memory events.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

WIDTH, HEADS, ID_WIDTH, ID_TOKENS = 3072, 24, 2048, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256 with 128 text tokens, 3 rounds")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--size", type=int, help="image side in pixels (default 1024, --quick 256); 16 px per token")
    parser.add_argument("--text-tokens", type=int, help="text tokens (default 512, --quick 128)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5, --quick 3)")
    parser.add_argument("--persons", default="1,2,4,8", help="comma-separated person counts")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    size = args.size or (256 if args.quick else 1024)
    if size % 16:
        parser.error("--size must be a multiple of 16 (8x VAE, 2x2 patches)")
    text = args.text_tokens or (128 if args.quick else 512)
    rounds = args.rounds or (3 if args.quick else 5)
    counts = [int(n) for n in args.persons.split(",")]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_device(args.device)
    C.boot_host(device)
    try:
        run(size, text, rounds, counts, device)
    finally:
        C.remove_host()


def build_flux(device: str):
    """A host FLUX.1 model (1 double + 1 single block at the real width) as a ModelPatcher, seeded weights."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux({
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
        "hidden_size": WIDTH, "mlp_ratio": 4.0, "num_heads": HEADS, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [16, 56, 56], "theta": 10_000, "qkv_bias": True, "guidance_embed": True, "patch_size": 2,
        "txt_ids_dims": []})
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device="meta")
    model.diffusion_model.to_empty(device=device)
    C.init_weights_(model.diffusion_model)
    with torch.no_grad():  # the host's RMSNorms (q/k norms) at 1: init_weights_ knows only Group/LayerNorm
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
    model.diffusion_model.to(dtype)
    load = mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=load)


def ca_weights(modules: int, dtype):
    """PuLID-FLUX CA modules in the real layout, random (the pack's loader reads them with their count)."""
    import torch

    from facestudio_testing import tiny_flux
    from facestudio_testing.bootstrap import boot

    adapter = boot().pack_module("attention.pulid_flux_adapter")
    sd = tiny_flux.real_pulid_flux_state_dict(modules)
    generator = torch.Generator().manual_seed(0)
    filled = {}
    for key, t in sd.items():
        if key.startswith("pulid_encoder."):
            filled[key] = torch.zeros(1)  # not read here
        elif "norm" in key:
            filled[key] = (torch.ones if key.endswith("weight") else torch.zeros)(t.shape)
        else:
            filled[key] = torch.randn(t.shape, generator=generator) * t.shape[-1] ** -0.5
        filled[key] = filled[key].to(dtype)  # as a file in the model's dtype: no cast per call
    weights = adapter.pulid_flux_weights(filled, "random-pulid-flux.safetensors")
    assert weights.layout == adapter.CALayout(modules=modules)  # the real widths; only the count is the bench's
    return weights


def run(size: int, text: int, rounds: int, counts: list[int], device: str) -> None:
    import torch
    import comfy.ldm.flux.layers

    from facestudio_testing import pulid_flux_reference as reference
    from facestudio_testing.bootstrap import boot

    fp = boot().pack_module("attention.flux_patch")
    routing = boot().pack_module("attention.routing")
    flux = build_flux(device)
    dtype = flux.model.get_dtype()
    weights = ca_weights(2, dtype)
    latent_hw = (size // 8, size // 8)
    gh, gw = latent_hw[0] // 2, latent_hw[1] // 2
    n_img = gh * gw
    g = torch.Generator().manual_seed(1)
    persons = {}
    for n in counts:
        strips = C.strip_masks(n, *latent_hw) if n > 1 else [None]
        persons[n] = [fp.FluxPerson(torch.randn(1, ID_TOKENS, ID_WIDTH, generator=g), None, 1.0, m)
                      for m in strips]
    patched = {n: fp.apply_pulid_flux(flux, weights, ps) for n, ps in persons.items()}
    for model in patched.values():  # where the host's load would put the store when sampling
        for patcher in model.additional_models[fp.STORE_KEY]:
            patcher.model.to(device)
    diffusion = flux.model.diffusion_model
    double, single = diffusion.double_blocks[0], diffusion.single_blocks[0]

    ids = torch.zeros(1, text + n_img, 3)
    ids[0, text:, 1] = torch.arange(gh).repeat_interleave(gw).float()
    ids[0, text:, 2] = torch.arange(gw).repeat(gh).float()
    pe = comfy.ldm.flux.layers.EmbedND(dim=WIDTH // HEADS, theta=10_000, axes_dim=[16, 56, 56])(ids).to(device)
    x = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    img, txt, vec = x(1, n_img, WIDTH), x(1, text, WIDTH), x(1, WIDTH)
    grid = fp.FluxTokenGrid(latent_hw, (gh, gw), text)
    sigmas = torch.ones(1, device=device)
    options = {"cond_or_uncond": [0], "sigmas": sigmas, fp.GRID_KEY: grid}

    def call_double():
        return {"img": img.clone(), "txt": txt.clone(), "vec": vec, "pe": pe, "attn_mask": None,
                "transformer_options": {**options, "block_type": "double"}}

    def call_single():
        return {"img": torch.cat([txt, img], 1), "vec": vec, "pe": pe, "attn_mask": None,
                "transformer_options": {**options, "block_type": "single", "img_slice": [text, text + n_img]}}

    def wrap_double(args):
        out = {}
        out["img"], out["txt"] = double(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                        attn_mask=None, transformer_options=args["transformer_options"])
        return out

    def wrap_single(args):
        return {"img": single(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=None,
                              transformer_options=args["transformer_options"])}

    ca_class = reference.perceiver_attention_ca()
    ref_modules = []
    for sd in weights.ca:
        m = ca_class()
        m.load_state_dict(sd)
        ref_modules.append(m.to(device, dtype).eval())

    def reference_layout(kind, module, ps):
        tokens = [None if p.mask is None else
                  routing.masks_to_tokens(p.mask.reshape(1, *p.mask.shape[-2:]), latent_hw, 2, 1).to(device)
                  for p in ps]
        stacked = routing.stack_masks(tokens, device)
        w_hat = routing.combine_regions(stacked, torch.ones(len(ps), device=device))  # [1, N or 1, P]
        id_dev = [p.id_tokens.to(device, dtype) for p in ps]

        def run_block(args, extra):
            out = extra["original_block"](args)
            full = out["img"]
            start = 0 if kind == "double" else text
            xi = full[:, start:start + n_img]
            for i, id_tokens in enumerate(id_dev):  # one CA call per person, as the reference does
                xi = xi + w_hat[..., i:i + 1].to(dtype) * ref_modules[module](id_tokens, xi)
            return {**out, "img": xi if kind == "double" else torch.cat([full[:, :start], xi], 1)}
        return run_block

    sync = C.device_sync(device)
    print(C.machine_line(device, f"{dtype}, {n_img} image + {text} text tokens ({size}x{size}), width {WIDTH}"))
    for kind, make_args, wrap in (("double", call_double, wrap_double), ("single", call_single, wrap_single)):
        key = (f"{kind}_block", 0)
        module = 0 if kind == "double" else 1
        functions = {"unpatched": lambda: wrap(make_args())}
        for n in counts:
            ours = patched[n].model_options["transformer_options"]["patches_replace"]["dit"][key]
            functions[f"FaceStudio {n}"] = lambda ours=ours: ours(make_args(), {"original_block": wrap})
        for n in counts:
            per_person = reference_layout(kind, module, persons[n])
            functions[f"reference {n}"] = lambda f=per_person: f(make_args(), {"original_block": wrap})
        with torch.inference_mode():
            times = C.medians(functions, rounds, sync=sync)
            peaks = {name: peak_above(f, device) for name, f in functions.items()}
        base = times["unpatched"]
        rows = []
        for name, t in times.items():
            rows.append([name, f"{t * 1000:.1f}", f"{t / base:.3f}x",
                         f"{peaks[name] / 2**20:.0f}"])
        print(f"\n{kind} block ({n_img + (text if kind == 'single' else 0)} tokens in the block's image stream)")
        print(C.markdown_table(["configuration", "median ms", "vs unpatched", "peak MiB in the call"], rows))
        grow = (times[f"FaceStudio {counts[-1]}"] - times[f"FaceStudio {counts[0]}"]) / base
        print(f"FaceStudio {counts[0]} -> {counts[-1]} persons adds {grow:.1%} of the unpatched block; the "
              f"reference layout adds {(times[f'reference {counts[-1]}'] - times[f'reference {counts[0]}']) / base:.1%}")


def peak_above(function, device: str) -> int:
    """Bytes the call allocates at its peak, above what was allocated before it. CUDA: the allocator's
    high-water mark. CPU: from the profiler's memory events (each allocation and free, in time order),
    as there is no CPU allocator counter."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage  # self only: a nested op's allocation counts once
        peak = max(peak, running)
    return peak


if __name__ == "__main__":
    main()
