"""Shared pieces of the bench scripts: the machine line, interleaved medians, markdown tables, and a
full-size UNet with random weights, people and a style, built through the host's and the pack's own code.

Nothing here is timed by itself; the scripts decide what to measure. The host is booted in-process with
tests/facestudio_testing/bootstrap.py (the same boot the test suite uses), which needs the ComfyUI checkout
that scripts/setup.sh makes (or $COMFYUI_DIR).
"""
from __future__ import annotations

import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))  # the test model builders; never the pack root

# The host's own UNet configs (comfy/model_detection.py, unet_config_from_diffusers_unet), without dtype.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
ARCHITECTURES = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}
POOLED_WIDTH = {"sd15": None, "sdxl": 1280}


# --- reporting ---------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str | None = None, extra: str = "") -> str:
    """CPU model, cores, OS, Python, torch (threads), and the device that ran the figures."""
    import torch

    parts = [f"CPU {cpu_model()}", f"{os.cpu_count()} logical cores", f"{platform.system()} {platform.release()}",
             f"Python {platform.python_version()}", f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
             host_line()]
    if device is not None:
        if device.startswith("cuda"):
            parts.append(f"device {device}: {torch.cuda.get_device_name(torch.device(device))}")
        else:
            parts.append(f"device {device}")
    if extra:
        parts.append(extra)
    return "machine: " + ", ".join(parts)


