#!/usr/bin/env bash
# Makes the workflows' pictures: the thumbnails the host's templates browser shows (workflows/<name>.jpg,
# drawn by scripts/make_thumbnails.py with the pack's own preview nodes), then the README's pictures
# from the templates-browser test run (tests/test_templates_browser.py: the browser with the pack's
# cards, and a workflow as it opens from its card), copied to docs/. Nothing is copied unless every
# test of that run passes. Run it after scripts/make_workflows.py. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
"$FACESTUDIO_PY" "$root/scripts/make_thumbnails.py"
shots="$(mktemp -d)"
trap 'rm -rf "$shots"' EXIT
FACESTUDIO_SCREENSHOTS="$shots" FACESTUDIO_REQUIRE_BROWSER=1 \
    bash "$root/scripts/test.sh" -q tests/test_templates_browser.py "$@"
mkdir -p "$root/docs"
for picture in "templates_browser.jpg:templates_browser.jpg" "03 Two people in regions - first view.jpg:workflow_two_people.jpg"; do
    from="$shots/${picture%%:*}" to="$root/docs/${picture##*:}"
    [ -s "$from" ] || { echo "[facestudio] no screenshot '${picture%%:*}' from the test run" >&2; exit 1; }
    cp "$from" "$to"
done
echo "[facestudio] wrote $(ls "$root"/workflows/*.json | wc -l) thumbnails in workflows/ and the README's pictures in docs/"
