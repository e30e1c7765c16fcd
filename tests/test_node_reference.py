"""README.md's node reference is what scripts/node_reference.py renders from the schemas, and every
node is in the FaceStudio menu, named and documented (a tooltip on every input and output)."""
from __future__ import annotations

import importlib.util

import pytest

from facestudio_testing.bootstrap import PACK_ROOT


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("facestudio_node_reference", PACK_ROOT / "scripts" / "node_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def schemas(booted):
    return [node.GET_SCHEMA() for node in booted.pack_module("nodes").NODE_LIST]


def test_readme_node_reference_is_up_to_date(booted, reference):
    readme = (PACK_ROOT / "README.md").read_text()
    section = reference.render(booted.pack_module("nodes").NODE_LIST)
    assert reference.replace_section(readme, section) == readme, (
        "README.md's node reference is out of date: run .venv/bin/python scripts/node_reference.py")


def test_every_node_is_listed_in_the_reference(booted, reference, schemas):
    section = reference.render(booted.pack_module("nodes").NODE_LIST)
    for schema in schemas:
        assert f"### {schema.display_name}\n" in section
        for inp in schema.inputs:
            assert f"`{inp.id}`" in section


def test_categories_names_and_tooltips(schemas):
    problems = []
    for s in schemas:
        if not s.category.startswith("FaceStudio/"):
            problems.append(f"{s.node_id}: category {s.category!r} is not under FaceStudio/")
        if not (s.display_name or "").startswith("FaceStudio "):
            problems.append(f"{s.node_id}: display name {s.display_name!r} does not start with 'FaceStudio '")
        if not (s.description or "").strip():
            problems.append(f"{s.node_id}: no description")
        problems += [f"{s.node_id}: input {i.id!r} has no tooltip" for i in s.inputs if not (i.tooltip or "").strip()]
        problems += [f"{s.node_id}: output {o.display_name or o.id!r} has no tooltip" for o in s.outputs
                     if not (o.tooltip or "").strip()]
    assert not problems, "\n".join(problems)
