"""No bundled workflow uses a node the frontend marks deprecated, on the host under test.

Read from the real server's /object_info, as the frontend reads it: ComfyUI's frontend (1.48:
`ComfyNodeDefImpl`) marks a node deprecated when its `deprecated` is true, or, where the host does
not say, when its category is empty. The host sets `deprecated` from the node's own flag (a V1
class's DEPRECATED, a V3 schema's is_deprecated), so a core node deprecated in a later ComfyUI (Image
Batch in v0.33) fails here on that host with no list to keep by hand.
"""
from __future__ import annotations

import pytest

from facestudio_testing import workflow_defs as wd


def marked_deprecated(info: dict) -> bool:
    """What the frontend shows as deprecated (`deprecated ?? category === ''`)."""
    flag = info.get("deprecated")
    return bool(flag) if flag is not None else info.get("category") == ""


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


@pytest.mark.smoke
def test_the_host_marks_some_nodes_deprecated(object_info):
    """The check below reads a flag this host really sets (so it cannot pass by reading nothing)."""
    assert any(marked_deprecated(info) for info in object_info.values()), "no node of this host is deprecated"


@pytest.mark.smoke
@pytest.mark.parametrize("name", sorted(wd.WORKFLOWS))
def test_workflow_uses_no_deprecated_node(object_info, name):
    workflow = wd.WORKFLOWS[name]
    used = sorted({node["class_type"] for node in workflow.prompt.values()})
    if any(t not in object_info for t in workflow.requires):
        pytest.skip(f"{name} needs {', '.join(workflow.requires)}, which this ComfyUI does not have")
    missing = [t for t in used if t not in object_info]
    assert not missing, f"{name} uses node types this ComfyUI does not have: {', '.join(missing)}"
    deprecated = [f"{t} ({object_info[t].get('display_name') or t})" for t in used if marked_deprecated(object_info[t])]
    assert not deprecated, (f"{name} uses node(s) this ComfyUI marks deprecated: {', '.join(deprecated)}. Replace "
                            f"them in tests/facestudio_testing/workflow_defs.py (with a node every supported host "
                            f"has, or the pack's own), then run scripts/make_workflows.py.")
