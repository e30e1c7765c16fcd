"""The example photos of the bundled workflows, copied into the host's input folder when the pack loads.

The workflows' LoadImage nodes name `facestudio_*` files. LoadImage lists only the top level of
ComfyUI's input folder, and v0.33 rejects a value outside that list before a prompt runs, so the
photos in the pack's `example_photos/` (sources and licences: example_photos/SOURCES.md) are copied
there, under the same names. A file already there is never overwritten: with the same content there
is nothing to do; with other content it is the user's, and is left as it is, with one warning naming
it. Nothing here fails the pack's load: a folder that cannot be written to gets one warning saying
which folder and what to do.
"""
from __future__ import annotations

import filecmp
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger("FaceStudio.example_photos")

EXAMPLE_PHOTOS_DIR = Path(__file__).resolve().parents[1] / "example_photos"
PREFIX = "facestudio_"  # every name the workflows load starts with it, so no user file is taken for ours
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def example_photos(folder: Path = EXAMPLE_PHOTOS_DIR) -> list[Path]:
    """The pack's example photos, by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.startswith(PREFIX) and p.suffix.lower() in EXTENSIONS)


def _host_input_directory() -> str:
    import folder_paths  # the host's; it knows --input-directory and --base-directory by now

    return folder_paths.get_input_directory()


def _copy_new(source: Path, target: Path) -> None:
    """Copy `source` to `target`, which must not exist: opened exclusively, so a file that appears
    meanwhile is not overwritten either; a copy that fails half-way is removed."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        try:
            shutil.copyfileobj(src, dst)
        except BaseException:
            dst.close()
            target.unlink(missing_ok=True)
            raise


def copy_example_photos(input_dir: str | os.PathLike | None = None, photos: list[Path] | None = None) -> list[Path]:
    """Copy each example photo to the top level of `input_dir` (default: the host's input folder).

    Returns the files written (empty when every photo was already there). Never raises: a user's
    different file of the same name is kept, with a warning; an input folder that cannot be made
    or written to gives one warning and stops the copy.
    """
    try:
        folder = Path(input_dir if input_dir is not None else _host_input_directory())
        photos = example_photos() if photos is None else photos
        written = []
        for photo in photos:
            target = folder / photo.name
            if not (target.exists() or target.is_symlink()):
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    _copy_new(photo, target)
                    written.append(target)
                    continue
                except FileExistsError:  # appeared meanwhile (another ComfyUI on the same folder): compare below
                    pass
                except OSError as error:
                    logger.warning(
                        "FaceStudio: could not copy the example photos into ComfyUI's input folder %s (%s). The "
                        "bundled workflows load them by name: make that folder writable, or copy the files of %s "
                        "there yourself.", folder, error, photo.parent)
                    return written
            if not (target.is_file() and filecmp.cmp(photo, target, shallow=False)):
                logger.warning(
                    "FaceStudio: %s is not the pack's example photo of that name; it was left as it is, and the "
                    "bundled workflows will load it. To get the example back, rename or remove it and restart "
                    "ComfyUI (the original is %s).", target, photo)
        if written:
            logger.info("FaceStudio: %d example photo(s) copied into %s.", len(written), folder)
        return written
    except Exception as error:  # noqa: BLE001 - the pack's load must not fail over example pictures
        logger.warning("FaceStudio: the example photos were not copied into ComfyUI's input folder (%s: %s).",
                       type(error).__name__, error)
        return []
