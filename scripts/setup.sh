#!/usr/bin/env bash
# Idempotent set-up shared by scripts/run.sh and scripts/test.sh.
# Sourced, it leaves behind: FACESTUDIO_ROOT, FACESTUDIO_PY (the venv's python), COMFYUI_DIR (the host).
#
# Host, in order: $COMFYUI_PATH; the ComfyUI whose custom_nodes/ holds this pack;
# a clone of the pinned commit (scripts/comfyui.pin) into .comfyui/ComfyUI.
# Environment knobs: FACESTUDIO_VENV (default .venv), PYTHON (default python3),
# FACESTUDIO_TORCH (the torch requirement, default torch==2.13.0),
# FACESTUDIO_HOST_PIN (the pin file, default scripts/comfyui.pin) and FACESTUDIO_HOST_DIR: when
# set, the host is always a clone of that pin in that folder (COMFYUI_PATH and an enclosing
# ComfyUI are not used); scripts/test-host.sh sets all three for another supported host, and
# FACESTUDIO_SEED_VENV (a venv whose packages a new venv starts from, see seed_venv).
set -euo pipefail

FACESTUDIO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FACESTUDIO_VENV:-$FACESTUDIO_ROOT/.venv}"
HOST_PIN="${FACESTUDIO_HOST_PIN:-$FACESTUDIO_ROOT/scripts/comfyui.pin}"
PYTHON="${PYTHON:-python3}"
TORCH_REQ="${FACESTUDIO_TORCH:-torch==2.13.0}"
# torchvision must match torch exactly, or pip "upgrades" torch to a multi-GB CUDA build.
TORCHVISION_REQ="${FACESTUDIO_TORCHVISION:-torchvision==0.28.0}"

log() { printf '[facestudio setup] %s\n' "$*" >&2; }

pin_value() {
    local value
    value="$(sed -n "s/^$1=//p" "$HOST_PIN")"
    [ -n "$value" ] || { log "$HOST_PIN has no '$1=' line"; return 1; }
    printf '%s\n' "$value"
}

# --- 1. the host -------------------------------------------------------------
resolve_host() {
    if [ -n "${FACESTUDIO_HOST_DIR:-}" ]; then
        clone_pinned_host "$FACESTUDIO_HOST_DIR"
        return
    fi
    if [ -n "${COMFYUI_PATH:-}" ]; then
        [ -f "$COMFYUI_PATH/main.py" ] || { log "COMFYUI_PATH=$COMFYUI_PATH has no main.py: point it at a ComfyUI checkout."; return 1; }
        COMFYUI_DIR="$(cd "$COMFYUI_PATH" && pwd)"
        return
    fi
    local parent
    parent="$(dirname "$FACESTUDIO_ROOT")"
    if [ "$(basename "$parent")" = custom_nodes ] && [ -f "$(dirname "$parent")/main.py" ]; then
        COMFYUI_DIR="$(dirname "$parent")"
        return
    fi
    clone_pinned_host "$FACESTUDIO_ROOT/.comfyui/ComfyUI"
}

# The pinned commit of $HOST_PIN, checked out in $1 (cloned there first if needed).
clone_pinned_host() {
    mkdir -p "$(dirname "$1")"
    COMFYUI_DIR="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
    local url commit
    url="$(pin_value url)"; commit="$(pin_value commit)"
    if [ ! -d "$COMFYUI_DIR/.git" ]; then
        log "cloning ComfyUI $commit from $url"
        git clone -q --no-checkout "$url" "$COMFYUI_DIR"
    fi
    if [ "$(git -C "$COMFYUI_DIR" rev-parse HEAD 2>/dev/null || true)" != "$commit" ] \
        || ! git -C "$COMFYUI_DIR" diff --quiet HEAD 2>/dev/null; then
        git -C "$COMFYUI_DIR" fetch -q origin "$commit" 2>/dev/null || true
        if ! git -C "$COMFYUI_DIR" -c advice.detachedHead=false checkout -q -f "$commit" 2>/dev/null; then
            # A mirror that lacks the large tokenizer blobs (HunyuanVideo, Qwen 3.5) cannot check them
            # out; no image model here needs them.
            log "full checkout failed; retrying without the large text-encoder tokenizer files"
            git -C "$COMFYUI_DIR" sparse-checkout set --no-cone '/*' \
                '!/comfy/text_encoders/llama_tokenizer/tokenizer.json' \
                '!/comfy/text_encoders/qwen35_tokenizer/vocab.json'
            git -C "$COMFYUI_DIR" -c advice.detachedHead=false checkout -q -f "$commit" \
                || { log "cannot check out ComfyUI $commit (from $HOST_PIN) in $COMFYUI_DIR"; return 1; }
        fi
    fi
}

