"""Writes example_photos/*: the pictures the bundled workflows load from ComfyUI's input folder.

Every picture is made here, deterministically, from public-domain and CC0 sources that ship in PyPI
packages (example_photos/SOURCES.md says each one's origin, author, licence and what was changed):

    astronaut.png      scikit-image's data folder: Eileen Collins, NASA, public domain
    coffee.png         scikit-image's data folder: Rachel Michetti, CC0
    grace_hopper.jpg   matplotlib's mpl-data/sample_data: Grace Hopper, U.S. Navy, public domain
    starry_night.jpg   OpenCV's samples/data (opencv-python's sdist): van Gogh, The Starry Night, public domain

scikit-image's files are read from the installed package (the pack's own venv has it). The other
two go into a folder given with --sources (their SHA-256 are checked below):

    pip download --no-deps --only-binary :all: -d SRC matplotlib==3.11.2
    unzip -j SRC/matplotlib-3.11.2-*.whl matplotlib/mpl-data/sample_data/grace_hopper.jpg -d SRC
    # the sdist: pip prepares its metadata with scikit-build, so run it from a throwaway venv
    python3 -m venv /tmp/v && /tmp/v/bin/pip install scikit-build setuptools wheel
    /tmp/v/bin/pip download --no-deps --no-build-isolation --no-binary :all: -d SRC opencv-python==4.10.0.84
    tar xzf SRC/opencv-python-4.10.0.84.tar.gz -C SRC --strip-components=4 \\
        opencv-python-4.10.0.84/opencv/samples/data/starry_night.jpg

    .venv/bin/python scripts/make_example_photos.py --sources SRC

The pose image is drawn here (an OpenPose-style skeleton in the colours of the OpenPose body
preprocessor, our own work). Composites (the two-people layout and the scene) place the sources
side by side or over a background; no face is retouched, blended or generated.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_photos"
PREFIX = "facestudio_"

# SHA-256 of each source file as its package ships it (scikit-image 0.26.0, matplotlib 3.11.2,
# opencv-python 4.10.0.84): the pictures are made from exactly these.
SOURCE_SHA256 = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "grace_hopper.jpg": "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130",
    "starry_night.jpg": "accda7a19a90f22a4a922fdc8c230167d7abf5f80882171e2cee125c5f12481d",
}
JPEG_QUALITY = 90


def source_path(name: str, sources: Path | None) -> Path:
    if name in ("astronaut.png", "coffee.png"):
        import skimage

        return Path(skimage.__file__).parent / "data" / name
    if sources is None or not (sources / name).is_file():
        raise SystemExit(f"{name}: not found; pass --sources DIR with it (see this script's docstring)")
    return sources / name


def load(name: str, sources: Path | None, check: bool = True) -> Image.Image:
    path = source_path(name, sources)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if check and digest != SOURCE_SHA256[name]:
        raise SystemExit(f"{path}: SHA-256 {digest}, expected {SOURCE_SHA256[name]} (another version?)")
    return Image.open(path).convert("RGB")


def crop_resize(image: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int]) -> Image.Image:
    return image.crop(box).resize(size, Image.LANCZOS)


# --- the person: three shots of one photograph ---------------------------------------------------
def person_shots(astronaut: Image.Image) -> list[Image.Image]:
    """Eileen Collins (512x512). Shot 1 is the photo; shots 2 and 3 are other crops of it (mirrored
    and closer; turned 6 degrees, wider and darker), all 512x512 so ComfyUI's Image Batch batches
    them without resizing. Three different photos of a person work better: these show the node."""
    first = astronaut.copy()
    second = ImageOps.mirror(crop_resize(astronaut, (104, 8, 360, 264), (512, 512)))
    second = ImageEnhance.Color(ImageEnhance.Brightness(second).enhance(1.06)).enhance(1.1)
    turned = astronaut.rotate(6, resample=Image.BICUBIC, center=(224, 118), fillcolor=(0, 0, 0))
    third = crop_resize(turned, (48, 30, 432, 414), (512, 512))  # inside the turned photo: no corner left empty
    third = ImageEnhance.Contrast(ImageEnhance.Brightness(third).enhance(0.88)).enhance(0.92)
    return [first, second, third]


# --- the other person ------------------------------------------------------------------------------
def other_person(hopper: Image.Image) -> Image.Image:
    """Grace Hopper, 512x600 as matplotlib ships it: unchanged (re-encoded)."""
    return hopper.copy()


# --- two people: the layout and the scene -----------------------------------------------------------
def two_people_layout(astronaut: Image.Image, hopper: Image.Image) -> Image.Image:
    """768x512 (the two-people workflows' 3:2): Eileen Collins on the left half, Grace Hopper on the
    right, each a 384x512 crop of her photo."""
    left = crop_resize(astronaut, (56, 16, 344, 400), (384, 512))  # no shuttle model: a false face at 0.50
    right = crop_resize(hopper, (41, 0, 491, 600), (384, 512))
    canvas = Image.new("RGB", (768, 512))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (384, 0))
    return canvas


def _soft_ellipse(size: tuple[int, int], blur: float) -> Image.Image:
    """A cut-out mask: an ellipse whose lower half runs past the bottom edge, so a person fades out
    at the top and sides and is cut straight where the picture's bottom edge cuts them."""
    mask = Image.new("L", size, 0)
    margin = int(2 * blur)
    ImageDraw.Draw(mask).ellipse((margin, margin, size[0] - margin, size[1] + size[1]), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(blur))


def scene(astronaut: Image.Image, hopper: Image.Image, coffee: Image.Image) -> Image.Image:
    """768x512, for image to image: the two people side by side at a table (the background: the
    coffee photo's dark top and wooden table edge, stretched and blurred). Grace Hopper sits on the
    left and Eileen Collins on the right, the other way round from the layout, so the workflow's run
    visibly puts each identity in the other's place. The cup itself is left out: in front of the
    people it gave the detector a large third box (score 0.36 to 0.45 against the 0.5 threshold),
    which Regions, taking the largest faces, would have preferred to a real one."""
    background = coffee.crop((0, 0, 110, 400)).resize((768, 512), Image.LANCZOS).filter(ImageFilter.GaussianBlur(14))
    canvas = background.copy()
    people = [
        (crop_resize(hopper, (66, 40, 466, 600), (300, 420)), (44, 92)),
        (crop_resize(astronaut, (44, 10, 404, 512), (300, 419)), (424, 93)),
    ]
    for person, (x, y) in people:
        canvas.paste(person, (x, y), _soft_ellipse(person.size, 12))
    return canvas


# --- the style image ------------------------------------------------------------------------------
def style(starry_night: Image.Image) -> Image.Image:
    """The Starry Night without the scan's border, 640 px wide."""
    inner = starry_night.crop((8, 8, starry_night.width - 8, starry_night.height - 8))
    return inner.resize((640, round(640 * inner.height / inner.width)), Image.LANCZOS)


# --- the pose: an OpenPose body skeleton ------------------------------------------------------------
# The 18 COCO keypoints in OpenPose's order (nose, neck, right shoulder/elbow/wrist, left
# shoulder/elbow/wrist, right hip/knee/ankle, left hip/knee/ankle, right eye, left eye, right ear,
# left ear), as fractions of the image: a dancer with one arm raised and one leg stepping out.
POSE_KEYPOINTS = [
    (0.500, 0.170), (0.500, 0.270), (0.415, 0.280), (0.330, 0.205), (0.280, 0.095),
    (0.585, 0.280), (0.680, 0.330), (0.785, 0.280), (0.450, 0.540), (0.425, 0.720),
    (0.405, 0.905), (0.550, 0.540), (0.635, 0.690), (0.735, 0.830), (0.482, 0.152),
    (0.518, 0.152), (0.462, 0.165), (0.538, 0.165),
]
# OpenPose's limbs (1-based keypoint pairs) and colours (RGB), as its body preprocessor draws them.
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
         (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def pose(size: int = 512, stick_width: int = 4) -> Image.Image:
    """An OpenPose skeleton on black: each limb an ellipse at 60 % of its colour, each keypoint a
    disc of radius 4, as the OpenPose preprocessor that ControlNet's openpose model was trained on."""
    import cv2

    canvas = np.zeros((size, size, 3), np.uint8)
    points = [(x * size, y * size) for x, y in POSE_KEYPOINTS]
    for (a, b), color in zip(LIMBS, COLORS):
        (x0, y0), (x1, y1) = points[a - 1], points[b - 1]
        length = math.hypot(x1 - x0, y1 - y0)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        polygon = cv2.ellipse2Poly((int((x0 + x1) / 2), int((y0 + y1) / 2)), (int(length / 2), stick_width),
                                   int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for (x, y), color in zip(points, COLORS):
        cv2.circle(canvas, (int(x), int(y)), 4, color, thickness=-1)
    return Image.fromarray(canvas)


# --- all of them -------------------------------------------------------------------------------------
def make_all(sources: Path | None, check: bool = True) -> dict[str, Image.Image]:
    astronaut = load("astronaut.png", sources, check)
    coffee = load("coffee.png", sources, check)
    hopper = load("grace_hopper.jpg", sources, check)
    starry = load("starry_night.jpg", sources, check)
    shots = person_shots(astronaut)
    return {
        "person.jpg": shots[0], "person_2.jpg": shots[1], "person_3.jpg": shots[2],
        "other_person.jpg": other_person(hopper),
        "two_people_layout.jpg": two_people_layout(astronaut, hopper),
        "scene.jpg": scene(astronaut, hopper, coffee),
        "style.jpg": style(starry),
        "pose.png": pose(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=Path, help="folder with grace_hopper.jpg and starry_night.jpg")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-check", action="store_true", help="accept sources whose SHA-256 differ")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, image in make_all(args.sources, check=not args.no_check).items():
        path = args.out / (PREFIX + name)
        if name.endswith(".png"):
            image.save(path, optimize=True)
        else:
            image.save(path, quality=JPEG_QUALITY, optimize=True)  # no metadata is carried over
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
              f"{image.width}x{image.height}, {path.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
