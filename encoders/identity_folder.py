"""Where identity files live: names inside the identities folder (the nodes pass the host's output
folder's `facestudio/identities` as `root`), never a path outside it.

Host-free.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .identity import IdentityError

IDENTITY_SUBFOLDER = os.path.join("facestudio", "identities")
IDENTITY_SUFFIX = ".safetensors"


MAX_NAME_BYTES = 200  # per folder or file name: most file systems allow 255, and a number and suffix follow


def _relative_parts(name: str, what: str) -> list[str]:
    """`name` split into path parts, refusing absolute paths, drive letters, '..', control characters
    and names too long for the file system."""
    parts = [p for p in re.split(r"[\\/]", name or "") if p not in ("", ".")]
    if not parts:
        raise IdentityError(f"The {what} {name!r} is empty: type a name such as 'identity' (sub-folders allowed, "
                            "e.g. 'people/anna').")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or any(p == ".." for p in parts):
        raise IdentityError(f"'{name}' is not a {what} inside the identities folder ({IDENTITY_SUBFOLDER} of the "
                            "output folder): no absolute paths or '..'.")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise IdentityError(f"{name!r} is not a usable {what}: it holds control characters (such as a line break "
                            "or a NUL byte). Type the name again with letters, digits, '-', '_' and '/' only.")
    long = next((p for p in parts if len(p.encode("utf-8")) > MAX_NAME_BYTES), None)
    if long is not None:
        raise IdentityError(f"The {what} '{name[:60]}...' has a folder or file name of {len(long.encode('utf-8'))} "
                            f"bytes; file systems allow about 255 and FaceStudio at most {MAX_NAME_BYTES}: "
                            "use a shorter name.")
    return parts


def _inside(root: Path, candidate: Path) -> bool:
    root, candidate = os.path.realpath(root), os.path.realpath(candidate)
    return os.path.commonpath([root, candidate]) == root


def new_identity_path(root: str | os.PathLike, prefix: str) -> Path:
    """The next free `<prefix>_NNNNN.safetensors` under `root` (sub-folders in the prefix allowed)."""
    root = Path(root)
    parts = _relative_parts(prefix, "file name prefix")
    folder = root.joinpath(*parts[:-1])
    if not _inside(root, folder):
        raise IdentityError(f"'{prefix}' would save outside {root}: a folder on its way links to another place. "
                            "Choose a prefix whose folders are real folders inside it.")
    stem = parts[-1]
    taken = set()
    if folder.is_dir():
        pattern = re.compile(re.escape(stem) + r"_(\d+)" + re.escape(IDENTITY_SUFFIX) + "$")
        taken = {int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))}
    number = max(taken, default=0) + 1
    return folder / f"{stem}_{number:05d}{IDENTITY_SUFFIX}"


def identity_file_names(root: str | os.PathLike) -> list[str]:
    """The identity files under `root`, as '/'-separated names relative to it, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*" + IDENTITY_SUFFIX) if p.is_file())


def resolve_identity_file(root: str | os.PathLike, name: str) -> Path:
    """The path of identity file `name` under `root`; never a path outside it."""
    root = Path(root)
    candidate = root.joinpath(*_relative_parts(name, "file name"))
    if not _inside(root, candidate):
        raise IdentityError(f"'{name}' is outside the identities folder {root}: it is a link to (or inside a "
                            "linked folder pointing to) another place. Copy the file into the folder instead.")
    if not candidate.is_file():
        raise IdentityError(f"No identity file '{name}' in {root}. Save one with FaceStudio Save Identity and "
                            "refresh the node list.")
    return candidate
