#!/usr/bin/env bash
# Runs the smoke subset of the tests (pytest -m smoke: load, encode, apply, sample) against the
# oldest ComfyUI the pack supports (scripts/comfyui-oldest.pin), set up by scripts/setup.sh in its
# own folder: .comfyui/oldest/ComfyUI with the venv .comfyui/oldest/venv (git-ignored, and under
# .comfyui/, which pytest does not collect from).
# scripts/test.sh calls it after the main suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FACESTUDIO_HOST_PIN="$root/scripts/comfyui-oldest.pin"
export FACESTUDIO_HOST_DIR="$root/.comfyui/oldest/ComfyUI"
export FACESTUDIO_VENV="$root/.comfyui/oldest/venv"
host="ComfyUI $(sed -n 's/^version=//p' "$FACESTUDIO_HOST_PIN") ($(sed -n 's/^commit=//p' "$FACESTUDIO_HOST_PIN"))"

fail() {
    printf '\n[facestudio] FAILED on the oldest supported host, %s: %s\n\n' "$host" "$1" >&2
    exit 1
}

# setup.sh runs in a child bash (with its own `set -e`) so that a failure is reported here.
env_file="$(mktemp)"
trap 'rm -f "$env_file"' EXIT
bash -c 'source "$1"; declare -p FACESTUDIO_PY COMFYUI_DIR >"$2"' _ "$root/scripts/setup.sh" "$env_file" \
    || fail "the set-up of the host or its venv failed (see the log above)"
source "$env_file"

printf '[facestudio] smoke tests on the oldest supported host, %s\n' "$host" >&2
cd "$root"
export COMFYUI_DIR
"$FACESTUDIO_PY" -m pytest -c pyproject.toml --rootdir=tests -m smoke "$@" \
    || fail "the smoke tests (pytest -m smoke) did not pass"
