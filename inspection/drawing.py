"""Drawing over images: detected faces, region masks and identity scores, for the preview and
scoring nodes.

Host-free (numpy, OpenCV; text in OpenCV's built-in Hershey font, so no font file is needed).
Images come in as ComfyUI gives them (RGB float 0..1 [H, W, C], a torch tensor or numpy, or a
[B, H, W, C] batch) and go out as float32 numpy of the same height and width: only the pixels a
drawing touches change; every other pixel is the input's value, unquantized. Three channels (four
with the input's alpha kept; a grey image comes back as RGB).

Colours: person i (face i in the preview, region mask i, the i-th identity input of the scoring
node) is drawn in PALETTE[i], so the same index has the same colour in both nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..encoders.faces import FACE_ORDERS, FaceAnalyzer, FaceError, detect_faces, face_order, images_list, to_bgr_uint8
from ..encoders.faces import to_rgb_uint8 as _rgb_uint8
from ..encoders.regions import RegionError, Regions, image_size

# Distinct colours (RGB), after Sasha Trubetskoy's list; cycled beyond twelve persons.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
)
UNMATCHED = (150, 150, 150)
BANNER = (20, 20, 20)
DEFAULT_OPACITY = 0.4


def person_colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


# ------------------------------------------------------------------------------------------------
# Primitives
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Style:
    line: int  # box thickness
    radius: int  # key point radius
    font_scale: float
    text: int  # text stroke thickness


def style_for(height: int, width: int) -> Style:
    side = min(height, width)
    scale = max(0.4, side / 900.0)
    return Style(line=max(2, round(side / 300)), radius=max(2, round(side / 220)), font_scale=scale,
                 text=max(1, round(scale * 1.6)))


def _text_colour(background: Sequence[int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_box(canvas: np.ndarray, bbox, colour, style: Style) -> None:
    import cv2

    x1, y1, x2, y2 = (int(round(float(v))) for v in bbox[:4])
    cv2.rectangle(canvas, (x1, y1), (x2, y2), tuple(int(c) for c in colour), style.line, cv2.LINE_8)


def draw_kps(canvas: np.ndarray, kps, colour, style: Style) -> None:
    import cv2

    for x, y in np.asarray(kps, np.float64).reshape(-1, 2):
        centre = (int(round(x)), int(round(y)))
        cv2.circle(canvas, centre, style.radius + 1, (0, 0, 0), -1, cv2.LINE_AA)
        cv2.circle(canvas, centre, style.radius, tuple(int(c) for c in colour), -1, cv2.LINE_AA)


def draw_label(canvas: np.ndarray, text: str, x: float, y: float, colour, style: Style, above: bool = True,
               centred: bool = False) -> None:
    """`text` on a box of `colour`, its left edge at x, its bottom at y (above) or its top at y (or
    centred on (x, y)), moved inside the image where it would leave it."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, style.font_scale, style.text)
    pad = max(2, style.text * 2)
    w, h = tw + 2 * pad, th + base + 2 * pad
    height, width = canvas.shape[:2]
    if centred:
        x, y, above = x - w / 2, y + h / 2, True
    left = int(min(max(0, round(x)), max(0, width - w)))
    top = int(round(y)) - h if above else int(round(y))
    if top < 0:
        top = int(round(y)) if above else 0
    top = int(min(max(0, top), max(0, height - h)))
    cv2.rectangle(canvas, (left, top), (left + w - 1, top + h - 1), tuple(int(c) for c in colour), -1)
    cv2.putText(canvas, text, (left + pad, top + pad + th), font, style.font_scale, _text_colour(colour),
                style.text, cv2.LINE_AA)


