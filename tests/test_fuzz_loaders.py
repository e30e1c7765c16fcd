"""Fuzzing the two file loaders: attention/adapters.py `load_adapter` and encoders/identity.py `load_identity`.

Every file, however damaged, either loads or raises the pack's own error (AdapterError / IdentityError,
whose messages the nodes show); never a KeyError, TypeError, struct.error or a crash. The files start
from small valid ones built here (same key names and layouts as the releases, narrow widths), which
each test first checks do load, then get byte flips, truncation, random headers, and structured
changes inside a valid container: keys dropped, renamed or added, tensors of other shapes and dtypes,
random metadata. Example counts keep the whole file well under a minute on two cores.
"""
from __future__ import annotations

import functools
import io
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_torch
from facestudio_testing.identity_modules import identity_modules

# torch.load warns about the random "protocol" byte of a garbage pickle before refusing it.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
CONTEXT = 768  # SD1.5: the loader tells base models apart by this width
ADAPTER_KINDS = ("faceid", "faceid-plus", "faceid-portrait", "image-prompt", "image-prompt-plus")
SUFFIXES = (".safetensors", ".bin")
TORCH_DTYPES = (torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int32,
                torch.int64, torch.bool, torch.float8_e4m3fn)


def fuzz(examples: int) -> settings:
    """Example counts chosen so the whole file runs in about 15 s on two idle cores."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def adapters(booted):
    return booted.pack_module("attention.adapters")


@pytest.fixture(scope="module")
def ident(booted):
    return identity_modules(booted)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="facestudio-fuzz-") as folder:
        yield Path(folder)


# --- small valid adapters ---------------------------------------------------------------------------

def _perceiver(sd: dict, rnd, prefix: str, dim: int, inner: int = 64, ff: int = 8) -> None:
    p = f"{prefix}layers.0."
    sd[p + "0.norm1.weight"], sd[p + "0.norm2.weight"] = torch.ones(dim), torch.ones(dim)
    sd[p + "0.to_q.weight"] = rnd(inner, dim)
    sd[p + "0.to_kv.weight"] = rnd(2 * inner, dim)
    sd[p + "0.to_out.weight"] = rnd(dim, inner)
    sd[p + "1.0.weight"] = torch.ones(dim)
    sd[p + "1.1.weight"] = rnd(ff, dim)
    sd[p + "1.3.weight"] = rnd(dim, ff)


def mini_adapter(kind: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A nested {image_proj, ip_adapter} state dict of `kind` that the loader recognises, a few hundred KB."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(torch.float16)

    proj: dict[str, torch.Tensor] = {}
    tokens = 16 if kind in ("faceid-portrait", "image-prompt-plus") else 4
    if kind.startswith("faceid"):
        width = 64 if kind == "faceid-plus" else CONTEXT  # Plus: the resampler's width; else the context
        proj["proj.0.weight"], proj["proj.0.bias"] = rnd(8, 16), rnd(8)
        proj["proj.2.weight"], proj["proj.2.bias"] = rnd(tokens * width, 8), rnd(tokens * width)
        proj["norm.weight"], proj["norm.bias"] = torch.ones(width), rnd(width)
        if kind == "faceid-plus":
            proj["perceiver_resampler.proj_in.weight"] = rnd(width, 32)
            proj["perceiver_resampler.proj_out.weight"] = rnd(CONTEXT, width)
            proj["perceiver_resampler.norm_out.weight"] = torch.ones(CONTEXT)
            _perceiver(proj, rnd, "perceiver_resampler.", width)
    elif kind == "image-prompt":
        proj["proj.weight"], proj["norm.weight"] = rnd(tokens * CONTEXT, 32), torch.ones(CONTEXT)
    else:
        dim = 64
        proj["latents"] = rnd(1, tokens, dim)
        proj["proj_in.weight"], proj["proj_out.weight"] = rnd(dim, 32), rnd(CONTEXT, dim)
        proj["norm_out.weight"] = torch.ones(CONTEXT)
        _perceiver(proj, rnd, "", dim)
    layers = {}
    for n in range(2):
        layers[f"{2 * n + 1}.to_k_ip.weight"] = rnd(64, CONTEXT)
        layers[f"{2 * n + 1}.to_v_ip.weight"] = rnd(64, CONTEXT)
    if kind == "faceid":
        layers["1.to_q_lora.down.weight"] = rnd(2, 64)
    return {"image_proj": proj, "ip_adapter": layers}


@functools.lru_cache(maxsize=None)
def shared_mini_adapter(kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """mini_adapter(kind), made once: copy the sections before changing them (the tensors are never changed)."""
    return mini_adapter(kind)


def flat(nested: dict) -> dict[str, torch.Tensor]:
    return {f"{section}.{key}": value for section, tensors in nested.items() for key, value in tensors.items()}


def adapter_bytes(state: dict, suffix: str, legacy: bool = False) -> bytes:
    """.safetensors flat (as the conversions ship); .bin the object given, torch.save'd (zip or legacy)."""
    if suffix == ".safetensors":
        return save_torch({k: v.contiguous() for k, v in flat(state).items()})
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def load_or_adapter_error(adapters, path: Path):
    """The loaded adapter, or None when the pack refused it with AdapterError; anything else fails the test."""
    try:
        loaded = adapters.load_adapter(str(path))
    except adapters.AdapterError as error:
        assert str(error).strip(), "an AdapterError without a message"
        return None
    assert isinstance(loaded, adapters.IPAdapterWeights)
    assert loaded.layer_count >= 1 and loaded.context_dim in adapters.BASE_BY_CONTEXT
    return loaded