link_pack_into_host() {
    local nodes_dir="$COMFYUI_DIR/custom_nodes" here
    mkdir -p "$nodes_dir"
    for here in "$nodes_dir"/*; do
        # Folders only: custom_nodes also holds files (example_node.py.example), which `cd` cannot enter.
        [ -d "$here" ] && [ "$(cd "$here" && pwd -P)" = "$(cd "$FACESTUDIO_ROOT" && pwd -P)" ] && return 0
    done
    ln -s "$FACESTUDIO_ROOT" "$nodes_dir/ComfyUI-FaceStudio"
    log "linked the pack into $nodes_dir/ComfyUI-FaceStudio"
}

# --- 2. the virtual environment ----------------------------------------------
has_cuda_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup_stamp() {
    # Everything that changes what gets installed; a match means nothing to do.
    {
        echo "$TORCH_REQ $TORCHVISION_REQ $(has_cuda_gpu && echo cuda || echo cpu)"
        cat "$COMFYUI_DIR/requirements.txt" "$FACESTUDIO_ROOT/requirements.txt" \
            "$FACESTUDIO_ROOT/requirements-test.txt" "$FACESTUDIO_ROOT/scripts/setup.sh" \
            "$FACESTUDIO_ROOT/scripts/torchvision_cpu_shim.py" "$FACESTUDIO_ROOT/scripts/torchaudio_cpu_shim.py" \
            "$FACESTUDIO_ROOT/install.py"
    } | sha256sum | cut -d' ' -f1
}

pip_quiet() {
    # pip warns once per package about this machine's local index folders; nothing to act on.
    "$FACESTUDIO_PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# A new venv for another host (scripts/test-host.sh sets FACESTUDIO_SEED_VENV to the main one) starts as hard
# links to the seed's installed packages: the pip runs below then only change what this host's
# requirements pin differently, instead of unpacking torch and the rest again (about 3.5 minutes a
# venv here). pip replaces a package by unlinking its files, so the seed's copies never change.
seed_venv() {
    local seed="${FACESTUDIO_SEED_VENV:-}" from to
    [ -n "$seed" ] && [ -x "$seed/bin/python" ] || return 0
    from="$("$seed/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    to="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    [ "$(basename "$(dirname "$from")")" = "$(basename "$(dirname "$to")")" ] || return 0  # same python3.X
    if cp -al --remove-destination "$from/." "$to/" 2>/dev/null; then
        log "seeded $VENV with hard links to the packages of $seed"
    else  # another file system: install everything instead
        rm -rf "$VENV" && "$PYTHON" -m venv "$VENV"
    fi
}

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
        seed_venv
    fi
    FACESTUDIO_PY="$VENV/bin/python"
    local stamp_file="$VENV/.facestudio-setup" stamp
    stamp="$(setup_stamp)"
    if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
        return
    fi
    log "installing dependencies into $VENV"
    local constraints="$VENV/facestudio-constraints.txt"
    printf '%s\n%s\n' "$TORCH_REQ" "$TORCHVISION_REQ" >"$constraints"
    local pip=(pip_quiet install -q --disable-pip-version-check -c "$constraints")
    "${pip[@]}" "$TORCH_REQ"
    # torchaudio pins one torch release exactly: installed apart (install_torchaudio), never by -r.
    grep -v -E '^\s*torchaudio' "$COMFYUI_DIR/requirements.txt" >"$VENV/host-requirements.txt"
    "${pip[@]}" -r "$VENV/host-requirements.txt" requests
    "${pip[@]}" -r "$FACESTUDIO_ROOT/requirements.txt" -r "$FACESTUDIO_ROOT/requirements-test.txt"
    # facexlib, whose modules the PuLID-FLUX tests compare the pack's face detection and parsing with:
    # without its dependencies, which would install opencv-python over the headless build.
    "${pip[@]}" --no-deps facexlib==0.3.0
    "$FACESTUDIO_PY" "$FACESTUDIO_ROOT/install.py"
    install_torchvision_shim_if_needed
    install_torchaudio
    echo "$stamp" >"$stamp_file"
}

# scripts/NAME_cpu_shim.py as a start-up hook of the venv (a module and the .pth line that imports it).
startup_shim_base() {
    printf '%s/facestudio_%s_cpu_shim\n' "$("$FACESTUDIO_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" "$1"
}
remove_startup_shim() { local base; base="$(startup_shim_base "$1")"; rm -f "$base.pth" "$base.py"; }
install_startup_shim() {
    local base
    base="$(startup_shim_base "$1")"
    cp "$FACESTUDIO_ROOT/scripts/$1_cpu_shim.py" "$base.py"
    echo "import facestudio_$1_cpu_shim" >"$base.pth"
}

install_torchvision_shim_if_needed() {
    remove_startup_shim torchvision
    if "$FACESTUDIO_PY" -c 'import torchvision' >/dev/null 2>&1; then
        return
    fi
    # A CUDA-built torchvision beside CPU torch cannot load its ops library; see the shim's docstring.
    log "torchvision cannot load its compiled ops with this torch; installing the start-up shim"
    install_startup_shim torchvision
    "$FACESTUDIO_PY" -c 'import torchvision' || { log "torchvision still fails to import"; return 1; }
}

# ComfyUI v0.33 imports torchaudio at start-up (comfy/sd.py, for its audio VAE and Gemma 4), so every
# image graph needs `import torchaudio` to work. Its wheels are built for one torch release each: the
# one matching the installed torch, else the newest (without its pinned torch, which would replace
# ours), plus the shim when its compiled extension then cannot load (scripts/torchaudio_cpu_shim.py).
install_torchaudio() {
    local torch_minor
    remove_startup_shim torchaudio
    "$FACESTUDIO_PY" -c 'import torchaudio' >/dev/null 2>&1 && return
    torch_minor="$("$FACESTUDIO_PY" -c 'import torch; print(".".join(torch.__version__.split("+")[0].split(".")[:2]))')"
    pip_quiet install -q --disable-pip-version-check --no-deps "torchaudio==$torch_minor.*" 2>/dev/null \
        || pip_quiet install -q --disable-pip-version-check --no-deps torchaudio \
        || { log "could not install torchaudio, which ComfyUI imports at start-up"; return 1; }
    "$FACESTUDIO_PY" -c 'import torchaudio' >/dev/null 2>&1 && return
    log "torchaudio's compiled extension cannot load with torch $torch_minor; installing the start-up shim"
    install_startup_shim torchaudio
    "$FACESTUDIO_PY" -c 'import torchaudio, torchaudio.functional, torchaudio.transforms' \
        || { log "torchaudio still fails to import"; return 1; }
}

# --- 3. a browser for the frontend tests (tests/test_workflows.py) -------------
# Only when FACESTUDIO_SETUP_BROWSER=1 (scripts/test.sh sets it; run.sh does not). Playwright drives
# the system's Chromium and never downloads one. Without a browser those tests skip, or fail when
# FACESTUDIO_REQUIRE_BROWSER=1 (.ci/run).
ensure_chromium() {
    local name
    [ -n "${FACESTUDIO_CHROMIUM:-}" ] && return 0
    for name in chromium chromium-browser google-chrome google-chrome-stable; do
        command -v "$name" >/dev/null 2>&1 && return 0
    done
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        log "installing chromium (apt-get) for the frontend tests"
        { apt-get install -y -q --no-install-recommends chromium \
            || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }; } >/dev/null 2>&1 \
            || log "could not install chromium: the frontend tests will skip (and fail in CI)"
    else
        log "no chromium: the frontend tests will skip (install chromium, or set FACESTUDIO_CHROMIUM)"
    fi
}

# --- 4. reference code the tests run beside the pack (never committed, never in a host's custom_nodes) ---
# clone_pinned DIR PIN LABEL: the commit of PIN (url= and commit= lines), checked out in DIR.
clone_pinned() {
    local dir="$1" pin="$2" label="$3" url commit
    url="$(sed -n 's/^url=//p' "$pin")"; commit="$(sed -n 's/^commit=//p' "$pin")"
    [ -n "$url" ] && [ -n "$commit" ] || { log "$pin needs a url= and a commit= line"; return 1; }
    if [ ! -d "$dir/.git" ]; then
        log "cloning $label $commit from $url"
        mkdir -p "$(dirname "$dir")"
        git clone -q --no-checkout "$url" "$dir"
    fi
    if [ "$(git -C "$dir" rev-parse HEAD 2>/dev/null || true)" != "$commit" ] \
        || ! git -C "$dir" diff --quiet HEAD 2>/dev/null; then
        git -C "$dir" fetch -q origin "$commit" 2>/dev/null || true
        git -C "$dir" -c advice.detachedHead=false checkout -q -f "$commit" \
            || { log "cannot check out $label $commit (from $pin)"; return 1; }
    fi
}

# cubiq's ComfyUI_IPAdapter_plus (GPL-3.0), which tests/test_cubiq_order.py chains with the pack: only
# the servers of those tests load it.
FACESTUDIO_IPADAPTER_PLUS_DIR="${FACESTUDIO_IPADAPTER_PLUS_DIR:-$FACESTUDIO_ROOT/.comfyui/ComfyUI_IPAdapter_plus}"
# PuLID's reference implementation (Apache-2.0), whose modules the PuLID-FLUX tests import and run on
# the same random weights as the pack's.
FACESTUDIO_PULID_DIR="${FACESTUDIO_PULID_DIR:-$FACESTUDIO_ROOT/.comfyui/PuLID}"

resolve_host
setup_venv
clone_pinned "$FACESTUDIO_IPADAPTER_PLUS_DIR" "$FACESTUDIO_ROOT/scripts/ipadapter-plus.pin" ComfyUI_IPAdapter_plus
clone_pinned "$FACESTUDIO_PULID_DIR" "$FACESTUDIO_ROOT/scripts/pulid.pin" PuLID
if [ "${FACESTUDIO_SETUP_BROWSER:-0}" = 1 ]; then ensure_chromium; fi
export FACESTUDIO_ROOT FACESTUDIO_PY COMFYUI_DIR FACESTUDIO_IPADAPTER_PLUS_DIR FACESTUDIO_PULID_DIR
