"""Seeded IP-Adapter files of every kind the pack reads, for SD1.5 and SDXL, in both on-disk layouts.

Layouts follow the reference IP-Adapter code (tencent-ailab/IP-Adapter): `ImageProjModel`,
`Resampler` (Plus), `MLPProjModel` (FaceID / Portrait), `ProjPlusModel` + `FacePerceiverResampler`
(FaceID Plus), the LoRA attention processors of the FaceID releases, and `ip_adapter` keys numbered
by diffusers' `attn_processors` order. The tests also load these files through diffusers' own
converters, which checks the layout independently of this generator.

Real: every key name, and every width a loader reads (context 768/2048, ArcFace 512, CLIP 1024/1280,
token counts, FaceID's 1024-wide ID MLP, SD1.5 resampler widths, layer counts). Small where no
loader looks: SD1.5 layers follow the tiny test UNet (320 wide everywhere, SD1.5's 16 positions);
SDXL keeps its 70 layers but 1/32 of the inner widths and a 256-wide resampler (the real ones hold
about 340M and 80-200M parameters), and LoRA ranks are small (the releases use 128). Pass explicit
sizes for real-width files. SDXL FaceID Plus v2 adds its ID tokens to the resampler's output, so it
needs resampler_dim 2048; resampler_depth / resampler_heads / ff_mult shrink such a resampler
(tiny_sdxl.PLUS_SIZES).

FaceID Portrait unnorm (ip-adapter-faceid-portrait_sdxl_unnorm.bin) is not the Portrait MLP but the
IP-Adapter Plus `Resampler` over the raw 512-wide ArcFace embedding: cubiq's ComfyUI_IPAdapter_plus
(9d076a3) builds it with init_proj_plus (IPAdapterPlus.py:67-68, :99-109: depth 4, 64-wide heads, 20
of them on SDXL, ff x4) at width 1280 (:280-281) with 16 queries (:287-288), embedding_dim the raw
face embedding's width (:363, :462) and output_dim the context width; it is IP-Adapter's own
IPAdapterPlusXL Resampler (ip_adapter/ip_adapter.py:328-343) with embedding_dim 512. The release's
1,009,523,411 bytes are those 70 SDXL layers in fp16 plus that resampler in fp32: torch.save of
exactly that layout comes to 29,641 bytes more (container padding; Portrait sd15 measures +9,054 the
same way), every other depth / dtype misses by megabytes. image_projection makes it at the release's
width (1280, 20 heads); adapter_state_dict at 256 (4 heads) unless resampler_dim says otherwise.
No SD1.5 unnorm was released (cubiq refuses the preset
there, utils.py:79); the SD1.5 file here is the same layout at SD1.5's context, so the recognition
rule, which does not depend on the base, is tested on both.
"""
from __future__ import annotations

import builtins
import functools
from pathlib import Path

import torch
from safetensors.torch import save_file

SD15 = "SD1.5"
SDXL = "SDXL"
BASES = (SD15, SDXL)
CONTEXT = {SD15: 768, SDXL: 2048}
ARCFACE_WIDTH = 512
FACEID_HIDDEN = 1024          # the ID MLP's hidden width: 2 x ArcFace
VIT_H_HIDDEN = 1280           # CLIP ViT-H/14 hidden width: what Plus and FaceID Plus resample
IMAGE_EMBEDS = {SD15: 1024, SDXL: 1280}   # image_embeds width: ViT-H (SD1.5), ViT-bigG (SDXL)
HEAD_WIDTH = 64

KINDS = ("faceid", "faceid-plus", "faceid-plus-v2", "faceid-portrait", "faceid-portrait-unnorm",
         "image-prompt", "image-prompt-plus")
LORA_KINDS = {"faceid", "faceid-plus", "faceid-plus-v2"}
TOKENS = {"faceid": 4, "faceid-plus": 4, "faceid-plus-v2": 4, "faceid-portrait": 16,
          "faceid-portrait-unnorm": 16, "image-prompt": 4, "image-prompt-plus": 16}