def host_line() -> str:
    """The ComfyUI release and commit the figures ran on."""
    import subprocess

    from facestudio_testing.bootstrap import host_dir

    version = "?"
    for line in (host_dir() / "comfyui_version.py").read_text().splitlines():
        if line.startswith("__version__"):
            version = line.split("=", 1)[1].strip().strip("\"'")
    commit = subprocess.run(["git", "-C", str(host_dir()), "rev-parse", "--short=8", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown commit"
    return f"ComfyUI {version} ({commit})"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def medians(functions: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
            sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds of each function over `rounds` interleaved rounds (every function once per round,
    in turn), after `warmup` untimed rounds: load from other processes falls on all of them alike."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            sync()
            start = time.perf_counter()
            function()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# --- the host --------------------------------------------------------------------------------------

def resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch %s)" % torch.__version__)
    return choice


def boot_host(device: str):
    """Boot the host in-process as the tests do (bootstrap.boot sets --cpu and PyTorch attention), then
    let it use the GPU for --device cuda: `--cpu` only matters once comfy.model_management is imported,
    which the boot does not do."""
    from facestudio_testing import bootstrap

    booted = bootstrap.boot()
    from comfy.cli_args import args

    assert "comfy.model_management" not in sys.modules, "the boot imported comfy.model_management"
    args.cpu = device == "cpu"
    import comfy.model_management as mm

    want = "cpu" if device == "cpu" else "cuda"
    got = mm.get_torch_device().type
    if got != want:
        raise SystemExit(f"the host runs on {got}, not {want}")
    return booted


def remove_host() -> None:
    from facestudio_testing import bootstrap

    bootstrap.remove_base_directory()


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def init_weights_(module, seed: int = 0) -> None:
    """Deterministic, sane random weights in place: GroupNorm/LayerNorm weight 1 and bias 0 (zero norm weights
    make the UNet output exactly 0), other biases N(0, 0.01), weights N(0, fan_in**-0.5) (about N(0, 0.02) at
    SD1.5's widths, and activations stay at unit scale: no vanishing values, no slow denormals on CPU)."""
    import torch

    with torch.no_grad():
        for module_name, sub in module.named_modules():
            for name, param in sub.named_parameters(recurse=False):
                key = f"{module_name}.{name}"
                if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    param.fill_(1.0 if name == "weight" else 0.0)
                    continue
                generator = torch.Generator().manual_seed(_seed_for(seed, key))
                std = 0.01 if param.dim() < 2 else param.shape[1:].numel() ** -0.5
                if param.device.type == "cpu":
                    param.normal_(0.0, std, generator=generator)
                else:
                    param.copy_(torch.empty(param.shape, dtype=param.dtype).normal_(0.0, std, generator=generator))


def build_unet(arch: str = "sd15", seed: int = 0):
    """A ModelPatcher around the host's own model for `arch` (model_config_from_unet_config -> get_model, the
    dtype the host picks for this device), with random weights (init_weights_), as load_diffusion_model would
    give for a real file of that architecture."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher

    config = dict(ARCHITECTURES[arch])
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    if model_config is None or type(model_config).__name__.lower() != arch:
        raise RuntimeError(f"the host does not detect {arch} from its config (got {type(model_config).__name__})")
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    params = 2_600_000_000 if arch == "sdxl" else 860_000_000
    dtype = mm.unet_dtype(model_params=params, supported_dtypes=model_config.supported_inference_dtypes)
    manual_cast = mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model({}, "")
    init_weights_(model.diffusion_model, seed)
    model = model.to(offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def parameter_count(patcher) -> int:
    return sum(p.numel() for p in patcher.model.diffusion_model.parameters())


# --- adapters, people, style -------------------------------------------------------------------------

def write_adapters(arch: str, identity_kind: str = "faceid", style_kind: str = "image-prompt"):
    """Random adapter files in the real format (tests/facestudio_testing/adapter_files.py) with the real layer
    widths of `arch`, written to a temporary folder and loaded through the pack's loader (the folder goes
    afterwards: the loader reads the tensors into memory). Returns (identity adapter, style adapter)."""
    from facestudio_testing import adapter_files as af
    from facestudio_testing import bootstrap

    adapters = bootstrap.boot().pack_module("attention.adapters")
    base = af.SD15 if arch == "sd15" else af.SDXL
    widths = af.SD15_WIDTHS if arch == "sd15" else af.SDXL_WIDTHS
    loaded = []
    with tempfile.TemporaryDirectory(prefix="facestudio-bench-") as folder:
        for i, kind in enumerate((identity_kind, style_kind)):
            nested = af.adapter_state_dict(kind, base, seed=i, layer_widths=widths)
            path = af.write_adapter(Path(folder) / af.release_file_name(kind, base, ".safetensors"), nested)
            loaded.append(adapters.load_adapter(str(path)))
    return tuple(loaded)


def random_identity(seed: int, width: int = 512):
    """A FaceIdentity of one shot with a random unit ArcFace-like embedding (what the patch reads of it)."""
    import numpy as np
    from facestudio_testing import bootstrap

    booted = bootstrap.boot()
    faces, identity = booted.pack_module("encoders.faces"), booted.pack_module("encoders.identity")
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal(width).astype(np.float32) * 20.0
    unit = raw / np.linalg.norm(raw)
    return identity.FaceIdentity(
        embeddings=raw[None], normed_embeddings=unit[None], embedding=unit,
        recognizer=faces.RecognizerIdentity("bench_random_arcface.onnx", "0" * 16, width),
        crops=np.zeros((1, 224, 224, 3), np.uint8), det_scores=np.ones(1, np.float32),
        bboxes=np.array([[0, 0, 112, 112]], np.float32), kps=np.zeros((1, 5, 2), np.float32),
        used=(0,), photo_count=1)


def strip_masks(count: int, height: int, width: int):
    """`count` MASKs [1, height, width], left to right, tiling the image."""
    import torch

    masks = []
    for i in range(count):
        mask = torch.zeros(1, height, width)
        mask[..., (i * width) // count:((i + 1) * width) // count] = 1.0
        masks.append(mask)
    return masks


def people(count: int, height: int, width: int, seed: int = 0):
    from facestudio_testing import bootstrap

    patch = bootstrap.boot().pack_module("attention.patch")
    persons = None
    for i, mask in enumerate(strip_masks(count, height, width)):
        persons = patch.add_person(persons, random_identity(seed + i), mask)
    return persons


def random_style(style_adapter, seed: int = 100):
    """A StyleEncoding with random CLIP vision features of the widths the style adapter reads."""
    import dataclasses

    import torch
    from facestudio_testing import bootstrap

    style = bootstrap.boot().pack_module("encoders.style")
    generator = torch.Generator().manual_seed(seed)
    plain = style_adapter.kind.value == "image-prompt"
    hidden_width = 1280 if plain else style_adapter.clip_width  # ViT-H's penultimate hidden states
    embeds_width = style_adapter.clip_width if plain else 1024
    values = {
        "image_embeds": torch.randn(1, embeds_width, generator=generator),
        "penultimate_hidden_states": torch.randn(1, 257, hidden_width, generator=generator),
        "clip_width": hidden_width, "masked_faces": (0,),
        "unconditional_hidden_states": torch.randn(1, 257, hidden_width, generator=generator),
    }
    names = {f.name for f in dataclasses.fields(style.StyleEncoding)}
    return style.StyleEncoding(**{k: v for k, v in values.items() if k in names})


def apply(model, adapter, persons, style_adapter=None, style=None, alpha: float = 0.5):
    from facestudio_testing import bootstrap

    patch = bootstrap.boot().pack_module("attention.patch")
    return patch.apply_facestudio(model, adapter, persons, alpha=alpha, style_adapter=style_adapter, style=style)


# --- the peers' way: one extra attention call per person per layer ---------------------------------

class PerPersonAttention:
    """The attn2 replacement of the IP-Adapter packs (one optimized_attention over each person's K/V, times
    that person's mask and weight, added to the text attention; the style one more call), built from the same
    K/V, masks and weights as a FaceStudio replacement, so both do the same maths with a different layout.
    K/V and token masks are cached per device/dtype/grid, as ours are: only the call structure differs."""

    def __init__(self, facestudio):
        persons, style = facestudio.layers()  # the K/V, read back from the token store
        self.persons = [(p.cond, p.uncond, p.weight, p.mask) for p in persons]
        self.style = None if style is None else (style.cond, style.uncond, style.scale)
        self._kv: dict = {}
        self._masks: dict = {}

    def __deepcopy__(self, memo):
        return self

    def _batched_kv(self, index, cond, uncond, chunks, batch, q):
        import torch

        key = (index, tuple(chunks), batch, q.device, q.dtype)
        kv = self._kv.get(key)
        if kv is None:
            kv = tuple(torch.cat([(u if c == 1 else k).expand(batch, -1, -1) for c in chunks]).to(q.device, q.dtype)
                       for k, u in zip(cond, uncond))
            self._kv[key] = kv
        return kv

    def _token_mask(self, index, mask, latent_hw, nq, batch, q):
        key = (index, latent_hw, nq, q.device, q.dtype)
        tokens = self._masks.get(key)
        if tokens is None:
            from facestudio_testing import bootstrap

            routing = bootstrap.boot().pack_module("attention.routing")
            down = routing.find_downscale(latent_hw, nq)
            tokens = routing.masks_to_tokens(mask, latent_hw, down, 1)[0].to(q.device, q.dtype)[None, :, None]
            self._masks[key] = tokens
        return tokens

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        out = optimized_attention(q, k, v, heads)
        chunks = list(extra_options.get("cond_or_uncond") or [0])
        batch = q.shape[0] // len(chunks)
        shape = extra_options["original_shape"]
        latent_hw = (int(shape[-2]), int(shape[-1]))
        for i, (cond, uncond, weight, mask) in enumerate(self.persons):
            kk, vv = self._batched_kv(i, cond, uncond, chunks, batch, q)
            extra = optimized_attention(q, kk, vv, heads)
            if mask is not None:
                extra = extra * self._token_mask(i, mask, latent_hw, q.shape[1], batch, q)
            out = out + extra * weight
        if self.style is not None:
            kk, vv = self._batched_kv(-1, self.style[0], self.style[1], chunks, batch, q)
            out = out + optimized_attention(q, kk, vv, heads) * self.style[2]
        return out


def per_person_model(patched):
    """A clone of `patched` whose FaceStudio replacements are swapped for PerPersonAttention ones."""
    clone = patched.clone()
    replace = clone.model_options["transformer_options"]["patches_replace"]["attn2"]
    for key, patch in list(replace.items()):
        replace[key] = PerPersonAttention(patch)
    return clone


# --- one sampling step, the way KSampler runs it ------------------------------------------------------

class Steps:
    """Runs UNet evaluations through the host's whole sampling path: CFGGuider.sample (prepare_sampling,
    process_conds) -> KSAMPLER -> KSamplerX0Inpaint -> sampling_function -> calc_cond_batch -> apply_model, with a
    sampler function that evaluates the model at one sigma `evals` times and times each evaluation. With CFG
    (cfg != 1) calc_cond_batch batches cond and uncond into one UNet call of batch 2, as in every KSampler step."""

    def __init__(self, arch: str, latent_hw: tuple[int, int], cfg: float = 7.0, seed: int = 0):
        import torch

        self.arch, self.cfg, self.seed = arch, cfg, seed
        generator = torch.Generator().manual_seed(seed)
        context = ARCHITECTURES[arch]["context_dim"]
        pooled = POOLED_WIDTH[arch]

        def conditioning():
            extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=generator),
                                               "width": latent_hw[1] * 8, "height": latent_hw[0] * 8}
            return [[torch.randn(1, 77, context, generator=generator), extra]]

        self.positive, self.negative = conditioning(), conditioning()
        self.latent = torch.zeros(1, 4, *latent_hw)
        self.noise = torch.randn(1, 4, *latent_hw, generator=generator)

    def sigmas(self, model):
        import comfy.samplers

        schedule = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 20)
        return schedule[10:12].clone()  # a middle step: every person (start 0, end 1) is active

    def run(self, model, evals: int = 1, sync: Callable[[], None] | None = None) -> list[float]:
        import comfy.samplers
        import torch

        sync = sync or (lambda: None)
        times: list[float] = []

        def timed(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            s_in = x.new_ones([x.shape[0]])
            for _ in range(evals):
                sync()
                start = time.perf_counter()
                model_k(x, sigmas[0] * s_in, **(extra_args or {}))
                sync()
                times.append(time.perf_counter() - start)
            return x

        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(self.positive, self.negative)
        guider.set_cfg(self.cfg)
        with torch.inference_mode():  # as the host's executor runs every node
            guider.sample(self.noise, self.latent, comfy.samplers.KSAMPLER(timed), self.sigmas(model),
                          disable_pbar=True, seed=self.seed)
        return times

    def probe(self, model) -> dict:
        """What one step hands the UNet: calls, input shape, cond_or_uncond, sigmas (a unet wrapper records it)."""
        seen = []

        def wrapper(apply_model, args):
            options = args["c"].get("transformer_options", {})
            seen.append({"input": tuple(args["input"].shape), "cond_or_uncond": list(args["cond_or_uncond"]),
                         "sigmas": [round(float(s), 4) for s in options.get("sigmas", [])]})
            return apply_model(args["input"], args["timestep"], **args["c"])

        clone = model.clone()
        clone.set_model_unet_function_wrapper(wrapper)
        self.run(clone, 1)
        return {"calls": len(seen), **(seen[0] if seen else {})}

    def output(self, model):
        """The model's denoised output at this step (for checking two models compute the same)."""
        import comfy.samplers
        import torch

        result = {}

        def once(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            result["out"] = model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {})).float().cpu()
            return x

        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(self.positive, self.negative)
        guider.set_cfg(self.cfg)
        with torch.inference_mode():
            guider.sample(self.noise, self.latent, comfy.samplers.KSAMPLER(once), self.sigmas(model),
                          disable_pbar=True, seed=self.seed)
        return result["out"]


def device_sync(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None
