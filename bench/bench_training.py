"""One training step of a FaceStudio adapter against one step of the host's own LoRA trainer, on the same
model and the same batch: the tiny SD1.5 checkpoint of the tests and the full-size SD1.5 UNet.

    .venv/bin/python bench/bench_training.py            # tiny: 10 rounds; full-size 512x512, batch 1: 3 rounds
    .venv/bin/python bench/bench_training.py --quick    # tiny: 5 rounds; full-size 256x256: 2 rounds
    options: --device auto|cpu|cuda  --rounds N  --full-rounds N  --size PX  --batch N  --models tiny,full
             --threads N

Models: the tests' tiny SD1.5 checkpoint (tests/facestudio_testing/tiny_models.py: SD1.5's 16 cross-
attention positions at width 320, about 110M params) with the tests' batch shape (8x8 latents, batch 2),
and the host's full-size SD1.5 UNet with seeded random weights (C.SD15_UNET_CONFIG, 860M params) at 64x64
latents (512 px; --quick 256). Both in fp32 on every device (the host's --force-fp32): FaceStudio's
objective feeds its fp32 adapter the tokens in the UNet's compute dtype, so it cannot train on an fp16/bf16
UNet yet. The full-size run holds two fp32 copies of the UNet (about 16 GiB resident at 512x512 on CPU).
The batch: random latents, a random caption context, pooled text, CLIP image and face embeddings.

The two steps, timed in interleaved rounds (C.medians) after one warm-up round, under
torch.inference_mode(False) and enable_grad, as both trainers run:
- host LoRA (the baseline of every ratio): what TrainLoraNode (comfy_extras/nodes_train.py) builds, with
  its own functions and its schema's defaults: its own copy of the model; on every layer the host can wrap
  (weight_function), a rank-8 LoRA (LoRAAdapter.create_train) on each weight of 2+ dims and a BiasDiff on
  each 1-D weight and bias, attached with add_weight_wrapper and made live by load_models_gpu; AdamW at
  the node's learning rate. Forward through BaseModel.apply_model, the MSE in the model's output space
  (the loss FaceStudio's objective uses, so the two differ only in what they train), backward, the
  node's grad-dtype cast, optimizer step, zero_grad.
- FaceStudio: objective.training_loss with the paper's dropout, zero_grad, backward, trainer._optimizer's
  AdamW step, as trainer.train runs them.
Each round, both draw the same noise levels and noise (one generator seed, drawn in training_loss's
order). The node's other defaults, bf16 autocast and gradient checkpointing, are left out: either step
could use them, and the comparison is between what each one trains.

Memory: the peak a step allocates above what was allocated before it (CUDA: the allocator's high-water
mark; CPU: the profiler's memory events, as bench_flux_blocks.py measures: tracemalloc does not see
torch's allocator, and RSS keeps what glibc does not give back, so interleaved steps would blur it), and
the persistent training state (trainable parameters, their gradients, AdamW's moments).
"""
from __future__ import annotations

import argparse
import gc
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from bench_flux_blocks import peak_above  # noqa: E402