def draw_banner(canvas: np.ndarray, lines: Sequence[str], style: Style) -> None:
    """Lines of white text on a dark box, at the image's top left."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    y = 0
    for text in lines:
        (tw, th), base = cv2.getTextSize(text, font, style.font_scale, style.text)
        pad = max(2, style.text * 2)
        h = th + base + 2 * pad
        cv2.rectangle(canvas, (0, y), (tw + 2 * pad, y + h - 1), BANNER, -1)
        cv2.putText(canvas, text, (pad, y + pad + th), font, style.font_scale, (255, 255, 255), style.text, cv2.LINE_AA)
        y += h


# ------------------------------------------------------------------------------------------------
# Images in and out
# ------------------------------------------------------------------------------------------------
def _numpy(image) -> np.ndarray:
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().float().numpy()
    return np.asarray(image)


def to_rgb_uint8(image) -> np.ndarray:
    """RGB uint8 [H, W, 3], a writable copy (see encoders.faces.to_rgb_uint8 for what it accepts)."""
    return np.array(_rgb_uint8(image), copy=True)


def merge_drawing(image, before: np.ndarray, canvas: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3 or 4]: the input image where `canvas` equals `before`, the drawing elsewhere."""
    array = _numpy(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[:, :, None]
    if np.issubdtype(array.dtype, np.floating):
        out = array.astype(np.float32, copy=True)
    else:
        out = before.astype(np.float32) / 255.0
    if out.shape[2] in (1, 2):
        out = np.concatenate([np.repeat(out[:, :, :1], 3, axis=2), out[:, :, 1:]], axis=2)
    out = out[:, :, :4]
    changed = (canvas != before).any(axis=2)
    out[changed, :3] = canvas[changed].astype(np.float32) / 255.0
    return out


def prepare_masks(masks, height: int, width: int) -> np.ndarray:
    """A MASK batch [M, h, w] (or one [h, w]) as float32 [M, height, width] in 0..1; resized
    bilinearly when its size differs from the image's (as the host's mask nodes do)."""
    import cv2

    array = _numpy(masks).astype(np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or 0 in array.shape:
        raise FaceError(f"expected a MASK batch [M, H, W], got shape {tuple(array.shape)}")
    array = np.clip(np.nan_to_num(array), 0.0, 1.0)
    if array.shape[1:] != (height, width):
        array = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in array])
    return array


def label_point(mask: np.ndarray) -> tuple[int, int] | None:
    """The point deepest inside the mask (farthest from its edge), or None for an empty mask."""
    import cv2

    binary = mask >= 0.5
    if not binary.any():
        binary = mask > 0
    if not binary.any():
        return None
    padded = np.pad(binary.astype(np.uint8), 1)  # the image border counts as an edge
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(x), int(y)


def tint_masks(canvas: np.ndarray, masks: np.ndarray, opacity: float, style: Style) -> list[int]:
    """Blends mask i's region with person_colour(i) at `opacity` x the mask value and writes "mask i"
    at its deepest point. Returns the indices of empty masks."""
    empty = []
    tinted = canvas.astype(np.float32)
    for i, mask in enumerate(masks):
        alpha = (float(opacity) * mask)[:, :, None]
        tinted = tinted * (1.0 - alpha) + np.asarray(person_colour(i), np.float32) * alpha
    canvas[:] = np.clip(np.rint(tinted), 0, 255).astype(np.uint8)
    for i, mask in enumerate(masks):
        point = label_point(mask)
        if point is None:
            empty.append(i)
            continue
        draw_label(canvas, f"mask {i}", point[0], point[1], person_colour(i), style, centred=True)
    return empty


