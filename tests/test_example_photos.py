"""The example photos the bundled workflows load (example_photos/, startup/example_photos.py).

Each photo has its source and licence in example_photos/SOURCES.md; the person photos hold one face
and the two-people pictures two, for the trained YuNet + SFace pack, with the identities in the
places the workflows expect; the copy into the input folder never overwrites a file and never fails;
and in the real server, once the pack has loaded, LoadImage lists every photo and runs on it.
"""
from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facestudio_testing import workflow_defs as wd

PACK_ROOT = Path(__file__).resolve().parents[1]
PHOTOS_DIR = PACK_ROOT / "example_photos"
SOURCES = PHOTOS_DIR / "SOURCES.md"
MAX_BYTES = 300 * 1024
# What a licence line may say: public domain, CC0, or our own drawing under the pack's licence.
ALLOWED_LICENCES = ("public domain", "cc0", "own work")
SAME_PERSON, OTHER_PERSON = 0.5, 0.4  # SFace cosines: measured 0.91-0.96 and 0.13-0.25

PERSON_SHOTS = (wd.PHOTO, wd.PHOTO_2, wd.PHOTO_3)
ONE_FACE = PERSON_SHOTS + (wd.OTHER_PHOTO,)
TWO_FACES = (wd.LAYOUT, wd.SCENE)
NO_FACE = (wd.STYLE_IMAGE, wd.POSE)
ALL_ROLES = ONE_FACE + TWO_FACES + NO_FACE


@pytest.fixture(scope="module")
def example_photos(booted):
    return booted.pack_module("startup.example_photos")


def _sections() -> dict[str, dict[str, str]]:
    """SOURCES.md's `## <file>` sections: {file: {field (lower case): value}}."""
    sections, current = {}, None
    for line in SOURCES.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), {})
        elif current is not None and (field := re.match(r"- (\w+): (.+)", line)):
            current[field[1].lower()] = field[2].strip()
    return sections


def _shipped(example_photos) -> list[str]:
    return [p.name for p in example_photos.example_photos()]


def _rgb(name: str) -> np.ndarray:
    with Image.open(PHOTOS_DIR / name) as image:
        return np.asarray(image.convert("RGB"))


def _faces_left_to_right(faces, analyzer, name: str):
    bgr = np.ascontiguousarray(_rgb(name)[:, :, ::-1])
    bboxes, _, _ = faces.detect_faces(analyzer, bgr)
    return bboxes


# --- the files and their licences ----------------------------------------------------------------
def test_every_role_of_the_workflows_has_a_photo(example_photos):
    names = _shipped(example_photos)
    assert sorted(names) == sorted(ALL_ROLES)  # no photo without a role, no role without a photo
    assert all(n.startswith(example_photos.PREFIX) for n in names)
    for name in names:
        assert (PHOTOS_DIR / name).stat().st_size < MAX_BYTES, name
        with Image.open(PHOTOS_DIR / name) as image:
            image.verify()  # a real image file, whatever LoadImage's PIL makes of it
            assert 384 <= max(image.size) <= 800, (name, image.size)


def test_every_photo_has_its_source_author_and_licence_in_sources_md(example_photos):
    sections = _sections()
    names = {p.name for p in example_photos.example_photos()}
    assert set(sections) == names, "SOURCES.md must have one '## <file>' section per photo, no more"
    for name, fields in sections.items():
        for field in ("role", "source", "author", "licence", "changes"):
            assert fields.get(field), f"{name}: no '- {field.capitalize()}:' line in SOURCES.md"
        licence = fields["licence"].lower()
        assert licence.startswith(ALLOWED_LICENCES), f"{name}: licence {fields['licence']!r}"


def test_the_workflows_load_only_example_photos(example_photos):
    """Every LoadImage of every bundled workflow names a photo the pack ships (no 404 on opening)."""
    shipped = {p.name for p in example_photos.example_photos()}
    for workflow in wd.WORKFLOWS.values():
        for node in workflow.prompt.values():
            if node["class_type"] == "LoadImage":
                assert node["inputs"]["image"] in shipped, (workflow.name, node["inputs"]["image"])


# --- faces, with the trained detector and recognizer ---------------------------------------------
def test_person_photos_hold_one_face_and_the_two_people_pictures_two(faces, real):
    for name in ONE_FACE:
        assert len(_faces_left_to_right(faces, real, name)) == 1, name
    for name in TWO_FACES:
        assert len(_faces_left_to_right(faces, real, name)) == 2, name
    for name in NO_FACE:  # Encode Style paints out faces: the painting has none to lose
        assert len(_faces_left_to_right(faces, real, name)) == 0, name


