#!/usr/bin/env bash
# Runs the whole test suite, doing any set-up it needs first. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$FACESTUDIO_ROOT"
export COMFYUI_DIR
exec "$FACESTUDIO_PY" -m pytest "$@"
