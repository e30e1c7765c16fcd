"""IP-Adapter weight files: read them, recognise what they are, and map them onto typed objects.

The only module that knows the files' layout. Everything downstream gets an `IPAdapterWeights`.

Two layouts hold the same tensors: the reference `.bin` releases pickle a nested
`{"image_proj": {...}, "ip_adapter": {...}}`, the `.safetensors` conversions flatten it to
`image_proj.<key>` / `ip_adapter.<key>`. In `ip_adapter`, key `2n+1` is the n-th cross-attention
layer of the UNet in diffusers' `attn_processors` order (even keys are self-attention, which only the
FaceID LoRA touches).

Projections are recognised from a table (`PROJECTION_LAYOUTS`): one entry per image-projection
layout, each giving the keys that identify it, how its shapes read, and which kinds those shapes
allow. A new format (e.g. a FaceStudio-native adapter) is one more entry.

FaceStudio's own trained adapters (training/, attention/facestudio_fusion.py) use the same two sections,
with the fusion's keys in `image_proj` and a safetensors header (attention/facestudio_metadata.py) that
records the recognizer, encoders and training they were made with.

One layout serves two kinds: a perceiver resampler (learned `latents`, `proj_in`, `proj_out`,
`norm_out`) is IP-Adapter Plus when `proj_in` reads CLIP hidden states, and FaceID Portrait unnorm
(ip-adapter-faceid-portrait_sdxl_unnorm.bin) when it reads the 512-wide ArcFace embedding.
"""
from __future__ import annotations

import enum
import os
import pickle
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import safetensors
import safetensors.torch
import torch

from .facestudio_metadata import FaceStudioMetadata, MetadataError

IPADAPTER_FOLDER = "ipadapter"
KIND_AUTO = "auto"

BASE_SD15 = "SD1.5"
BASE_SDXL = "SDXL"
# The UNet's text-context width is what tells the base models apart.
BASE_BY_CONTEXT = {768: BASE_SD15, 2048: BASE_SDXL}
_UNSUPPORTED_CONTEXT = {1024: "SD2.x"}

# Every attention head in the reference projections is 64 wide.
_HEAD_WIDTH = 64
# ArcFace (insightface's w600k_r50) embedding width. No CLIP vision model released with an IP-Adapter
# has hidden states this narrow (ViT-L/14 1024, ViT-H/14 1280, ViT-bigG/14 1664), so a resampler
# whose proj_in reads 512 features reads a face embedding.
_ARCFACE_WIDTH = 512


class AdapterError(ValueError):
    """An adapter file that cannot be used, or one that does not fit a model; the message says how to fix it."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


class AdapterKind(str, enum.Enum):
    FACEID = "faceid"
    FACEID_PLUS = "faceid-plus"
    FACEID_PLUS_V2 = "faceid-plus-v2"
    FACEID_PORTRAIT = "faceid-portrait"
    FACEID_PORTRAIT_UNNORM = "faceid-portrait-unnorm"
    IMAGE_PROMPT = "image-prompt"
    IMAGE_PROMPT_PLUS = "image-prompt-plus"
    FACESTUDIO = "facestudio"

    @property
    def label(self) -> str:
        return _KIND_LABELS[self]

    @property
    def is_identity(self) -> bool:
        """Driven by a face-recognition (ArcFace) embedding."""
        return self not in (AdapterKind.IMAGE_PROMPT, AdapterKind.IMAGE_PROMPT_PLUS)

    @property
    def is_style(self) -> bool:
        """Driven by a CLIP image embedding only: FaceStudio's style-image guidance."""
        return not self.is_identity

    @property
    def clip_input(self) -> str | None:
        """Which CLIP vision output the projection reads, if any."""
        if self in (AdapterKind.IMAGE_PROMPT, AdapterKind.FACESTUDIO):
            return "image_embeds"
        if self in (AdapterKind.IMAGE_PROMPT_PLUS, AdapterKind.FACEID_PLUS, AdapterKind.FACEID_PLUS_V2):
            return "penultimate_hidden_states"
        return None


