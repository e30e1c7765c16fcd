"""Peak memory of a sampling run with FaceStudio: unpatched, 1 person, 8 persons, each in a fresh process.

    .venv/bin/python bench/memory.py            # SD1.5 at 512x512, 2 steps per run, 3 runs per configuration
    .venv/bin/python bench/memory.py --quick    # 256x256, 1 step, 1 run per configuration (about 2 min on 2 cores)
    options: --device auto|cpu|cuda  --repeats N  --steps N  --size PX  --sdxl  --threads N

Every run is a new Python process (this script with --child) that boots the host, builds the full-size
SD1.5 UNet with random weights (as bench/sampling_overhead.py does), applies FaceStudio with N persons on
left-to-right strip masks plus a style image (or nothing, for "unpatched"), runs sampling steps through the
host's sampling path and reports its peak resident set size (getrusage ru_maxrss, the high-water mark of the
whole process) and, on CUDA, torch.cuda.max_memory_allocated. Runs are interleaved (unpatched, 1, 8, then
again) and the median peak per configuration is kept.

Target (printed, met or missed): peak with 8 persons minus peak with 1 person < 1% of the model's size.
The peak after building the model, before sampling, is printed too: when sampling does not raise the
peak above it, the sampling figures cannot show a difference and the script says so.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

CONFIGS = {"unpatched": 0, "1 person + style": 1, "8 persons + style": 8}


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def child(persons: int, size: int, steps: int, device: str, arch: str, threads: int | None) -> None:
    import psutil
    import torch

    if threads:
        torch.set_num_threads(threads)
    C.boot_host(device)
    try:
        model = C.build_unet(arch)
        built = peak_rss_bytes()
        run_model = model
        if persons:
            adapter, style_adapter = C.write_adapters(arch)
            run_model = C.apply(model, adapter, C.people(persons, size, size), style_adapter, C.random_style(style_adapter))
        applied = psutil.Process().memory_info().rss
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        C.Steps(arch, (size // 8, size // 8)).run(run_model, steps, C.device_sync(device))
        result = {"peak_rss": peak_rss_bytes(), "built_rss": built, "applied_rss": applied,
                  "model_size": model.model_size(),
                  "cuda_peak": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
                  "machine": C.machine_line(device, f"model dtype {model.model_dtype()}")}
    finally:
        C.remove_host()
    print("FACESTUDIO_BENCH_RESULT " + json.dumps(result))


def run_child(persons: int, size: int, steps: int, device: str, arch: str, threads: int | None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(persons), "--size", str(size),
               "--steps", str(steps), "--device", device] + (["--sdxl"] if arch == "sdxl" else []) + (
               ["--threads", str(threads)] if threads else [])
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("FACESTUDIO_BENCH_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"the child run for {persons} persons failed (exit {done.returncode}):\n"
                       f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256x256, 1 step, 1 run per configuration")
    parser.add_argument("--sdxl", action="store_true", help="SDXL at 1024x1024 instead of SD1.5 at 512x512")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, help="runs per configuration (default 3, --quick 1)")
    parser.add_argument("--steps", type=int, help="UNet evaluations per run (default 2, --quick 1)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512, --sdxl 1024, --quick half)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    arch = "sdxl" if args.sdxl else "sd15"
    size = args.size or (1024 if args.sdxl else 512) // (2 if args.quick else 1)
    steps = args.steps or (1 if args.quick else 2)
    device = C.resolve_device(args.device)
    if args.child is not None:
        child(args.child, size, steps, device, arch, args.threads)
        return
    repeats = args.repeats or (1 if args.quick else 3)
    if arch == "sdxl" and device == "cpu":
        import psutil

        free_gb = psutil.virtual_memory().available / 2**30
        if free_gb < 14:
            print(f"SDXL skipped: its UNet runs in float32 on CPU and needs about 14 GB of free memory ({free_gb:.1f} GB "
                  "available). Run with --device cuda or on a larger machine.")
            return

    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(repeats):
        for name, persons in CONFIGS.items():
            runs[name].append(run_child(persons, size, steps, device, arch, args.threads))

    first = runs["unpatched"][0]
    model_size = first["model_size"]
    print(first["machine"])
    print(f"model: the host's {'SD1.5' if arch == 'sd15' else 'SDXL'} UNet, {mib(model_size)} "
          f"({model_size:,} bytes); {size}x{size}, {steps} step(s) of a CFG batch of 2 per run; "
          f"median of {repeats} fresh process(es) per configuration")

    peak = {name: statistics.median(r["peak_rss"] for r in rs) for name, rs in runs.items()}
    built = {name: statistics.median(r["built_rss"] for r in rs) for name, rs in runs.items()}
    applied = {name: statistics.median(r["applied_rss"] for r in rs) for name, rs in runs.items()}
    cuda = None
    if first["cuda_peak"] is not None:
        cuda = {name: statistics.median(r["cuda_peak"] for r in rs) for name, rs in runs.items()}
    base = peak["unpatched"]
    headers = ["configuration", "peak RSS", "minus unpatched", "of model size", "peak after build",
               "RSS before sampling"]
    if cuda:
        headers.append("CUDA peak allocated")
    rows = []
    for name in CONFIGS:
        row = [name, mib(peak[name]), f"{(peak[name] - base) / 2**20:+,.1f} MiB",
               f"{(peak[name] - base) / model_size * 100:+.2f}%", mib(built[name]), mib(applied[name])]
        if cuda:
            row.append(mib(cuda[name]))
        rows.append(row)
    print()
    print(C.markdown_table(headers, rows))
    if any(peak[n] <= built[n] for n in CONFIGS):
        print("\nwarning: sampling did not raise the peak above the build's; use a larger --size")

    growth = peak["8 persons + style"] - peak["1 person + style"]
    targets = [["peak(8 persons) - peak(1 person) < 1% of model size",
                f"{growth / 2**20:+,.1f} MiB = {growth / model_size * 100:+.3f}%",
                C.verdict(growth < 0.01 * model_size)]]
    if cuda:
        cuda_growth = cuda["8 persons + style"] - cuda["1 person + style"]
        targets.append(["(CUDA allocated: 8 - 1)", f"{cuda_growth / 2**20:+,.1f} MiB = "
                        f"{cuda_growth / model_size * 100:+.3f}%", C.verdict(cuda_growth < 0.01 * model_size)])
    print()
    print(C.markdown_table(["target", "measured", ""], targets))


if __name__ == "__main__":
    main()