def write(scratch: Path, name: str, data: bytes) -> Path:
    path = scratch / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_the_mini_adapters_load_as_their_kind(adapters, scratch, kind, suffix):
    """The fuzzing below starts from these: they must be files the loader accepts, as the kind they are."""
    path = write(scratch, f"mini-{kind}{suffix}", adapter_bytes(mini_adapter(kind), suffix))
    loaded = adapters.load_adapter(str(path))
    assert loaded.kind is adapters.AdapterKind(kind) and loaded.layer_count == 2 and loaded.base_model == "SD1.5"


# --- byte-level damage ------------------------------------------------------------------------------

# (position as a fraction of the file, xor mask) pairs; positions near the start hit headers and pickles.
flips = st.lists(st.tuples(st.one_of(st.floats(0, 0.02), st.floats(0, 1, exclude_max=True)), st.integers(1, 255)),
                 min_size=1, max_size=8)


def damage(data: bytes, flip_list, cut: float | None, insert: bytes) -> bytes:
    out = bytearray(data)
    for where, mask in flip_list:
        out[int(where * len(out))] ^= mask
    if insert:
        at = int((flip_list[0][0] if flip_list else 0.5) * len(out))
        out[at:at] = insert
    if cut is not None:
        del out[int(cut * len(out)):]
    return bytes(out)


ADAPTER_BASES = {}


def base_adapter_bytes(kind: str, suffix: str, legacy: bool) -> bytes:
    key = (kind, suffix, legacy)
    if key not in ADAPTER_BASES:
        ADAPTER_BASES[key] = adapter_bytes(mini_adapter(kind), suffix, legacy)
    return ADAPTER_BASES[key]


@fuzz(500)
@given(kind=st.sampled_from(ADAPTER_KINDS), suffix=st.sampled_from(SUFFIXES), legacy=st.booleans(), flip_list=flips,
       cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)), insert=st.binary(max_size=16))
def test_damaged_adapter_files(adapters, scratch, kind, suffix, legacy, flip_list, cut, insert):
    data = damage(base_adapter_bytes(kind, suffix, legacy), flip_list, cut, insert)
    load_or_adapter_error(adapters, write(scratch, f"ip-adapter-damaged{suffix}", data))


def safetensors_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=12),
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                             children, max_size=4),
                           max_leaves=12)
TENSOR_NAMES = ("image_proj.proj.0.weight", "image_proj.norm.weight", "image_proj.proj.weight", "image_proj.latents",
                "ip_adapter.1.to_k_ip.weight", "ip_adapter.1.to_v_ip.weight", "model.diffusion_model.x", "a")
header_entries = st.dictionaries(
    st.sampled_from(TENSOR_NAMES + ("__metadata__",)),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F16", "F32", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", ""]),
                           "shape": st.lists(st.integers(-2, 2**40), max_size=4),
                           "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3)}) | json_values,
    max_size=4)


@fuzz(400)
@given(suffix=st.sampled_from(SUFFIXES), choice=st.integers(0, 3), raw=st.binary(max_size=300),
       entries=header_entries, tail=st.binary(max_size=64))
def test_random_bytes_and_headers(adapters, scratch, suffix, choice, raw, entries, tail):
    """Random bytes; random bytes behind a zip or pickle signature; safetensors headers of random JSON."""
    if choice == 0:
        data = raw
    elif choice == 1:
        data = b"PK\x03\x04" + raw  # looks like a zip (torch.save's container)
    elif choice == 2:
        data = b"\x80\x02" + raw  # a pickle protocol 2 header (legacy torch.save)
    else:
        data = safetensors_header(json.dumps(entries).encode()) + tail
    load_or_adapter_error(adapters, write(scratch, f"random{suffix}", data))


# --- structured damage inside valid containers ------------------------------------------------------

shapes = st.lists(st.integers(0, 6), max_size=4).map(tuple)


