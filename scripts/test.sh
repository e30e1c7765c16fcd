#!/usr/bin/env bash
# Runs the whole test suite, doing any set-up it needs first. Extra arguments go to pytest.
# The main suite runs on the pinned host (scripts/comfyui.pin, ComfyUI v0.33.0). Without arguments
# (as CI runs it), it then runs, each in its own host clone and venv (scripts/test-host.sh):
#   - the smoke subset and the frontend workflow tests on the previous host (comfyui-previous.pin, 0.3.64)
#   - the smoke subset on the oldest supported host (comfyui-oldest.pin, 0.3.50).
# FACESTUDIO_OTHER_HOSTS=0 skips those two, =1 forces them.
set -euo pipefail
export FACESTUDIO_SETUP_BROWSER="${FACESTUDIO_SETUP_BROWSER:-1}"  # setup.sh: chromium for the frontend tests
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$FACESTUDIO_ROOT"
export COMFYUI_DIR
# --rootdir=tests: the pack root holds an __init__.py, and with the root in the collection tree
# pytest imports it as a test package (a second copy of the pack, or an ImportError when the
# clone's folder name is not an identifier). The ini file is still ./pyproject.toml.
others="${FACESTUDIO_OTHER_HOSTS:-$([ $# -eq 0 ] && echo 1 || echo 0)}"
if [ "$others" != 1 ]; then
    exec "$FACESTUDIO_PY" -m pytest -c pyproject.toml --rootdir=tests "$@"
fi
status=0
"$FACESTUDIO_PY" -m pytest -c pyproject.toml --rootdir=tests "$@" \
    || { status=$?; printf '[facestudio] the main suite failed (pytest exit status %s)\n' "$status" >&2; }
# Each in its own host and venv, whatever is set above.
bash scripts/test-host.sh previous "smoke or frontend" || status=1
bash scripts/test-host.sh oldest smoke || status=1
exit "$status"
