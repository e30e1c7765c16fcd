"""One sampling step with FaceStudio Apply, against the same step unpatched and against the peers' layout.

    .venv/bin/python bench/sampling_overhead.py            # SD1.5 at 512x512, 1/2/4/8 persons, 5 rounds
    .venv/bin/python bench/sampling_overhead.py --quick    # 256x256, 1/4/8 persons, 3 rounds (about 2 min on 2 cores)
    .venv/bin/python bench/sampling_overhead.py --sdxl     # SDXL at 1024x1024 (fp32 on CPU: about 14 GB of RAM)
    options: --device auto|cpu|cuda  --rounds N  --persons 1,2,4,8  --size PX  --threads N  --no-per-person

A step is what KSampler does per step with CFG: one UNet evaluation of the cond + uncond batch of 2, run
through the host's own sampling path (CFGGuider -> KSAMPLER -> sampling_function -> calc_cond_batch ->
apply_model, so the attn2 replacements get the host's real extra_options: cond_or_uncond, sigmas,
original_shape); the script prints what the UNet was handed. The UNet is the host's full-size SD1.5
(or SDXL) model class from its own config, built through model_config.get_model and ModelPatcher with
seeded random weights (norms 1, weights N(0, fan_in**-0.5)), in the dtype the host picks for the device.

Configurations, timed in interleaved rounds (each configuration once per round, after one warm-up
round; medians), every patched one with a style image too:
- unpatched: the baseline of every ratio;
- FaceStudio: apply_facestudio with N persons, each on a left-to-right strip mask, random FaceID
  (and image-prompt style) adapter files in the real format and real SD1.5 widths, loaded through the
  pack's loader, and random unit ArcFace embeddings as identities;
- per-person calls: the same K/V, masks and weights through one extra optimized_attention call per
  person per layer (the IP-Adapter packs' layout), swapped in as the attn2 replacement.

Targets (printed, met or missed): FaceStudio with 4 persons + style <= 1.05x unpatched; the step's growth
from 1 to 8 persons < 3% of the unpatched step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256, persons 1,4,8, 3 rounds")
    parser.add_argument("--sdxl", action="store_true", help="SDXL at 1024x1024 instead of SD1.5 at 512x512")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 5, --quick 3)")
    parser.add_argument("--persons", help="comma-separated person counts (default 1,2,4,8; --quick 1,4,8)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512, --sdxl 1024, --quick half)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-per-person", action="store_true", help="leave out the per-person-calls baseline")
    args = parser.parse_args()

    arch = "sdxl" if args.sdxl else "sd15"
    size = args.size or (1024 if args.sdxl else 512) // (2 if args.quick else 1)
    rounds = args.rounds or (3 if args.quick else 5)
    counts = [int(n) for n in (args.persons or ("1,4,8" if args.quick else "1,2,4,8")).split(",")]
    if size % 64:
        parser.error("--size must be a multiple of 64")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_device(args.device)
    if arch == "sdxl" and device == "cpu" and not enough_memory(14):
        print("SDXL skipped: its UNet runs in float32 on CPU and needs about 14 GB of free memory "
              f"({available_gb():.1f} GB available). Run with --device cuda or on a larger machine.")
        return
    C.boot_host(device)
    try:
        run(arch, size, rounds, counts, device, not args.no_per_person)
    finally:
        C.remove_host()


def available_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def enough_memory(gb: float) -> bool:
    return available_gb() >= gb


def run(arch: str, size: int, rounds: int, counts: list[int], device: str, per_person: bool) -> None:
    sync = C.device_sync(device)
    model = C.build_unet(arch)
    adapter, style_adapter = C.write_adapters(arch)
    style = C.random_style(style_adapter)
    latent = (size // 8, size // 8)
    steps = C.Steps(arch, latent)

    models = {"unpatched": model}
    ours, theirs = {}, {}
    for n in counts:
        ours[n] = C.apply(model, adapter, C.people(n, size, size), style_adapter, style)
        models[f"FaceStudio, {n} person{'s' * (n > 1)} + style"] = ours[n]
        if per_person:
            theirs[n] = C.per_person_model(ours[n])
            models[f"per-person calls, {n} person{'s' * (n > 1)} + style"] = theirs[n]

    print(C.machine_line(device, f"model dtype {model.model_dtype()}"))
    name = "SD1.5" if arch == "sd15" else "SDXL"
    print(f"model: the host's {name} UNet ({C.parameter_count(model) / 1e6:.1f}M parameters, "
          f"{model.model_size() / 2**30:.2f} GiB), {size}x{size} (latent {latent[0]}x{latent[1]}), CFG 7; "
          f"adapters {adapter.source} ({adapter.num_tokens} tokens/person) + style {style_adapter.source} "
          f"({style_adapter.num_tokens} tokens), alpha 0.5, one strip mask per person")
    probe = steps.probe(ours[counts[-1]])
    print(f"one step = {probe['calls']} UNet call(s): input {probe['input']}, cond_or_uncond "
          f"{probe['cond_or_uncond']}, sigmas {probe['sigmas']}")
    if per_person:
        n = counts[-1]
        diff = (steps.output(ours[n]) - steps.output(theirs[n])).abs().max().item()
        print(f"check: per-person calls and FaceStudio give the same step output with {n} persons "
              f"(max |difference| {diff:.2e})")

    functions = {label: (lambda m=m: steps.run(m, 1, sync)) for label, m in models.items()}
    t = C.medians(functions, rounds=rounds, warmup=1, sync=sync)

    base = t["unpatched"]
    rows = []
    for label, seconds in t.items():
        peer = ""
        if label.startswith("FaceStudio") and per_person:
            peer = f"{seconds / t[label.replace('FaceStudio', 'per-person calls')]:.3f}x"
        rows.append([label, f"{seconds * 1000:.0f} ms", f"{seconds / base:.3f}x", peer])
    print(f"\nstep time, median of {rounds} interleaved rounds\n")
    print(C.markdown_table(["configuration", "step", "vs unpatched", "vs per-person calls"], rows))

    def ours_t(n):
        return t[f"FaceStudio, {n} person{'s' * (n > 1)} + style"]

    targets = []
    if 4 in counts:
        ratio = ours_t(4) / base
        targets.append(["4 persons + style <= 1.05x unpatched", f"{ratio:.3f}x", C.verdict(ratio <= 1.05)])
    if 1 in counts and 8 in counts:
        growth = (ours_t(8) - ours_t(1)) / base
        targets.append(["growth 1 -> 8 persons < 3% of the step", f"{growth * 100:+.2f}%", C.verdict(growth < 0.03)])
        if per_person:
            peer_growth = (t["per-person calls, 8 persons + style"] - t["per-person calls, 1 person + style"]) / base
            targets.append(["(per-person calls: growth 1 -> 8)", f"{peer_growth * 100:+.2f}%", ""])
    if targets:
        print()
        print(C.markdown_table(["target", "measured", ""], targets))


if __name__ == "__main__":
    main()