@st.composite
def changed_state(draw):
    """A mini adapter with structured changes: tensors dropped, renamed, reshaped, retyped, keys added."""
    kind = draw(st.sampled_from(ADAPTER_KINDS))
    sections = {name: dict(tensors) for name, tensors in shared_mini_adapter(kind).items()}  # changed by entry
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(sections)))
        tensors = sections[section]
        if not tensors:
            continue
        key = draw(st.sampled_from(sorted(tensors)))
        action = draw(st.sampled_from(["drop", "rename", "reshape", "retype", "scalar", "add", "empty", "grow"]))
        if action == "drop":
            del tensors[key]
        elif action == "rename":
            tensors[draw(st.sampled_from(["0.to_k_ip.weight", "3.to_v_ip.weight", "proj.3.weight", "latents",
                                          "2.to_k_ip.weight", "1.to_q_lora.up.weight", "x", "", "1.to_k_ip"]))] = \
                tensors.pop(key)
        elif action == "reshape":
            tensors[key] = torch.zeros(draw(shapes), dtype=torch.float16)
        elif action == "retype":
            tensors[key] = torch.ones(tensors[key].shape, dtype=draw(st.sampled_from(TORCH_DTYPES)))
        elif action == "scalar":
            tensors[key] = torch.tensor(1.0)
        elif action == "add":
            tensors[draw(st.text(max_size=20))] = torch.zeros(draw(shapes))
        elif action == "empty":
            sections[section] = {}
        else:  # one dimension much wider: widths that disagree between sections
            shape = list(tensors[key].shape) or [1]
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from([1, 2, 5, 1024, 2048]))
            tensors[key] = torch.zeros(shape, dtype=torch.float16)
    return sections


@fuzz(500)
@given(state=changed_state(), suffix=st.sampled_from(SUFFIXES), layout=st.sampled_from(["nested", "flat"]))
def test_changed_tensors_in_valid_containers(adapters, scratch, state, suffix, layout):
    if suffix == ".bin" and layout == "flat":
        data = adapter_bytes(flat(state), suffix)
    else:
        data = adapter_bytes(state, suffix)
    load_or_adapter_error(adapters, write(scratch, f"changed{suffix}", data))


pickle_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8)
    | st.builds(lambda s, d: torch.zeros(s, dtype=d), shapes, st.sampled_from(TORCH_DTYPES)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["image_proj", "ip_adapter", "state_dict", "model", "proj.weight", "norm.weight", "latents",
                         "1.to_k_ip.weight", "1.to_v_ip.weight", "image_proj.norm.weight", "x"]) | st.integers(0, 3),
        children, max_size=4) | st.tuples(children, children),
    max_leaves=10)


