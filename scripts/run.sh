#!/usr/bin/env bash
# Starts ComfyUI on 127.0.0.1 with this pack loaded, doing any set-up it needs first.
# Extra arguments go to ComfyUI's main.py (e.g. --port 8190); --cpu is added where no GPU answers.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
link_pack_into_host
extra=()
"$FACESTUDIO_PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or torch.backends.mps.is_available() else 1)" 2>/dev/null || extra+=(--cpu)
cd "$COMFYUI_DIR"
exec "$FACESTUDIO_PY" main.py --listen 127.0.0.1 "${extra[@]}" "$@"