_KIND_LABELS = {
    AdapterKind.FACEID: "IP-Adapter FaceID",
    AdapterKind.FACEID_PLUS: "IP-Adapter FaceID Plus",
    AdapterKind.FACEID_PLUS_V2: "IP-Adapter FaceID Plus v2",
    AdapterKind.FACEID_PORTRAIT: "IP-Adapter FaceID Portrait",
    AdapterKind.FACEID_PORTRAIT_UNNORM: "IP-Adapter FaceID Portrait (unnormalised embedding)",
    AdapterKind.IMAGE_PROMPT: "IP-Adapter (image prompt)",
    AdapterKind.IMAGE_PROMPT_PLUS: "IP-Adapter Plus (image prompt)",
    AdapterKind.FACESTUDIO: "FaceStudio adapter (hybrid image/text identity guidance)",
}

KIND_CHOICES: tuple[str, ...] = (KIND_AUTO, *(k.value for k in AdapterKind))

# Variants with identical keys; only the release's file name tells them apart. (Portrait unnorm
# needs no hint: its resampler layout says what it is.)
_NAME_HINTS: tuple[tuple[AdapterKind, str], ...] = (
    (AdapterKind.FACEID_PLUS_V2, "v2"),
)


@dataclass(frozen=True, eq=False)
class IPAdapterWeights:
    """A recognised IP-Adapter file: what it is, the widths it expects, and its tensors (read-only)."""

    kind: AdapterKind
    base_model: str                      # "SD1.5" | "SDXL"
    context_dim: int                     # text-context width of the UNet it was trained on
    clip_width: int | None               # width of the CLIP vision features it reads; None: no CLIP
    id_embedding_width: int | None       # face-recognition embedding width (ArcFace: 512); None: no face
    num_tokens: int                      # context tokens per embedding
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...] = field(repr=False)  # (to_k_ip, to_v_ip), key order
    image_proj: Mapping[str, torch.Tensor] = field(repr=False)
    lora_key_count: int                  # FaceID's LoRA keys present in the file
    source: str                          # file name, for messages
    # FaceID's attention-processor LoRA ('<n>.to_q_lora.down.weight', ...): applied by attention/lora.py.
    lora: Mapping[str, torch.Tensor] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    text_width: int | None = None        # FaceStudio: the pooled text embedding (e_T) it reads
    facestudio: FaceStudioMetadata | None = None  # FaceStudio: what its header records

    @property
    def layer_count(self) -> int:
        return len(self.layers)

    @property
    def inner_widths(self) -> tuple[int, ...]:
        return tuple(k.shape[0] for k, _ in self.layers)

    @property
    def is_identity(self) -> bool:
        return self.kind.is_identity

    @property
    def is_style(self) -> bool:
        return self.kind.is_style

    @property
    def has_lora(self) -> bool:
        return self.lora_key_count > 0

    def describe(self) -> str:
        clip = f", CLIP width {self.clip_width}" if self.clip_width else ""
        face = f", face embedding {self.id_embedding_width}" if self.id_embedding_width else ""
        lora = f", {self.lora_key_count} LoRA keys" if self.lora_key_count else ""
        text = f", text embedding {self.text_width}" if self.text_width else ""
        made = f"; {self.facestudio.describe()}" if self.facestudio is not None else ""
        return (f"{self.source}: {self.kind.label} for {self.base_model}, {self.layer_count} layers, "
                f"{self.num_tokens} tokens{clip}{face}{text}{lora}{made}")


# --- image-projection layouts ---------------------------------------------------------------------

@dataclass(frozen=True)
class ProjectionShape:
    """What a projection's shapes say."""

    output_width: int            # width of the tokens it makes: must be the UNet's context width
    num_tokens: int
    clip_width: int | None
    id_embedding_width: int | None
    text_width: int | None = None