@fuzz(300)
@given(obj=pickle_values)
def test_any_weights_only_pickle(adapters, scratch, obj):
    """.bin files of any object the weights-only unpickler builds: containers, numbers, strings, tensors."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    load_or_adapter_error(adapters, write(scratch, "anything.bin", buffer.getvalue()))


# --- identity files ---------------------------------------------------------------------------------

def mini_identity(ident, shots: int = 2, dim: int = 8, clip: bool = False, seed: int = 0):
    faces = ident.value.RecognizerIdentity("rec_fuzz.onnx", "0123456789abcdef", dim)
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((shots, dim)).astype(np.float32)
    normed = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    extra = {}
    if clip:
        features = rng.standard_normal((shots, 3, 4)).astype(np.float32)
        extra = dict(clip_features=features, clip_width=4, combined_clip_features=features.mean(0),
                     unconditional_clip_features=np.zeros((3, 4), np.float32))
    return ident.value.FaceIdentity(
        embeddings=raw, normed_embeddings=normed, embedding=ident.value.combine_embeddings(normed, np.ones(shots)),
        recognizer=faces, crops=rng.integers(0, 255, (shots, 4, 4, 3), dtype=np.uint8),
        det_scores=np.full(shots, 0.9, np.float32), bboxes=np.zeros((shots, 4), np.float32),
        kps=np.zeros((shots, 5, 2), np.float32), used=tuple(range(shots)),
        dropped=(ident.value.DroppedShot(shots, "no face: test"),), photo_count=shots + 1, **extra)


IDENTITY_BASES = {}


def base_identity(ident, scratch: Path, clip: bool) -> tuple[bytes, dict, dict]:
    """(file bytes, tensors, metadata) of a saved mini identity."""
    if clip not in IDENTITY_BASES:
        path = ident.files.save_identity(mini_identity(ident, clip=clip), scratch / f"base-{clip}.safetensors")
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            metadata = dict(handle.metadata())
        IDENTITY_BASES[clip] = (path.read_bytes(), tensors, metadata)
    return IDENTITY_BASES[clip]


def load_or_identity_error(ident, path: Path):
    try:
        loaded = ident.files.load_identity(path)
    except ident.value.IdentityError as error:
        assert str(error).strip(), "an IdentityError without a message"
        return None
    assert isinstance(loaded, ident.value.FaceIdentity)
    assert abs(float(np.linalg.norm(loaded.embedding)) - 1.0) <= 1e-3
    return loaded


@pytest.mark.parametrize("clip", [False, True])
def test_the_mini_identity_round_trips(ident, scratch, clip):
    data, _, _ = base_identity(ident, scratch, clip)
    loaded = ident.files.load_identity(write(scratch, "mini.safetensors", data))
    original = mini_identity(ident, clip=clip)
    np.testing.assert_array_equal(loaded.embedding, original.embedding)
    assert loaded.used == original.used and (loaded.clip_width == 4) == clip


@fuzz(400)
@given(clip=st.booleans(), flip_list=flips, cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
       insert=st.binary(max_size=16))
def test_damaged_identity_files(ident, scratch, clip, flip_list, cut, insert):
    data = damage(base_identity(ident, scratch, clip)[0], flip_list, cut, insert)
    load_or_identity_error(ident, write(scratch, "damaged.safetensors", data))


@fuzz(250)
@given(choice=st.integers(0, 1), raw=st.binary(max_size=300), entries=header_entries, tail=st.binary(max_size=64))
def test_random_identity_bytes_and_headers(ident, scratch, choice, raw, entries, tail):
    data = raw if choice == 0 else safetensors_header(json.dumps(entries).encode()) + tail
    load_or_identity_error(ident, write(scratch, "random.safetensors", data))


NUMPY_DTYPES = (np.float16, np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64, np.uint64, np.bool_)
metadata_text = st.one_of(st.text(max_size=12), st.integers(-2**70, 2**70).map(str), st.just(""),
                          json_values.map(json.dumps), st.sampled_from(["1", "2", "3", "nan", "1e400", "-1", "[[0,1]]",
                                                                        '[["a","b"]]', "{}", "[[1]]"]))
numpy_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**63, 2**63 - 1), st.just(0), st.just(300))


@st.composite
def changed_identity(draw, ident, scratch):
    clip = draw(st.booleans())
    _, tensors, metadata = base_identity(ident, scratch, clip)
    tensors, metadata = dict(tensors), dict(metadata)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["drop", "meta", "drop_meta", "reshape", "retype", "fill", "add"]))
        if action == "drop" and tensors:
            del tensors[draw(st.sampled_from(sorted(tensors)))]
        elif action == "meta":
            metadata[draw(st.sampled_from(sorted(metadata) + ["x"]))] = draw(metadata_text)
        elif action == "drop_meta" and metadata:
            del metadata[draw(st.sampled_from(sorted(metadata)))]
        elif action == "reshape" and tensors:
            key = draw(st.sampled_from(sorted(tensors)))
            tensors[key] = np.zeros(draw(shapes), tensors[key].dtype)
        elif action == "retype" and tensors:
            key = draw(st.sampled_from(sorted(tensors)))
            with np.errstate(all="ignore"):  # NaN or 1e30 to an integer type: any value will do
                tensors[key] = tensors[key].astype(draw(st.sampled_from(NUMPY_DTYPES)))
        elif action == "fill" and tensors:
            key = draw(st.sampled_from(sorted(tensors)))
            value = draw(numpy_values)
            with np.errstate(all="ignore"):
                filled = np.array(tensors[key], copy=True)
                flat_view = filled.reshape(-1)
                if flat_view.size:
                    try:
                        flat_view[draw(st.integers(0, flat_view.size - 1))] = value
                    except (OverflowError, ValueError):
                        pass
            tensors[key] = filled
        elif action == "add":
            tensors[draw(st.text(min_size=1, max_size=10))] = np.zeros(draw(shapes), np.float32)
    return tensors, metadata


@fuzz(500)
@given(data=st.data())
def test_changed_tensors_and_metadata_in_identity_files(ident, scratch, data):
    tensors, metadata = data.draw(changed_identity(ident, scratch))
    blob = save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    load_or_identity_error(ident, write(scratch, "changed.safetensors", blob))


def test_a_bfloat16_identity_file_loads_or_is_refused_clearly(ident, scratch):
    """numpy itself has no bfloat16 (safetensors reads it only once ml_dtypes is imported): an identity re-saved
    in bf16 by another tool either loads or gives an IdentityError naming the file, whichever numpy can do."""
    _, tensors, metadata = base_identity(ident, scratch, False)
    converted = {k: torch.from_numpy(np.array(v)).to(torch.bfloat16) if v.dtype == np.float32 else
                 torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    path = write(scratch, "bf16.safetensors", save_torch(converted, metadata=metadata))
    try:
        loaded = ident.files.load_identity(path)
    except ident.value.IdentityError as error:
        assert "bf16.safetensors" in str(error)
    else:
        assert float(loaded.embedding @ mini_identity(ident).embedding) > 0.99