# Release names: the loader tells Plus v1/v2 apart by them. (No "portrait_sd15_unnorm" exists; see above.)
RELEASE_NAMES = {
    ("faceid", SD15): "ip-adapter-faceid_sd15", ("faceid", SDXL): "ip-adapter-faceid_sdxl",
    ("faceid-plus", SD15): "ip-adapter-faceid-plus_sd15", ("faceid-plus", SDXL): "ip-adapter-faceid-plus_sdxl",
    ("faceid-plus-v2", SD15): "ip-adapter-faceid-plusv2_sd15", ("faceid-plus-v2", SDXL): "ip-adapter-faceid-plusv2_sdxl",
    ("faceid-portrait", SD15): "ip-adapter-faceid-portrait-v11_sd15",
    ("faceid-portrait", SDXL): "ip-adapter-faceid-portrait_sdxl",
    ("faceid-portrait-unnorm", SD15): "ip-adapter-faceid-portrait_sd15_unnorm",
    ("faceid-portrait-unnorm", SDXL): "ip-adapter-faceid-portrait_sdxl_unnorm",
    ("image-prompt", SD15): "ip-adapter_sd15", ("image-prompt", SDXL): "ip-adapter_sdxl",
    ("image-prompt-plus", SD15): "ip-adapter-plus_sd15", ("image-prompt-plus", SDXL): "ip-adapter-plus_sdxl_vit-h",
}


def unet_cross_attention_widths(channels, depths, num_res_blocks: int, middle_depth: int) -> tuple[int, ...]:
    """Inner width of every attn2, in diffusers' attn_processors order (down, up, mid).

    `channels` / `depths`: per resolution level, the block width and transformer depth. Up blocks
    have one more res/attention block per level than down blocks.
    """
    down = [c for c, d in zip(channels, depths) for _ in range(num_res_blocks) for _ in range(d)]
    up = [c for c, d in reversed(list(zip(channels, depths))) for _ in range(num_res_blocks + 1) for _ in range(d)]
    return tuple(down + up + [channels[-1]] * middle_depth)


