#!/usr/bin/env bash
# Runs the whole test suite, doing any set-up it needs first. Extra arguments go to pytest.
set -euo pipefail
export FACESTUDIO_SETUP_BROWSER="${FACESTUDIO_SETUP_BROWSER:-1}"  # setup.sh: chromium for the frontend tests
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$FACESTUDIO_ROOT"
export COMFYUI_DIR
# --rootdir=tests: the pack root holds an __init__.py, and with the root in the collection tree
# pytest imports it as a test package (a second copy of the pack, or an ImportError when the
# clone's folder name is not an identifier). The ini file is still ./pyproject.toml.
exec "$FACESTUDIO_PY" -m pytest -c pyproject.toml --rootdir=tests "$@"