# ------------------------------------------------------------------------------------------------
# The face preview
# ------------------------------------------------------------------------------------------------
def draw_preview(image, bboxes, kpss, order: str = "left-to-right", masks=None,
                 opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """One image with its faces drawn (box, five key points, "face k" and the detection score, in
    person_colour(k) for the k-th face in `order`) over its region masks (mask i tinted in
    person_colour(i)). `bboxes` (n, 5) with scores, `kpss` (n, 5, 2), in the image's pixels."""
    before = to_rgb_uint8(image)
    canvas = before.copy()
    height, width = canvas.shape[:2]
    style = style_for(height, width)
    banner = []
    if masks is not None:
        empty = tint_masks(canvas, prepare_masks(masks, height, width), opacity, style)
        banner += [f"mask {i} is empty" for i in empty]
    boxes = np.asarray(bboxes, np.float64).reshape(-1, 5) if len(bboxes) else np.zeros((0, 5))
    ranks = face_order(boxes, order)
    largest = face_order(boxes, "largest")[0] if len(boxes) > 1 else None
    for k, row in enumerate(ranks):
        colour = person_colour(k)
        draw_box(canvas, boxes[row], colour, style)
        draw_kps(canvas, np.asarray(kpss)[row], colour, style)
    for k, row in enumerate(ranks):  # labels last, over every box
        text = f"face {k}  {boxes[row, 4]:.2f}" + ("  largest" if row == largest and order != "largest" else "")
        draw_label(canvas, text, boxes[row, 0], boxes[row, 1], person_colour(k), style)
    if not len(boxes):
        banner.insert(0, "no face found")
    if banner:
        draw_banner(canvas, banner, style)
    return merge_drawing(image, before, canvas)


def preview_batch(analyzer: FaceAnalyzer, images, order: str = "left-to-right", masks=None,
                  opacity: float = DEFAULT_OPACITY, progress=None) -> np.ndarray:
    """draw_preview for every image of a batch, faces from the analyzer (with its retries at smaller
    detection sizes, as Encode Identity sees them). Every region mask is drawn on every image."""
    if order not in FACE_ORDERS:
        raise FaceError(f"order must be one of {', '.join(FACE_ORDERS)}, not {order!r}")
    if not 0.0 <= float(opacity) <= 1.0:
        raise FaceError(f"mask opacity must be between 0 and 1, not {opacity}")
    photos = images_list(images)
    if not photos:
        raise FaceError("no image to preview: the image batch is empty")
    out = []
    for index, photo in enumerate(photos):
        bboxes, kpss, _ = detect_faces(analyzer, to_bgr_uint8(photo))
        out.append(draw_preview(photo, bboxes, kpss, order, masks, opacity))
        if progress is not None:
            progress(index + 1, len(photos))
    return np.stack(out)


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------
def draw_scores(image, score, names: Sequence[str], threshold: float,
                colours: Sequence[int] | None = None) -> np.ndarray:
    """One image annotated with an inspection.scoring.ImageScore: each matched face boxed in its
    identity's colour with the identity's name and similarity ("low" below the threshold),
    unmatched faces in grey, identities not found listed at the top left. `colours[r]`: the
    person_colour index of reference r (default r)."""
    colours = list(range(len(names))) if colours is None else list(colours)
    before = to_rgb_uint8(image)
    canvas = before.copy()
    style = style_for(*canvas.shape[:2])
    by_face = {m.face: m for m in score.matches}
    for face in score.faces:
        match = by_face.get(face.index)
        colour = UNMATCHED if match is None else person_colour(colours[match.reference])
        draw_box(canvas, face.bbox, colour, style)
        draw_kps(canvas, face.kps, colour, style)
    for face in score.faces:
        match = by_face.get(face.index)
        if match is None:
            text, colour = f"face {face.index}: no identity", UNMATCHED
        else:
            low = "  low" if match.similarity < threshold else ""
            text = f"{names[match.reference]}  {match.similarity:.2f}{low}"
            colour = person_colour(colours[match.reference])
        draw_label(canvas, text, face.bbox[0], face.bbox[1], colour, style)
    banner = []
    if not score.faces:
        banner.append("no face found")
    if score.unmatched_references:
        banner.append("not found: " + ", ".join(names[r] for r in score.unmatched_references))
    if banner:
        draw_banner(canvas, banner, style)
    return merge_drawing(image, before, canvas)


def draw_score_batch(images, result, colours: Sequence[int] | None = None) -> np.ndarray:
    """draw_scores for every image of the batch scored in `result` (an inspection.scoring.ScoreResult)."""
    photos = images_list(images)
    if len(photos) != len(result.images):
        raise FaceError(f"{len(photos)} image(s) but {len(result.images)} scored")
    return np.stack([draw_scores(photo, score, result.names, result.threshold, colours)
                     for photo, score in zip(photos, result.images)])


SPLIT_CANVAS_GREY = 128  # the regions preview's background when a split has no image


# ------------------------------------------------------------------------------------------------
# Regions (FaceStudio Regions' preview)
# ------------------------------------------------------------------------------------------------
def draw_regions(regions: Regions, image=None, opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """float32 RGB [H, W, 3]: mask i tinted in person_colour(i) and labelled "mask i" over the image
    (a grey canvas without one); in face modes each taken face boxed in its person's colour and
    labelled "face i", faces left out boxed in grey and labelled "not used"."""
    masks, faces, unused = np.asarray(regions.masks, np.float32), regions.faces, regions.unused
    height, width = masks.shape[1:]
    if image is None:
        before = np.full((height, width, 3), SPLIT_CANVAS_GREY, np.uint8)
    else:
        image_h, image_w = image_size(image)
        if (image_h, image_w) != (height, width):
            raise RegionError(f"the preview image is {image_w}x{image_h} but the masks are {width}x{height}")
        before = to_rgb_uint8(image)
    canvas = before.copy()
    style = style_for(height, width)
    tint_masks(canvas, masks, opacity, style)
    rows = [] if faces is None else [(row, person_colour(i), f"face {i}") for i, row in enumerate(faces)]
    rows += [] if unused is None else [(row, UNMATCHED, "not used") for row in unused]
    for row, colour, _ in rows:
        draw_box(canvas, row, colour, style)
    for row, colour, text in rows:
        draw_label(canvas, text, row[0], row[1], colour, style)
    if image is None:
        return canvas.astype(np.float32) / 255.0
    return np.ascontiguousarray(merge_drawing(image, before, canvas)[:, :, :3])