TINY_SD15_WIDTHS = unet_cross_attention_widths((320, 320, 320, 320), (1, 1, 1, 0), 2, 1)
SD15_WIDTHS = unet_cross_attention_widths((320, 640, 1280, 1280), (1, 1, 1, 0), 2, 1)
SDXL_WIDTHS = unet_cross_attention_widths((320, 640, 1280), (0, 2, 10), 2, 10)
SDXL_WIDTH_DIVISOR = 32
COMPACT_SDXL_WIDTHS = tuple(w // SDXL_WIDTH_DIVISOR for w in SDXL_WIDTHS)

DEFAULT_LAYER_WIDTHS = {SD15: TINY_SD15_WIDTHS, SDXL: COMPACT_SDXL_WIDTHS}
# None: the reference width (FaceID Plus: the context width; Plus: 768 / 1280).
DEFAULT_RESAMPLER_DIM = {SD15: None, SDXL: 256}
DEFAULT_LORA_RANK = {SD15: 8, SDXL: 4}
REFERENCE_PLUS_DIM = {SD15: 768, SDXL: 1280}
UNNORM_DIM = 1280              # the release's resampler width (latents [1, 16, 1280])
DEFAULT_UNNORM_DIM = 256       # adapter_state_dict's default: 82M parameters at 1280 buy a test nothing


class _Random:
    def __init__(self, seed: int, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def __call__(self, *shape: int, scale: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return torch.empty(*shape, dtype=self.dtype).normal_(mean, scale, generator=self.gen)


def _linear(sd: dict, rnd: _Random, name: str, out: int, inp: int, bias: bool = True) -> None:
    sd[f"{name}.weight"] = rnd(out, inp)
    if bias:
        sd[f"{name}.bias"] = rnd(out)


def _layer_norm(sd: dict, rnd: _Random, name: str, width: int) -> None:
    # Near 1, not 0: a zero LayerNorm weight would make every projection output identical.
    sd[f"{name}.weight"] = rnd(width, mean=1.0)
    sd[f"{name}.bias"] = rnd(width)


def _perceiver_blocks(sd: dict, rnd: _Random, prefix: str, dim: int, depth: int = 4, ff_mult: int = 4,
                      heads: int | None = None) -> None:
    """`PerceiverAttention` + `FeedForward` pairs, as in the reference resampler.py (bias-free linears).
    heads: 64-wide heads (default dim // 64, as the releases)."""
    inner = (heads or dim // HEAD_WIDTH) * HEAD_WIDTH
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        _layer_norm(sd, rnd, p + "0.norm1", dim)
        _layer_norm(sd, rnd, p + "0.norm2", dim)
        _linear(sd, rnd, p + "0.to_q", inner, dim, bias=False)
        _linear(sd, rnd, p + "0.to_kv", 2 * inner, dim, bias=False)
        _linear(sd, rnd, p + "0.to_out", dim, inner, bias=False)
        _layer_norm(sd, rnd, p + "1.0", dim)
        _linear(sd, rnd, p + "1.1", dim * ff_mult, dim, bias=False)
        _linear(sd, rnd, p + "1.3", dim, dim * ff_mult, bias=False)


def _resampler(sd: dict, rnd: _Random, dim: int, input_width: int, ctx: int, tokens: int, blocks: dict) -> None:
    """The reference `Resampler`: learned latents, proj_in from the input width, the blocks, proj_out, norm_out."""
    sd["latents"] = rnd(1, tokens, dim, scale=dim ** -0.5)
    _linear(sd, rnd, "proj_in", dim, input_width)
    _linear(sd, rnd, "proj_out", ctx, dim)
    _layer_norm(sd, rnd, "norm_out", ctx)
    _perceiver_blocks(sd, rnd, "", dim, **blocks)


def image_projection(kind: str, base: str, rnd: _Random, resampler_dim: int | None = None,
                     clip_hidden: int = VIT_H_HIDDEN, image_embeds: int | None = None, resampler_depth: int = 4,
                     resampler_heads: int | None = None, ff_mult: int = 4) -> dict[str, torch.Tensor]:
    """clip_hidden / image_embeds: the CLIP vision widths read (defaults: the released adapters').
    resampler_depth / resampler_heads / ff_mult: the resampler's blocks, 64-wide heads and feed-forward
    ratio (defaults: the releases', heads = width // 64); no loader constrains them, so a full-width
    resampler (SDXL FaceID Plus v2 needs 2048) can be made small by shrinking them."""
    blocks = {"depth": resampler_depth, "heads": resampler_heads, "ff_mult": ff_mult}
    ctx = CONTEXT[base]
    tokens = TOKENS[kind]
    sd: dict[str, torch.Tensor] = {}
    if kind == "faceid-portrait-unnorm":
        # Resampler(dim, depth 4, heads dim // 64, num_queries 16, embedding_dim ArcFace, output_dim ctx),
        # stored in fp32 as the release does
        _resampler(sd, rnd, resampler_dim or UNNORM_DIM, ARCFACE_WIDTH, ctx, tokens, blocks)
        return {k: v.float() for k, v in sd.items()}
    if kind.startswith("faceid"):
        # MLPProjModel / ProjPlusModel.proj: ArcFace -> 2x -> tokens x width, then LayerNorm per token.
        width = ctx if kind in ("faceid", "faceid-portrait") else (resampler_dim or ctx)
        _linear(sd, rnd, "proj.0", FACEID_HIDDEN, ARCFACE_WIDTH)
        _linear(sd, rnd, "proj.2", width * tokens, FACEID_HIDDEN)
        _layer_norm(sd, rnd, "norm", width)
        if kind.startswith("faceid-plus"):
            # FacePerceiverResampler(dim=width, heads=width // 64, embedding_dim=ViT-H, output_dim=ctx)
            _linear(sd, rnd, "perceiver_resampler.proj_in", width, clip_hidden)
            _linear(sd, rnd, "perceiver_resampler.proj_out", ctx, width)
            _layer_norm(sd, rnd, "perceiver_resampler.norm_out", ctx)
            _perceiver_blocks(sd, rnd, "perceiver_resampler.", width, **blocks)
    elif kind == "image-prompt":
        _linear(sd, rnd, "proj", ctx * tokens, image_embeds or IMAGE_EMBEDS[base])
        _layer_norm(sd, rnd, "norm", ctx)
    elif kind == "image-prompt-plus":
        # Resampler(dim, depth 4, heads dim // 64, num_queries 16, embedding_dim ViT-H, output_dim ctx)
        _resampler(sd, rnd, resampler_dim or REFERENCE_PLUS_DIM[base], clip_hidden, ctx, tokens, blocks)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return sd


def attention_layers(widths, context: int, rnd: _Random, lora_rank: int | None) -> dict[str, torch.Tensor]:
    """`ip_adapter`: to_k_ip / to_v_ip at 2n+1; with LoRA, every processor (attn1 at 2n, attn2 at 2n+1) gets
    to_{q,k,v,out}_lora, as the FaceID releases' LoRA attention processors do."""
    sd: dict[str, torch.Tensor] = {}
    for n, width in enumerate(widths):
        for key, kv_in in ((2 * n, width), (2 * n + 1, context)):
            if lora_rank:
                for proj, inp in (("to_q", width), ("to_k", kv_in), ("to_v", kv_in), ("to_out", width)):
                    sd[f"{key}.{proj}_lora.down.weight"] = rnd(lora_rank, inp)
                    sd[f"{key}.{proj}_lora.up.weight"] = rnd(width, lora_rank)
        sd[f"{2 * n + 1}.to_k_ip.weight"] = rnd(width, context)
        sd[f"{2 * n + 1}.to_v_ip.weight"] = rnd(width, context)
    return sd


def adapter_state_dict(kind: str, base: str, *, seed: int = 0, layer_widths=None, resampler_dim: int | None = -1,
                       lora_rank: int | None = -1, dtype: torch.dtype = torch.float16,
                       clip_hidden: int = VIT_H_HIDDEN, image_embeds: int | None = None, resampler_depth: int = 4,
                       resampler_heads: int | None = None, ff_mult: int = 4) -> dict[str, dict]:
    """The nested `{"image_proj", "ip_adapter"}` state dict of one adapter; -1 / None pick the defaults above."""
    if kind not in KINDS or base not in BASES:
        raise ValueError(f"unknown kind/base {kind!r}/{base!r}")
    rnd = _Random(seed, dtype)
    if resampler_dim == -1:
        resampler_dim = DEFAULT_UNNORM_DIM if kind == "faceid-portrait-unnorm" else DEFAULT_RESAMPLER_DIM[base]
    if lora_rank == -1:
        lora_rank = DEFAULT_LORA_RANK[base]
    widths = tuple(layer_widths) if layer_widths is not None else DEFAULT_LAYER_WIDTHS[base]
    return {
        "image_proj": image_projection(kind, base, rnd, resampler_dim, clip_hidden, image_embeds, resampler_depth,
                                       resampler_heads, ff_mult),
        "ip_adapter": attention_layers(widths, CONTEXT[base], rnd, lora_rank if kind in LORA_KINDS else None),
    }


# Kinds whose files differ only in name: one state dict serves both.
SAME_TENSORS = {"faceid-plus-v2": "faceid-plus"}


@functools.lru_cache(maxsize=None)
def shared_state_dict(kind: str, base: str) -> dict[str, dict]:
    """`adapter_state_dict(kind, base)` with the defaults, generated once per process. Shared: copy before changing."""
    return adapter_state_dict(SAME_TENSORS.get(kind, kind), base)


def copy_state_dict(nested: dict[str, dict]) -> dict[str, dict]:
    return {section: dict(tensors) for section, tensors in nested.items()}


def flatten(nested: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {f"{section}.{k}": v for section, tensors in nested.items() for k, v in tensors.items()}


def write_adapter(path: Path, nested: dict[str, dict], flat: bool | None = None) -> Path:
    """.safetensors: flat, as the conversions ship. .bin: nested, as the reference releases (torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in flatten(nested).items()}, str(path))
    else:
        torch.save(flatten(nested) if flat else nested, path)
    return path


def release_file_name(kind: str, base: str, suffix: str) -> str:
    return RELEASE_NAMES[(kind, base)] + suffix


# --- files that are not adapters ------------------------------------------------------------------

def checkpoint_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    rnd = _Random(seed, torch.float16)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": rnd(32, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": rnd(32, 768),
        "first_stage_model.decoder.conv_in.weight": rnd(8, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": rnd(16, 8),
    }


def lora_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    rnd = _Random(seed, torch.float16)
    return {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": rnd(8, 768),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": rnd(320, 8),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(8.0),
    }


class _CreatesFile:
    """Unpickling this calls builtins.open(marker, "w"): it creates `marker` if anything ever runs it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def write_malicious_bin(path: Path, marker: Path) -> Path:
    """An adapter-shaped .bin whose pickle also carries a payload that creates `marker` when unpickled."""
    nested = adapter_state_dict("faceid", SD15, layer_widths=(320,), lora_rank=None)
    nested["ip_adapter"]["payload"] = _CreatesFile(marker)
    torch.save(nested, path)
    return Path(path)
