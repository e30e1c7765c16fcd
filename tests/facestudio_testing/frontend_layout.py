"""Checks on how a workflow lies on the frontend's canvas, from the rectangles the frontend reports
(frontend.Frontend.shown_layout): overlaps, nodes outside their group, and what the first view shows."""
from __future__ import annotations

from . import workflow_defs as wd

# The frontends' low-detail rendering drops text under 8 px on screen (LiteGraph.Canvas.MinFontSizeForLOD
# 8 by default): below about scale 0.6 for the 14-px widget font.
MIN_SCALE = 0.65
TITLE_BAR = 30  # LiteGraph.NODE_TITLE_HEIGHT in both frontends


def _inside(inner, outer) -> bool:
    return (inner[0] >= outer[0] - 1 and inner[1] >= outer[1] - 1
            and inner[0] + inner[2] <= outer[0] + outer[2] + 1 and inner[1] + inner[3] <= outer[1] + outer[3] + 1)


def _overlap(a, b) -> bool:
    return (min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]) > 1
            and min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]) > 1)


def layout_problems(shown: dict, workflow: wd.Workflow) -> list[str]:
    """Nodes (title bars included) overlapping each other, groups overlapping, nodes outside their group."""
    nodes = {str(n["id"]): n for n in shown["nodes"]}
    notes = {n["title"]: n for n in shown["nodes"] if n["type"] == "Note"}
    groups = {g["title"]: g for g in shown["groups"]}
    problems = []
    for spec in workflow.groups:
        members = [nodes[workflow.graph[name]] for name in spec.nodes] + [notes["Step " + spec.title]]
        problems += [f"'{n['title']}' is not inside group '{spec.title}'" for n in members
                     if not _inside(n["rect"], groups[spec.title]["rect"])]
    listed = list(nodes.values())
    problems += [f"'{a['title']}' overlaps '{b['title']}'" for i, a in enumerate(listed) for b in listed[i + 1:]
                 if _overlap(a["rect"], b["rect"])]
    boxes = list(groups.values())
    problems += [f"group '{a['title']}' overlaps group '{b['title']}'" for i, a in enumerate(boxes)
                 for b in boxes[i + 1:] if _overlap(a["rect"], b["rect"])]
    return problems


def corners(rect, shown: dict, inset: float = 4.0) -> list[tuple[float, float]]:
    """A graph rectangle's corners (inset) where the page shows them, at the view's scale and offset."""
    (ox, oy), scale, (left, top) = shown["offset"], shown["scale"], shown["canvas"][:2]
    x0, y0 = (rect[0] + ox) * scale + left + inset, (rect[1] + oy) * scale + top + inset
    x1, y1 = (rect[0] + rect[2] + ox) * scale + left - inset, (rect[1] + rect[3] + oy) * scale + top - inset
    return [(x0, y0), (x1, y0), (x0, y1), (x1, y1)]


def first_view_problems(page, workflow: wd.Workflow) -> list[str]:
    """What a user would not see at once when the workflow opens at its saved view: its overview note and
    its first two steps (group title bars and notes), wholly on screen at a readable scale."""
    shown = page.shown_layout()
    if shown["scale"] < MIN_SCALE:
        return [f"opens at scale {shown['scale']:.2f}"]
    notes = {n["title"]: n["rect"] for n in shown["nodes"] if n["type"] == "Note"}
    groups = {g["title"]: g["rect"] for g in shown["groups"]}
    first = {f"About: {workflow.title}": notes[f"About: {workflow.title}"]}
    for spec in workflow.groups[:2]:
        first[f"group {spec.title}"] = groups[spec.title][:3] + [TITLE_BAR]
        first[f"Step {spec.title}"] = notes[f"Step {spec.title}"]
    return [f"not wholly on screen: {what}" for what, rect in first.items()
            if not all(page.uncovered(corners(rect, shown)))]
