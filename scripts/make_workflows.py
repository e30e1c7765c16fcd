"""Writes workflows/*.json (UI format).

The workflows are defined once, as API-format prompts with their groups and notes, in
tests/facestudio_testing/workflow_defs.py. This script starts the real ComfyUI server with the pack
(as the tests do), loads each prompt into the host's own frontend in headless Chromium
(app.loadApiJson), places nodes, groups and notes, and saves what the frontend serializes
(app.graph.serialize()), with each loader's model files (name, folder, download URL from
startup/model_sources.py) in its node's properties.models and in the top-level models list, which
the frontends' Missing Models panels read. tests/test_workflows.py and tests/test_missing_models.py
check the result. The pictures (workflows/*.jpg and
docs/) are screenshots taken by that test: make them afterwards with scripts/update_pictures.sh.

    bash scripts/setup.sh >/dev/null; .venv/bin/python scripts/make_workflows.py; bash scripts/update_pictures.sh
(COMFYUI_DIR: the host, default .comfyui/ComfyUI; a Chromium as tests/facestudio_testing/frontend.py finds it.)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from facestudio_testing import frontend, workflow_defs  # noqa: E402
from facestudio_testing.server import ComfyServer  # noqa: E402

WORKFLOWS = ROOT / "workflows"


def main() -> int:
    reason = frontend.missing_browser_reason()
    if reason:
        print(f"cannot make the workflows: {reason}", file=sys.stderr)
        return 1
    WORKFLOWS.mkdir(exist_ok=True)
    server = ComfyServer()
    made = {}  # path -> bytes; nothing is written unless every workflow succeeds
    try:
        server.start()
        with frontend.browser() as browser:
            page = frontend.Frontend(browser, server)
            for name, workflow in workflow_defs.WORKFLOWS.items():
                types = {n["class_type"] for n in workflow.prompt.values()}
                missing = types - set(page.registered(types))
                if missing:
                    raise RuntimeError(f"{name}: node types the frontend does not know: {sorted(missing)}")
                page.load_api(workflow.prompt, f"{name}.json")
                changed = workflow_defs.prompt_differences(workflow.prompt, page.graph_to_prompt())
                if changed:  # e.g. a value off an INT widget's step grid, or an input name the node lacks
                    raise RuntimeError(f"{name}: the frontend does not queue the definition:\n" + "\n".join(changed))
                # A Load Image node grows to fit its picture when it is first drawn: draw them all first, so
                # the layout is made with the sizes they keep.
                page.wait_for_pictures()
                page.fit_view()
                fit_scale = page.arrange(workflow.layout())
                # The files it loads, with their folders and download URLs, for the Missing Models panels.
                graph = workflow_defs.add_model_metadata(page.serialize(), workflow.prompt)
                graph.setdefault("extra", {})["ds"] = workflow_defs.VIEW  # the view it opens at
                graph["extra"]["facestudio_workflow"] = name  # web/saved_view.js restores it from a template too
                made[WORKFLOWS / f"{name}.json"] = (json.dumps(graph, indent=2) + "\n").encode()
                print(f"made {name} ({len(graph['nodes'])} nodes; Fit View at {fit_scale:.2f})")
            if page.errors:
                raise RuntimeError("page errors:\n" + "\n".join(page.errors))
            page.close()
    finally:
        server.cleanup()
    for path, data in made.items():
        path.write_bytes(data)
    print(f"wrote {len(made)} files; now make their pictures: bash scripts/update_pictures.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