SEED = 0
CLIP_DIM, TEXT_DIM = 1024, 768  # CLIP ViT-H image_embeds, CLIP-L pooled text: the widths the tests train with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny: 5 rounds; full-size 256x256, 2 rounds")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--rounds", type=int, help="timed rounds on the tiny model (default 10, --quick 5)")
    parser.add_argument("--full-rounds", type=int, help="timed rounds on the full-size UNet (default 3, --quick 2)")
    parser.add_argument("--size", type=int, help="full-size image side in pixels (default 512, --quick 256)")
    parser.add_argument("--batch", type=int, default=1, help="full-size batch (default 1)")
    parser.add_argument("--models", default="tiny,full", help="comma-separated: tiny, full (default both)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 10)
    full_rounds = args.full_rounds or (2 if args.quick else 3)
    size = args.size or (256 if args.quick else 512)
    models = set(args.models.split(","))
    if not models or models - {"tiny", "full"}:
        parser.error("--models: tiny, full or both")

    import torch
    from facestudio_testing import bootstrap

    if args.threads:
        torch.set_num_threads(args.threads)
    device = C.resolve_device(args.device)
    bootstrap.boot()
    from comfy.cli_args import args as host_args

    host_args.force_fp32 = True  # read when comfy.model_management is imported, which boot_host does next
    C.boot_host(device)
    try:
        print(C.machine_line(device, "fp32, no autocast, no gradient checkpointing"))
        if "tiny" in models:
            run("tiny SD1.5 (tests' checkpoint), 8x8 latents (64 px), batch 2", tiny_model, 2, (8, 8), rounds, device)
        if "full" in models:
            hw = (size // 8, size // 8)
            run(f"full-size SD1.5 UNet (random weights), {hw[0]}x{hw[1]} latents ({size} px), batch {args.batch}",
                lambda: C.build_unet("sd15"), args.batch, hw, full_rounds, device)
        print(f"\nprocess peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:,.1f} GiB")
    finally:
        C.remove_host()


def tiny_model():
    import comfy.sd

    from facestudio_testing import tiny_models

    return comfy.sd.load_checkpoint_guess_config(str(tiny_models.tiny_sd15_checkpoint()), output_vae=False,
                                                 output_clip=False)[0]


def random_batch(objective, batch: int, latent_hw: tuple[int, int]):
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    return objective.TrainingBatch(
        torch.randn(batch, 4, *latent_hw, generator=g), torch.randn(batch, 77, 768, generator=g),
        torch.randn(batch, TEXT_DIM, generator=g), torch.randn(batch, CLIP_DIM, generator=g),
        torch.nn.functional.normalize(torch.randn(batch, 512, generator=g), dim=-1))


def host_defaults() -> dict:
    """TrainLoraNode's schema defaults (rank, learning_rate, optimizer, algorithm): the baseline follows the host."""
    from comfy_extras import nodes_train

    inputs = {i.id: getattr(i, "default", None) for i in nodes_train.TrainLoraNode.define_schema().inputs}
    return {k: inputs[k] for k in ("rank", "learning_rate", "optimizer", "algorithm")}


def host_lora(mp, defaults: dict):
    """(the LoRA-wrapped model, its parameters, its optimizer), built as TrainLoraNode.execute builds them on
    its deep copy of the model (`mp`: a second, identical model, so the wrappers never reach the other step's)."""
    import torch
    from comfy_extras import nodes_train

    mp.model.requires_grad_(False).train()
    lora_sd, _ = nodes_train._setup_lora_adapters(mp, {}, defaults["algorithm"], torch.float32, defaults["rank"])
    optimizer = nodes_train._create_optimizer(defaults["optimizer"], lora_sd.values(), defaults["learning_rate"])
    return mp, list(lora_sd.values()), optimizer


def state_bytes(params, optimizer) -> int:
    """Parameters + gradients + optimizer state (the AdamW moments): what stays allocated between steps."""
    import torch

    total = sum(p.numel() * p.element_size() * 2 for p in params)  # the gradient has the parameter's size
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return total


def run(title: str, make_model, batch_size: int, latent_hw: tuple[int, int], rounds: int, device: str) -> None:
    import torch
    import comfy.model_management as mm

    from facestudio_testing.bootstrap import boot

    trainable = boot().pack_module("training.trainable_adapter")
    objective = boot().pack_module("training.objective")
    trainer = boot().pack_module("training.trainer")
    dev = torch.device(device)
    defaults = host_defaults()
    # The node's clone(force_deepcopy=True) reloads the model through its loader (cached_patcher_init), which
    # the bench's random UNet lacks: the same seeded build twice is the same copy.
    model = make_model()
    lora_model = make_model()
    assert all(torch.equal(x, y) for x, y in zip(model.model.state_dict().values(),
                                                 lora_model.model.state_dict().values()))
    lora_model, lora_params, lora_optimizer = host_lora(lora_model, defaults)
    mm.load_models_gpu([model, lora_model], force_full_load=True)  # loading puts the weight wrappers in place
    adapter = trainable.TrainableAdapter.for_model(model, clip_dim=CLIP_DIM, text_dim=TEXT_DIM, seed=SEED).to(dev)
    adapter.train().requires_grad_(True)
    settings = trainer.TrainingSettings()
    fs_optimizer = trainer._optimizer(settings, adapter.parameters())
    batch = random_batch(objective, batch_size, latent_hw)
    on_device = batch.map(lambda t: t.to(dev))  # once, for both steps: neither pays a copy per step
    base, sampling = lora_model.model, lora_model.get_model_object("model_sampling")
    lora_options = lora_model.model_options.get("transformer_options", {})

    def host_step():
        g = torch.Generator().manual_seed(SEED)
        percents = torch.rand(batch_size, generator=g)  # training_loss's first two draws, in its order
        noise = torch.randn(batch.latents.shape, generator=g).to(dev)
        sigmas = torch.tensor([float(sampling.percent_to_sigma(float(p))) for p in percents], device=dev)
        latents = base.process_latent_in(on_device.latents)
        noised = sampling.noise_scaling(sigmas, noise, latents, False)
        denoised = base.apply_model(noised, sigmas, c_crossattn=on_device.context, transformer_options=lora_options)
        gain = objective._output_gain(sampling, sigmas, denoised)
        loss = torch.nn.functional.mse_loss(denoised.float() / gain, latents.float() / gain)
        loss.backward()
        for group in lora_optimizer.param_groups:  # the node's loop casts each gradient to its parameter's dtype
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.data = p.grad.data.to(p.data.dtype)
        lora_optimizer.step()
        lora_optimizer.zero_grad()

    def facestudio_step():
        loss = objective.training_loss(model, adapter, on_device, torch.Generator().manual_seed(SEED),
                                       settings.dropout, dev)
        fs_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fs_optimizer.step()

    steps = {"host LoRA": host_step, "FaceStudio adapter": facestudio_step}
    sync = C.device_sync(device)
    mm.in_training = True  # as the node's loop sets it (only quantized layers read it)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            times = C.medians(steps, rounds, sync=sync)
            peaks = {name: peak_above(step, device) for name, step in steps.items()}
    finally:
        mm.in_training = False
    # AdamW keeps state only for parameters that got a gradient: every LoRA wrapper took part in the forward.
    assert len(lora_optimizer.state) == len(lora_params), (len(lora_optimizer.state), len(lora_params))
    fs_params = list(adapter.parameters())
    counts = {"host LoRA": sum(p.numel() for p in lora_params),
              "FaceStudio adapter": sum(p.numel() for p in fs_params)}
    held = {"host LoRA": state_bytes(lora_params, lora_optimizer),
            "FaceStudio adapter": state_bytes(fs_params, fs_optimizer)}

    base_name = "host LoRA"
    rows = [[name, f"{times[name] * 1000:,.0f}", f"{times[name] / times[base_name]:.3f}x", f"{counts[name]:,}",
             f"{counts[name] / counts[base_name]:.2f}x", f"{peaks[name] / 2**20:,.0f}",
             f"{peaks[name] / peaks[base_name]:.3f}x", f"{held[name] / 2**20:,.1f}"] for name in steps]
    print(f"\n{title}; model {C.parameter_count(model):,} params; median of {rounds} interleaved rounds")
    print(f"host LoRA: TrainLoraNode defaults {defaults}, on {sum(1 for p in lora_params if p.dim() >= 2) // 2} "
          f"weights and {sum(1 for p in lora_params if p.dim() == 1)} 1-D weights and biases")
    print(C.markdown_table(["step", "median ms", "vs host LoRA", "trainable params", "vs host LoRA",
                            "peak MiB in the step", "vs host LoRA", "params+grads+AdamW MiB"], rows))

    del model, lora_model, lora_params, lora_optimizer, adapter, fs_optimizer, base
    mm.unload_all_models()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
