#!/usr/bin/env bash
# Runs a subset of the tests against another supported ComfyUI, set up by scripts/setup.sh in its own
# folder: .comfyui/NAME/ComfyUI with the venv .comfyui/NAME/venv (git-ignored, and under .comfyui/,
# which pytest does not collect from).
#   bash scripts/test-host.sh NAME MARKERS [pytest args]
# NAME picks scripts/comfyui-NAME.pin; MARKERS is a pytest -m expression. scripts/test.sh calls it
# after the main suite: `previous "smoke or frontend"` (0.3.64) and `oldest smoke` (0.3.50).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash scripts/test-host.sh NAME MARKERS [pytest args]" >&2; exit 2; }
name="$1" markers="$2"
shift 2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FACESTUDIO_HOST_PIN="$root/scripts/comfyui-$name.pin"
export FACESTUDIO_HOST_DIR="$root/.comfyui/$name/ComfyUI"
export FACESTUDIO_VENV="$root/.comfyui/$name/venv"
export FACESTUDIO_SEED_VENV="${FACESTUDIO_SEED_VENV:-$root/.venv}"  # setup.sh: start from its packages
[ -f "$FACESTUDIO_HOST_PIN" ] || { echo "no pin file $FACESTUDIO_HOST_PIN" >&2; exit 2; }
host="ComfyUI $(sed -n 's/^version=//p' "$FACESTUDIO_HOST_PIN") ($(sed -n 's/^commit=//p' "$FACESTUDIO_HOST_PIN"))"

fail() {
    printf '\n[facestudio] FAILED on the %s host, %s: %s\n\n' "$name" "$host" "$1" >&2
    exit 1
}

# setup.sh runs in a child bash (with its own `set -e`) so that a failure is reported here.
env_file="$(mktemp)"
trap 'rm -f "$env_file"' EXIT
bash -c 'source "$1"; declare -p FACESTUDIO_PY COMFYUI_DIR >"$2"' _ "$root/scripts/setup.sh" "$env_file" \
    || fail "the set-up of the host or its venv failed (see the log above)"
source "$env_file"

printf '[facestudio] tests marked "%s" on the %s host, %s\n' "$markers" "$name" "$host" >&2
cd "$root"
export COMFYUI_DIR
"$FACESTUDIO_PY" -m pytest -c pyproject.toml --rootdir=tests -m "$markers" "$@" \
    || fail "the tests marked \"$markers\" did not pass"