def test_the_identities_are_where_the_workflows_put_them(faces, real):
    """The three shots are one person and the other photo another; in the layout that person is face
    0 (left: mask 0, person 0) and the other face 1; in the scene the other way round."""
    def embeddings(name):
        found = faces.detect_and_embed(real, _rgb(name), select="left-to-right")
        return [f.normed_embedding for f in found]

    shots = [embeddings(name)[0] for name in PERSON_SHOTS]
    other = embeddings(wd.OTHER_PHOTO)[0]
    person = np.mean(shots, axis=0)
    person /= np.linalg.norm(person)
    for i, a in enumerate(shots):
        for b in shots[i + 1:]:
            assert float(a @ b) > SAME_PERSON
        assert float(a @ other) < OTHER_PERSON
    for name, expected in ((wd.LAYOUT, (person, other)), (wd.SCENE, (other, person))):
        found = embeddings(name)
        for face, (want, not_want) in zip(found, (expected, expected[::-1])):
            assert float(face @ want) > SAME_PERSON and float(face @ not_want) < OTHER_PERSON, name


# --- the copy into the input folder ----------------------------------------------------------------
def test_copy_puts_every_photo_at_the_top_of_the_input_folder_once(example_photos, tmp_path):
    target = tmp_path / "input"
    written = example_photos.copy_example_photos(target)
    photos = example_photos.example_photos()
    assert sorted(p.name for p in written) == sorted(p.name for p in photos)
    for photo in photos:
        assert (target / photo.name).read_bytes() == photo.read_bytes()
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in photos)  # top level, nothing else
    mtimes = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert example_photos.copy_example_photos(target) == []  # idempotent: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == mtimes


def test_a_users_file_of_the_same_name_is_kept_with_one_warning(example_photos, tmp_path, caplog):
    target = tmp_path / "input"
    target.mkdir()
    theirs = target / _shipped(example_photos)[0]
    Image.new("RGB", (64, 64), "red").save(theirs, format="PNG")
    before = theirs.read_bytes()
    with caplog.at_level(logging.WARNING, logger="FaceStudio.example_photos"):
        written = example_photos.copy_example_photos(target)
    assert theirs.read_bytes() == before
    assert sorted(p.name for p in written) == _shipped(example_photos)[1:]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(theirs) in warnings[0], warnings


def test_an_unwritable_input_folder_gives_a_warning_not_an_error(example_photos, tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the input folder's parent should be")  # fails even as root
    with caplog.at_level(logging.WARNING, logger="FaceStudio.example_photos"):
        assert example_photos.copy_example_photos(blocker / "input") == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(blocker / "input") in warnings[0] and "writable" in warnings[0]


def test_by_default_the_copy_goes_to_the_hosts_input_directory(example_photos, tmp_path):
    """Wherever the host's folder_paths says it is (--input-directory, --base-directory)."""
    import folder_paths

    saved = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "moved_input"))
    try:
        example_photos.copy_example_photos()
    finally:
        folder_paths.set_input_directory(saved)
    assert sorted(p.name for p in (tmp_path / "moved_input").iterdir()) == _shipped(example_photos)


# --- in the real server ---------------------------------------------------------------------------
@pytest.mark.smoke
def test_after_the_pack_loads_the_server_lists_and_loads_every_photo(example_photos, comfy_server):
    """The session's shared server: its input folder is the one the pack copied into at start-up.
    (Other tests may later save their own pictures under these names there, so the bytes are
    compared in the copy tests above, not here.)"""
    listed = comfy_server.get_json("/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"]
    options = listed[0] if isinstance(listed[0], list) else listed[1]["options"]
    shipped = _shipped(example_photos)
    assert set(shipped) <= set(options), sorted(set(shipped) - set(options))
    for name in shipped:  # served to the editor's previews: no 404
        Image.open(io.BytesIO(comfy_server.view(name, folder_type="input"))).verify()
    # A prompt with each photo passes the host's validation (v0.33 checks combo values) and runs.
    prompt = {}
    for i, name in enumerate(shipped):
        prompt[f"load{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        prompt[f"preview{i}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"load{i}", 0]}}
    entry = comfy_server.run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert not [m for m in comfy_server.log_messages() if "is not the pack's example photo" in m]
