#!/usr/bin/env bash
# Runs the whole test suite, doing any set-up it needs first. Extra arguments go to pytest.
# Without arguments (as CI runs it), the smoke subset then runs against the oldest supported
# ComfyUI too (scripts/test-oldest-host.sh); FACESTUDIO_OLDEST_HOST=0 skips that, =1 forces it.
set -euo pipefail
export FACESTUDIO_SETUP_BROWSER="${FACESTUDIO_SETUP_BROWSER:-1}"  # setup.sh: chromium for the frontend tests
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$FACESTUDIO_ROOT"
export COMFYUI_DIR
# --rootdir=tests: the pack root holds an __init__.py, and with the root in the collection tree
# pytest imports it as a test package (a second copy of the pack, or an ImportError when the
# clone's folder name is not an identifier). The ini file is still ./pyproject.toml.
oldest="${FACESTUDIO_OLDEST_HOST:-$([ $# -eq 0 ] && echo 1 || echo 0)}"
if [ "$oldest" != 1 ]; then
    exec "$FACESTUDIO_PY" -m pytest -c pyproject.toml --rootdir=tests "$@"
fi
main_status=0
"$FACESTUDIO_PY" -m pytest -c pyproject.toml --rootdir=tests "$@" || main_status=$?
oldest_status=0
bash scripts/test-oldest-host.sh || oldest_status=$?  # its own host and venv, whatever is set above
if [ "$main_status" -ne 0 ]; then
    printf '[facestudio] the main suite failed (pytest exit status %s)\n' "$main_status" >&2
    exit "$main_status"
fi
exit "$oldest_status"