class _Tensors:
    """One section of the file, with shape lookups that fail with a message naming file and layout."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], section: str, source: str, layout: str):
        self.tensors, self.section, self.source, self.layout = tensors, section, source, layout

    def shape(self, key: str, ndim: int) -> tuple[int, ...]:
        if key not in self.tensors:
            raise AdapterError(f"{self.source}: looks like {self.layout}, but its {self.section} has no '{key}'. "
                               "The file is incomplete or was saved by an incompatible tool; download it again.")
        shape = tuple(self.tensors[key].shape)
        if len(shape) != ndim:
            raise AdapterError(f"{self.source}: '{self.section}.{key}' has shape {list(shape)}; {self.layout} "
                               f"needs a {ndim}-D tensor there. The file is damaged or not a release file.")
        return shape

    def fail(self, what: str) -> AdapterError:
        return AdapterError(f"{self.source}: looks like {self.layout}, but {what}. "
                            "The file is damaged or was changed after release; download it again.")


def _tokens(total: int, width: int, t: _Tensors, what: str) -> int:
    if width <= 0 or total % width:
        raise t.fail(f"{what} ({total}) is not a whole number of {width}-wide tokens")
    return total // width


def _check_perceiver(t: _Tensors, prefix: str, width: int) -> None:
    """The PerceiverAttention + FeedForward stack both resamplers share (64-wide heads)."""
    if f"{prefix}layers.0.0.to_q.weight" not in t.tensors:
        raise t.fail(f"it has no '{prefix}layers.0.*' attention blocks")
    depth = 0
    while f"{prefix}layers.{depth}.0.to_q.weight" in t.tensors:
        inner, q_in = t.shape(f"{prefix}layers.{depth}.0.to_q.weight", 2)
        kv, _ = t.shape(f"{prefix}layers.{depth}.0.to_kv.weight", 2)
        out, _ = t.shape(f"{prefix}layers.{depth}.0.to_out.weight", 2)
        ff_out, _ = t.shape(f"{prefix}layers.{depth}.1.3.weight", 2)
        if q_in != width or kv != 2 * inner or out != width or ff_out != width or inner % _HEAD_WIDTH:
            raise t.fail(f"its resampler block {depth} is not {width} wide throughout")
        depth += 1


def _read_faceid_mlp(t: _Tensors) -> ProjectionShape:
    hidden, id_width = t.shape("proj.0.weight", 2)
    total, hidden2 = t.shape("proj.2.weight", 2)
    (width,) = t.shape("norm.weight", 1)
    if hidden2 != hidden:
        raise t.fail(f"proj.2 reads {hidden2} features but proj.0 makes {hidden}")
    return ProjectionShape(width, _tokens(total, width, t, "proj.2's output"), None, id_width)


def _read_faceid_plus(t: _Tensors) -> ProjectionShape:
    base = _read_faceid_mlp(t)
    dim, clip_width = t.shape("perceiver_resampler.proj_in.weight", 2)
    output_width, dim2 = t.shape("perceiver_resampler.proj_out.weight", 2)
    (norm_out,) = t.shape("perceiver_resampler.norm_out.weight", 1)
    # The resampler's latents are the MLP's tokens, so its width must be theirs.
    if dim != base.output_width or dim2 != dim or norm_out != output_width:
        raise t.fail(f"its perceiver resampler (width {dim}, output {output_width}) does not fit the "
                     f"{base.output_width}-wide ID tokens")
    _check_perceiver(t, "perceiver_resampler.", dim)
    return ProjectionShape(output_width, base.num_tokens, clip_width, base.id_embedding_width)


def _read_image_prompt(t: _Tensors) -> ProjectionShape:
    total, clip_width = t.shape("proj.weight", 2)
    (width,) = t.shape("norm.weight", 1)
    return ProjectionShape(width, _tokens(total, width, t, "proj's output"), clip_width, None)


def _read_resampler(t: _Tensors) -> ProjectionShape:
    _, num_tokens, dim = t.shape("latents", 3)
    dim_in, input_width = t.shape("proj_in.weight", 2)
    output_width, dim_out = t.shape("proj_out.weight", 2)
    (norm_out,) = t.shape("norm_out.weight", 1)
    if dim_in != dim or dim_out != dim or norm_out != output_width:
        raise t.fail(f"its resampler widths disagree (latents {dim}, proj_in {dim_in}, proj_out {dim_out})")
    _check_perceiver(t, "", dim)
    if input_width == _ARCFACE_WIDTH:  # FaceID Portrait unnorm: the raw face embeddings are its input sequence
        return ProjectionShape(output_width, num_tokens, None, input_width)
    return ProjectionShape(output_width, num_tokens, input_width, None)


def _read_facestudio(t: _Tensors) -> ProjectionShape:
    width, clip_width = t.shape("image_in.weight", 2)
    width2, text_width = t.shape("text_in.weight", 2)
    (path_width,) = t.shape("path_norm.weight", 1)
    (id_width,) = t.shape("face_norm.weight", 1)
    total, fused_in = t.shape("fusion.weight", 2)
    (context,) = t.shape("norm.weight", 1)
    if not width == width2 == path_width or fused_in != width + id_width:
        raise t.fail(f"its fusion reads {fused_in} features, but the image/text paths are {width} / {width2} wide "
                     f"and the face {id_width}")
    return ProjectionShape(context, _tokens(total, context, t, "fusion's output"), clip_width, id_width, text_width)


def _resampler_kinds(shape: ProjectionShape) -> tuple[AdapterKind, ...]:
    if shape.id_embedding_width is not None:
        return (AdapterKind.FACEID_PORTRAIT_UNNORM,)
    return (AdapterKind.IMAGE_PROMPT_PLUS,)


def _faceid_mlp_kinds(shape: ProjectionShape) -> tuple[AdapterKind, ...]:
    if shape.num_tokens == 4:
        return (AdapterKind.FACEID,)
    if shape.num_tokens == 16:
        return (AdapterKind.FACEID_PORTRAIT,)
    return ()


@dataclass(frozen=True)
class ProjectionLayout:
    name: str
    signature: tuple[str, ...]                            # image_proj keys that all must be present
    excludes: tuple[str, ...]                             # key prefixes that rule it out
    read: Callable[[_Tensors], ProjectionShape]
    kinds: Callable[[ProjectionShape], tuple[AdapterKind, ...]]  # kinds these shapes allow; default first
    expects: str                                          # for the message when `kinds` allows none

    def matches(self, keys: set[str]) -> bool:
        return all(k in keys for k in self.signature) and not any(
            k.startswith(p) for k in keys for p in self.excludes)


# Most specific first: FaceID Plus contains the FaceID MLP's keys.
PROJECTION_LAYOUTS: tuple[ProjectionLayout, ...] = (
    ProjectionLayout(
        "a FaceStudio fusion (image + identity and text + identity through one shared map)",
        ("image_in.weight", "text_in.weight", "fusion.weight", "norm.weight"), (),
        _read_facestudio, lambda s: (AdapterKind.FACESTUDIO,), "",
    ),
    ProjectionLayout(
        "a FaceID Plus projection (ID MLP + perceiver resampler)",
        ("proj.0.weight", "proj.2.weight", "norm.weight", "perceiver_resampler.proj_in.weight"), (),
        _read_faceid_plus, lambda s: (AdapterKind.FACEID_PLUS, AdapterKind.FACEID_PLUS_V2), "",
    ),
    ProjectionLayout(
        "a FaceID MLP projection",
        ("proj.0.weight", "proj.2.weight", "norm.weight"), ("perceiver_resampler.", "proj.3."),
        _read_faceid_mlp, _faceid_mlp_kinds, "FaceID has 4 tokens and FaceID Portrait 16",
    ),
    ProjectionLayout(
        "an image-prompt projection (ImageProjModel)",
        ("proj.weight", "norm.weight"), ("latents",),
        _read_image_prompt, lambda s: (AdapterKind.IMAGE_PROMPT,), "",
    ),
    ProjectionLayout(
        "a perceiver resampler (image-prompt Plus over CLIP features; FaceID Portrait unnorm over "
        f"{_ARCFACE_WIDTH}-wide face embeddings)",
        ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"), (),
        _read_resampler, _resampler_kinds, "",
    ),
)

# Real IP-Adapter layouts FaceStudio does not run: say so rather than "unknown".
_UNSUPPORTED_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("proj.0.weight", "proj.3.weight"),
     "an IP-Adapter full-face projection (257 CLIP tokens), which FaceStudio does not support; "
     "use ip-adapter-plus-face or a FaceID model instead"),
)


# --- other model families, for a helpful message ----------------------------------------------------

# (key fragments, what it is, where it belongs). First match wins, so LoRA comes before UNets.
_FOREIGN_FILES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora.down.", "lora.up."),
     "a LoRA", "models/loras (FaceID's companion '..._lora.safetensors' is one: load it with a LoRA loader)"),
    (("model.diffusion_model.",), "a Stable Diffusion checkpoint", "models/checkpoints (Load Checkpoint)"),
    (("input_blocks.", "down_blocks.", "double_blocks.", "joint_blocks."),
     "a diffusion model (UNet / transformer) without IP-Adapter layers", "models/diffusion_models"),
    (("vision_model.", "visual.transformer."), "a CLIP vision encoder", "models/clip_vision"),
    (("text_model.", "cond_stage_model.", "transformer.resblocks."), "a text encoder", "models/text_encoders"),
    (("encoder.down.", "decoder.up.", "first_stage_model."), "a VAE", "models/vae"),
    (("control_model.", "controlnet_", "input_hint_block."), "a ControlNet", "models/controlnet"),
)


def _describe_foreign(keys: list[str], source: str) -> AdapterError:
    for fragments, what, where in _FOREIGN_FILES:
        if any(f in k for k in keys for f in fragments):
            return AdapterError(
                f"{source} is not an IP-Adapter: it looks like {what} (keys such as '{_example(keys, fragments)}'). "
                f"Move it to {where}, and put an IP-Adapter FaceID or image-prompt file in models/{IPADAPTER_FOLDER}.")
    shown = ", ".join(repr(k) for k in keys[:5])
    return AdapterError(
        f"{source} is not an IP-Adapter: it has no 'image_proj' / 'ip_adapter' sections "
        f"({len(keys)} keys, e.g. {shown}). Expected an IP-Adapter FaceID or image-prompt release file "
        "(nested image_proj/ip_adapter, or flat 'image_proj.*' / 'ip_adapter.*' keys).")


def _example(keys: list[str], fragments: tuple[str, ...]) -> str:
    return next(k for k in keys if any(f in k for f in fragments))


# --- reading files --------------------------------------------------------------------------------

def read_state_dict(path: str) -> dict[str, Any]:
    """The raw state dict of a `.safetensors` or weights-only `.bin`; AdapterError for anything unreadable."""
    source = os.path.basename(path)
    if not os.path.isfile(path):
        raise AdapterError(f"{path} does not exist or is not a file.")
    if os.path.getsize(path) == 0:
        raise AdapterError(f"{source} is empty (0 bytes): the download or copy did not finish; download it again.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        return _read_safetensors(path, source)
    if suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return _read_pickle(path, source)
    raise AdapterError(f"{source}: unsupported file type '{suffix}'; IP-Adapter files are .safetensors or .bin.")


def _read_safetensors(path: str, source: str) -> dict[str, Any]:
    try:
        # The header alone tells a checkpoint from an adapter: no need to load gigabytes to say so.
        with safetensors.safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        if keys and not any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
            raise _describe_foreign(keys, source)
        return safetensors.torch.load_file(path, device="cpu")
    except AdapterError:
        raise
    except Exception as e:  # SafetensorError and OSError alike: the file is not whole
        raise AdapterError(f"{source} is truncated or corrupt, or not a safetensors file ({e}). "
                           "Download it again.") from None


# What the weights-only unpickler says when a pickle asks for code (a global or a call), as opposed to a
# pickle that is merely cut off or garbled.
_CODE_REFUSALS = ("GLOBAL", "unrecognized function", "add_safe_globals")


def _reason(error: BaseException) -> str:
    """The informative line of a loader exception (torch's weights-only errors lead with a long preamble)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((part.strip() for part in text.splitlines() if part.strip()), "unexpected end of file")
    return f"{type(error).__name__}: {line[:200]}"


def _read_pickle(path: str, source: str) -> dict[str, Any]:
    try:
        # weights_only: the unpickler builds tensors and containers only and refuses any other global,
        # so a crafted pickle is rejected before it can run anything.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if not any(marker in text for marker in _CODE_REFUSALS):  # a cut-off or garbled pickle, not a refusal
            raise AdapterError(f"{source} is truncated or corrupt, or not a PyTorch file ({_reason(e)}). "
                               "Download it again.") from None
        culprit = re.search(r"GLOBAL ([\w.]+)", text)
        called = f" ({culprit.group(1)})" if culprit else ""
        raise AdapterError(
            f"Refused to load {source}: besides tensors its pickle asks to call Python code{called}, which "
            "could run anything on this machine. Release IP-Adapter "
            ".bin files hold tensors only, so this file is not one, or it was tampered with. "
            "Use the .safetensors version of the adapter from its official source.") from None
    except Exception as e:  # noqa: BLE001 - torch.load on a damaged file raises struct.error, EOFError,
        # RuntimeError (zip reader), UnicodeDecodeError, ...: whatever it is, the file is not whole.
        raise AdapterError(f"{source} is truncated or corrupt, or not a PyTorch file ({_reason(e)}). "
                           "Download it again.") from None


def split_sections(raw: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(image_proj, ip_adapter) from the nested or the flat layout."""
    if not isinstance(raw, Mapping):
        raise AdapterError(f"{source} holds a {type(raw).__name__}, not a state dict; it is not an IP-Adapter file.")
    if not raw:
        raise AdapterError(f"{source} contains no tensors at all; download it again.")
    sections: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in raw.items():
        key = str(key)
        if key in sections and isinstance(value, Mapping):
            sections[key].update((str(k), v) for k, v in value.items())
            continue
        head, _, rest = key.partition(".")
        if head in sections and rest:
            sections[head][rest] = value
    image_proj, ip_adapter = sections["image_proj"], sections["ip_adapter"]
    if not image_proj and not ip_adapter:
        inner = next((v for k, v in raw.items() if k in ("state_dict", "model") and isinstance(v, Mapping)), None)
        raise _describe_foreign([str(k) for k in (inner if inner is not None else raw)], source)
    for name, section in sections.items():
        if not section:
            other = "ip_adapter" if name == "image_proj" else "image_proj"
            raise AdapterError(f"{source} has an '{other}' section but no '{name}' section: it is an incomplete "
                               "IP-Adapter file. Download it again.")
        bad = [k for k, v in section.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise AdapterError(f"{source}: {name}.{bad[0]} is a {type(section[bad[0]]).__name__}, not a tensor; "
                               "the file is not a release IP-Adapter file.")
    return image_proj, ip_adapter


# --- recognising ---------------------------------------------------------------------------------

_IP_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip)\.weight$")
_LORA_KEY = re.compile(r"^\d+\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _read_layers(ip_adapter: Mapping[str, torch.Tensor], source: str):
    """(to_k_ip, to_v_ip) per layer in key order, the context width, and the number of LoRA keys."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    lora: dict[str, torch.Tensor] = {}
    odd = []
    for key, tensor in ip_adapter.items():
        m = _IP_KEY.match(key)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
        elif _LORA_KEY.match(key):
            lora[key] = tensor
        else:
            odd.append(key)
    if odd:
        raise AdapterError(f"{source}: unexpected keys in ip_adapter ({', '.join(repr(k) for k in odd[:4])}"
                           f"{', ...' if len(odd) > 4 else ''}); expected '<n>.to_k_ip.weight' / '<n>.to_v_ip.weight' "
                           "pairs (and FaceID LoRA keys). The file is not a release IP-Adapter file.")
    if not found:
        raise AdapterError(f"{source}: the ip_adapter section has no to_k_ip / to_v_ip layers"
                           f"{' (only LoRA keys)' if lora else ''}; it is not a complete IP-Adapter file.")
    indices = sorted(found)
    even = [i for i in indices if i % 2 == 0]
    if even:
        raise AdapterError(f"{source}: to_k_ip / to_v_ip under even keys {even[:5]}; those number self-attention "
                           "layers, which IP-Adapter does not change. The file is damaged or not a release file.")
    missing = [i for i in range(1, indices[-1], 2) if i not in found]
    if missing:
        raise AdapterError(f"{source}: cross-attention layer keys must be 1, 3, 5, ... with none left out; "
                           f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}. The file is incomplete.")
    layers = []
    contexts: dict[int, int] = {}
    for i in indices:
        pair = found[i]
        for name in ("to_k_ip", "to_v_ip"):
            if name not in pair:
                raise AdapterError(f"{source}: layer {i} has no '{i}.{name}.weight'; the file is incomplete.")
        k, v = pair["to_k_ip"], pair["to_v_ip"]
        if k.ndim != 2 or k.shape != v.shape:
            raise AdapterError(f"{source}: layer {i} has to_k_ip {list(k.shape)} and to_v_ip {list(v.shape)}; "
                               "both must be the same [inner width, context width] matrix.")
        contexts.setdefault(k.shape[1], i)
        layers.append((k, v))
    if len(contexts) > 1:
        seen = ", ".join(f"{w} (from layer {i})" for w, i in contexts.items())
        raise AdapterError(f"{source}: inconsistent layer widths: its layers read context widths {seen}; "
                           "a real adapter uses one. The file is damaged or mixes two adapters.")
    return tuple(layers), next(iter(contexts)), lora


def _base_for_context(context: int, source: str) -> str:
    base = BASE_BY_CONTEXT.get(context)
    if base is None:
        other = _UNSUPPORTED_CONTEXT.get(context)
        family = f" ({other}), which FaceStudio does not support" if other else ""
        raise AdapterError(f"{source}: its layers read a {context}-wide text context{family}; "
                           "FaceStudio runs SD1.5 (768) and SDXL (2048) adapters.")
    return base


def _find_layout(image_proj: Mapping[str, torch.Tensor], source: str) -> ProjectionLayout:
    keys = set(image_proj)
    for signature, message in _UNSUPPORTED_LAYOUTS:
        if all(k in keys for k in signature):
            raise AdapterError(f"{source} is {message}.")
    for layout in PROJECTION_LAYOUTS:
        if layout.matches(keys):
            return layout
    shown = ", ".join(sorted(keys)[:6])
    known = "; ".join(f"{l.name}: {', '.join(l.signature)}" for l in PROJECTION_LAYOUTS)
    raise AdapterError(f"{source}: unknown image projection layout (image_proj keys: {shown}"
                       f"{', ...' if len(keys) > 6 else ''}). Known layouts — {known}.")


def _choose_kind(candidates: tuple[AdapterKind, ...], requested: str, source: str, layout: ProjectionLayout,
                 shape: ProjectionShape) -> AdapterKind:
    if not candidates:
        raise AdapterError(f"{source}: {layout.name} with {shape.num_tokens} tokens per embedding matches no known "
                           f"release ({layout.expects}).")
    if requested != KIND_AUTO:
        try:
            kind = AdapterKind(requested)
        except ValueError:
            choices = ", ".join(KIND_CHOICES)
            raise AdapterError(f"Unknown adapter kind '{requested}'; choose one of {choices}.") from None
        if kind not in candidates:
            allowed = ", ".join(k.value for k in candidates)
            raise AdapterError(f"{source} was set to kind '{kind.value}', but its keys say {candidates[0].label} "
                               f"({layout.name}, {shape.num_tokens} tokens): choose {allowed} or 'auto'.")
        return kind
    name = source.lower()
    for kind, hint in _NAME_HINTS:
        if kind in candidates and hint in name:
            return kind
    return candidates[0]


def _facestudio_metadata(header: Mapping[str, str] | None, source: str, base: str,
                         shape: ProjectionShape) -> FaceStudioMetadata:
    try:
        meta = FaceStudioMetadata.from_header(header, source)
    except MetadataError as e:
        raise AdapterError(str(e)) from None
    if meta.base_model != base or meta.num_tokens != shape.num_tokens:
        raise AdapterError(f"{source}: its header says {meta.base_model or 'no base model'} with {meta.num_tokens} "
                           f"tokens, but its tensors are {base}'s with {shape.num_tokens}: the header belongs to "
                           "another file. Save the adapter again.")
    if meta.recognizer.embedding_dim != shape.id_embedding_width:
        raise AdapterError(f"{source}: its header's recognizer makes {meta.recognizer.embedding_dim}-wide embeddings "
                           f"but its fusion reads {shape.id_embedding_width}: the file was changed after it was saved.")
    return meta


def recognise(image_proj: Mapping[str, torch.Tensor], ip_adapter: Mapping[str, torch.Tensor], source: str,
              kind: str = KIND_AUTO, header: Mapping[str, str] | None = None) -> IPAdapterWeights:
    """Types a state dict's two sections. `kind` overrides the file-name hints; it must agree with the keys.
    `header`: the safetensors metadata, which a FaceStudio adapter needs."""
    layers, context, lora = _read_layers(ip_adapter, source)
    base = _base_for_context(context, source)
    layout = _find_layout(image_proj, source)
    shape = layout.read(_Tensors(image_proj, "image_proj", source, layout.name))
    if shape.output_width != context:
        raise AdapterError(f"{source}: its image projection makes {shape.output_width}-wide tokens but its "
                           f"attention layers read {context}-wide context; the file mixes two adapters or is damaged.")
    chosen = _choose_kind(layout.kinds(shape), kind, source, layout, shape)
    meta = _facestudio_metadata(header, source, base, shape) if chosen is AdapterKind.FACESTUDIO else None
    return IPAdapterWeights(
        kind=chosen, base_model=base, context_dim=context, clip_width=shape.clip_width,
        id_embedding_width=shape.id_embedding_width, num_tokens=shape.num_tokens, layers=layers,
        image_proj=MappingProxyType(dict(image_proj)), lora_key_count=len(lora), source=source,
        lora=MappingProxyType(lora), text_width=shape.text_width, facestudio=meta,
    )


def load_adapter(path: str, kind: str = KIND_AUTO) -> IPAdapterWeights:
    """Reads and recognises an IP-Adapter file; AdapterError says what is wrong with any other file."""
    source = os.path.basename(path)
    image_proj, ip_adapter = split_sections(read_state_dict(path), source)
    return recognise(image_proj, ip_adapter, source, kind, read_header(path))


def read_header(path: str) -> dict[str, str]:
    """A .safetensors file's metadata (empty for other files, which have none); read after
    read_state_dict, which has said what is wrong with an unreadable file."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        return {}
    with safetensors.safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


# --- the ipadapter model folder -------------------------------------------------------------------

def adapter_file_names() -> list[str]:
    import folder_paths

    if IPADAPTER_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return folder_paths.get_filename_list(IPADAPTER_FOLDER)


def plain_name_parts(name: str) -> list[str] | None:
    """The path parts of `name` when it names a file inside a model folder (not empty, not absolute, no
    drive letter, no '..'), else None: what Load Adapter reads and Train Adapter writes."""
    parts = re.split(r"[\\/]", name or "")
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        return None
    return parts


def resolve_adapter_path(name: str) -> str:
    """The full path of `name` inside the host's ipadapter folders; never a path outside them."""
    import folder_paths

    if plain_name_parts(name) is None:
        raise AdapterError(f"'{name}' is not a file name inside models/{IPADAPTER_FOLDER}: adapters are "
                           "chosen from that folder (sub-folders allowed, no absolute paths or '..').")
    entry = folder_paths.folder_names_and_paths.get(IPADAPTER_FOLDER)
    folders = list(entry[0]) if entry else []
    for folder in folders:
        root = os.path.abspath(folder)
        candidate = os.path.abspath(os.path.join(root, name))
        if os.path.commonpath([root, candidate]) == root and os.path.isfile(candidate):
            return candidate
    raise AdapterError(f"No adapter file '{name}' in the {IPADAPTER_FOLDER} model folders "
                       f"({', '.join(folders) or 'none registered'}). Put it there and refresh the node list.")
