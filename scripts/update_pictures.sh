#!/usr/bin/env bash
# Makes the workflow pictures from the test run: runs the frontend test of tests/test_workflows.py
# (each bundled workflow loaded in the host's own frontend, in headless Chromium), which saves a
# screenshot of each workflow in $FACESTUDIO_SCREENSHOTS, then copies them to workflows/<name>.jpg
# (the thumbnails ComfyUI's template browser shows) and the README's picture to docs/. Nothing is
# copied unless every frontend test passes and every workflow has its screenshot.
# Run it after scripts/make_workflows.py. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shots="$(mktemp -d)"
trap 'rm -rf "$shots"' EXIT
FACESTUDIO_SCREENSHOTS="$shots" FACESTUDIO_REQUIRE_BROWSER=1 \
    bash "$root/scripts/test.sh" -q tests/test_workflows.py -k test_loads_in_the_frontend "$@"
for json in "$root"/workflows/*.json; do
    name="$(basename "$json" .json)"
    [ -s "$shots/$name.jpg" ] || { echo "[facestudio] no screenshot of $name from the test run" >&2; exit 1; }
done
for json in "$root"/workflows/*.json; do
    name="$(basename "$json" .json)"
    cp "$shots/$name.jpg" "$root/workflows/$name.jpg"
done
mkdir -p "$root/docs"
cp "$shots/03_two_people_in_regions.jpg" "$root/docs/workflow_two_people.jpg"
echo "[facestudio] wrote $(ls "$root"/workflows/*.json | wc -l) thumbnails in workflows/ and docs/workflow_two_people.jpg"
