"""Automatic region masks: N persons -> N masks, mask i for person i, for FaceStudio Person's mask.

Host-free (numpy, OpenCV). Three sources:

- a layout image: its faces are detected (the analyzer Encode Identity uses, with the same retries)
  and mask i belongs to face i counted left to right, the number Encode Identity's `index` and Face
  Preview give it. When the image holds more faces than asked for, the `count` largest are kept
  (by box area, then detection score, as Encode Identity's face = largest ranks them): extra faces
  are far more often background people or false detections than main subjects. They are still
  numbered left to right among themselves.
  * "grow": each face box grown to a rectangle over the person's likely head and upper body
    (GROW_WIDTH face widths wide, centred on the face; GROW_UP face heights above the box for the
    hair and skull, GROW_DOWN below it to about the waist; see those constants).
  * "partition": every pixel to the nearest face centre, optionally with distances divided by the
    face's size, so the regions never overlap and cover the whole image.
  In both, the pixels of a face box belong to that face first (where two boxes overlap, the nearer
  centre wins), and where grown rectangles overlap, the nearer face centre wins: no two regions
  overlap and no region covers another person's face box (before feathering, which softens every
  border over `feather` pixels on each side). Faces left out by `count` are nobody's: they may lie
  in any region.
- segment masks (mode "segments"): a MASK batch with one mask per person from a segmentation model
  (SAM3 Detect with individual_masks on; in any order, e.g. by score), or person boxes, each a
  filled rectangle. A segment holds a face of the layout image when it covers at least
  MIN_FACE_COVER of the face's box; persons are the faces held by a segment (the `count` largest
  when more, as above), numbered left to right, and person i's region is the union of the
  segments holding face i, so the regions are silhouettes. The rest is reported, not guessed:
  * a segment holding no face is dropped (a person facing away, or not a person);
  * a segment holding several faces (a union of people, e.g. individual_masks off) is split
    between them by nearest face centre, as partition does, the parts of faces left out by `count`
    going to nobody; a person's own segments (holding only their face) win over such shared ones.
    It never goes to one of them whole;
  * faces in no segment are not used; fewer faced segments than `count` is a RegionError, and an
    empty batch (SAM3 found nothing) is one too.
  Face boxes come first here as well, so each region holds its whole face box (also where the
  silhouette misses a corner of it) and no other person's; where two persons' segments overlap,
  the nearer face centre wins.
- a split of a width x height canvas: "columns" (left to right), "rows" (top to bottom) or "grid"
  (row by row, each row left to right). Boundaries fall on whole pixels: strip i of N over L pixels
  spans [floor(i L / N), floor((i + 1) L / N)).

Face modes also say what they did in Regions.report() (the node's report output); `notes` are the
warnings among it (segments dropped or split, faces not used). `region_mask` takes one person's mask
of such a batch (FaceStudio Region Mask), the one FaceStudio Person's `mask_index` picks.

Ties (a pixel exactly as near to two faces) go to the face with the lower number (further left).

Masks are float32 [N, H, W] in [0, 1]. Without feathering each is 0 or 1; they never overlap, and
in the partition and split modes they sum to exactly 1 at every pixel (in grow and segments modes
to 1 inside a region, 0 outside them all). Feathering blurs the one-hot region maps (and the
"nobody" map) with one kernel of radius `feather`: a Gaussian (sigma = feather / 2, cut off at the radius)
or a box filter, which turns a straight border into a linear ramp. Blurring is linear and the
one-hot maps sum to 1, so the soft masks still sum to at most 1 (exactly 1 where the hard ones
did), and they are renormalized by that sum and rounded down to multiples of 2**-20 so that the
float32 masks sum to <= 1 at every pixel exactly, not up to rounding (the routing would divide by
max(1, sum) anyway; this says it). Pixels farther than `feather` from every border keep their 0 or
1 exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .faces import FaceAnalyzer, detect_faces, face_order, to_bgr_uint8

FACE_MODES = ("grow", "partition")
SEGMENTS = "segments"
SPLIT_MODES = ("columns", "rows", "grid")
MODES = FACE_MODES + (SEGMENTS,) + SPLIT_MODES
FEATHER_SHAPES = ("gaussian", "linear")

# Grow mode's rectangle, in units of the detector's face box (about brow to chin, cheek to cheek).
# Shoulder breadth is about 2.8 face breadths in adults (biacromial ~39 cm, bizygomatic ~14 cm), so
# 3 widths holds the shoulders and a little arm. The skull and hair rise about half a face height
# above the box; chin to waist is about 2.5 head heights, about 3 face-box heights. The regions are
# thus head and upper body, what a multi-person portrait shows of each person; raise GROW_DOWN
# (the node's grow_down) for full figures.
GROW_WIDTH = 3.0
GROW_UP = 0.5
GROW_DOWN = 3.0

# A segment holds a face when it covers at least this share of the face box: a person's silhouette
# covers nearly all of their own face box, a neighbour's at most an edge of it.
MIN_FACE_COVER = 0.5
# SAM3 masks come at the image's size; another size of the same shape (within this relative
# difference of aspect ratio) is resized, another shape is another picture's and an error.
ASPECT_TOLERANCE = 0.01

BACKGROUND = -1  # the label of pixels in no region (grow mode)
NOBODY = 3  # the claim tier of a pixel a face does not claim (see _nearest_face)
QUANTUM_BITS = 20  # feathered mask values are multiples of 2**-20 (see labels_to_masks)
SNAP = 1e-6  # in quanta: float error of the blur, far below one quantum (see labels_to_masks)


class RegionError(ValueError):
    """A problem with the user's inputs (too few faces, a bad size or count), not a bug."""

    __module__ = "FaceStudio"  # the type name the host's error dialog shows (see encoders/faces.py FaceError)


@dataclass(frozen=True)
class GrowShape:
    """Grow mode's rectangle around a face box of width w, height h, centre x cx: from
    cx - width w / 2 to cx + width w / 2, and from up h above the box's top to down h below its bottom."""

    width: float = GROW_WIDTH
    up: float = GROW_UP
    down: float = GROW_DOWN

    def __post_init__(self):
        if not (math.isfinite(self.width) and self.width >= 1.0):
            raise RegionError(f"grow width must be at least 1 face width (the face box itself), not {self.width}")
        for name in ("up", "down"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise RegionError(f"grow {name} must be 0 or more face heights, not {value}")

    def boxes(self, faces: np.ndarray) -> np.ndarray:
        """(n, 4) x1 y1 x2 y2 face boxes -> the grown rectangles (not clipped to the image)."""
        faces = np.asarray(faces, np.float64).reshape(-1, 4)
        w, h = faces[:, 2] - faces[:, 0], faces[:, 3] - faces[:, 1]
        cx = (faces[:, 0] + faces[:, 2]) / 2
        return np.stack([cx - self.width * w / 2, faces[:, 1] - self.up * h,
                         cx + self.width * w / 2, faces[:, 3] + self.down * h], axis=1)


@dataclass(frozen=True, eq=False)
class Regions:
    masks: np.ndarray  # float32 [N, H, W] in [0, 1], mask i for person i
    labels: np.ndarray  # int32 [H, W]: the person each pixel belongs to before feathering, BACKGROUND for nobody
    mode: str
    faces: np.ndarray | None = None  # face modes: float32 [N, 5] boxes + scores, person order (left to right)
    unused: np.ndarray | None = None  # face modes: faces found but not taken, [M, 5]
    notes: tuple[str, ...] = ()  # warnings: what was dropped, split or not used
    origins: tuple[str, ...] = ()  # segments mode: where mask i came from, e.g. "segment 3"

    def report(self) -> str:
        n, height, width = self.masks.shape
        lines = [f"FaceStudio Regions ({self.mode}): {n} mask{'s' if n != 1 else ''} of {width}x{height}."]
        for i, row in enumerate([] if self.faces is None else self.faces):
            origin = f", from {self.origins[i]}" if i < len(self.origins) else ""
            lines.append(f"mask {i}: face {i} at x {row[0]:.0f}-{row[2]:.0f}, y {row[1]:.0f}-{row[3]:.0f}{origin}")
        return "\n".join(lines + [f"warning: {note}" for note in self.notes])


# ------------------------------------------------------------------------------------------------
# Which faces
# ------------------------------------------------------------------------------------------------
def choose_faces(bboxes, count: int, what: str = "the layout image") -> tuple[list[int], list[int]]:
    """Rows of `bboxes` ((n, 4) or (n, 5) with scores) for `count` persons, left to right, and the
    rows left out. More faces than `count`: the `count` largest. Fewer: RegionError."""
    _check_count(count)
    boxes = np.asarray(bboxes, np.float64).reshape(len(bboxes), -1) if len(bboxes) else np.zeros((0, 5))
    found = len(boxes)
    if found < count:
        what = what[0].upper() + what[1:]
        if found == 0:
            raise RegionError(
                f"{what} has no face the analyzer can find, but count asks for {count} persons. Use a layout "
                f"image where the people's faces are clearly visible (check it with FaceStudio Face Preview), or a "
                f"columns, rows or grid split, which needs no faces.")
        raise RegionError(
            f"{what} has {found} face{'s' if found > 1 else ''} but count asks for {count} persons. Set count to "
            f"{found} or fewer, use a layout image where all {count} people's faces are visible (check it with "
            f"FaceStudio Face Preview), or a columns, rows or grid split, which needs no faces.")
    kept = set(face_order(boxes, "largest")[:count])
    ranked = face_order(boxes, "left-to-right")
    return [i for i in ranked if i in kept], [i for i in ranked if i not in kept]


def _check_count(count: int) -> None:
    if int(count) != count or count < 1:
        raise RegionError(f"count must be a whole number of persons, 1 or more, not {count}")


def _check_size(height: int, width: int) -> None:
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise RegionError(f"the region size must be at least 1x1 pixels, not {width}x{height} (width x height)")


# ------------------------------------------------------------------------------------------------
# Label maps
# ------------------------------------------------------------------------------------------------
def face_labels(faces, height: int, width: int, mode: str, grow: GrowShape = GrowShape(),
                size_weighted: bool = False) -> np.ndarray:
    """int32 [H, W]: for each pixel, the face (row of `faces`, (n, 4) x1 y1 x2 y2 in pixels, in
    person order) it belongs to, or BACKGROUND. A pixel is in a box when its centre (x + 0.5, y + 0.5)
    is. Priority: the face boxes containing the pixel; else (grow) the grown rectangles containing it,
    (partition) every face; among those the nearest face centre, by distance / sqrt(w h) when
    `size_weighted`; ties to the lower row."""
    if mode not in FACE_MODES:
        raise RegionError(f"face mode must be one of {', '.join(FACE_MODES)}, not {mode!r}")
    _check_size(height, width)
    boxes = np.asarray(faces, np.float64).reshape(-1, 4)
    grown = grow.boxes(boxes)

    def claim(i, xs, ys):
        if mode == "partition":
            return np.int8(1)
        gx1, gy1, gx2, gy2 = grown[i]
        return np.where((xs >= gx1) & (xs <= gx2) & (ys >= gy1) & (ys <= gy2), 1, NOBODY)

    return _nearest_face(boxes, height, width, claim, size_weighted)


def _nearest_face(boxes: np.ndarray, height: int, width: int, claim, size_weighted: bool) -> np.ndarray:
    """The labels of face_labels and segment_labels. `claim(i, xs, ys)`: the tier of each pixel for
    face i outside its box (1, 2: lower wins; NOBODY: not claimed), broadcastable to [H, W]. The
    face's own box is tier 0; among equal tiers the nearest centre wins, ties to the lower row."""
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    labels = np.full((height, width), BACKGROUND, np.int32)
    best_tier = np.full((height, width), NOBODY, np.int8)
    best_cost = np.full((height, width), np.inf)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        cost = (xs - cx) ** 2 + (ys - cy) ** 2
        if size_weighted:
            cost = cost / max(1.0, (x2 - x1) * (y2 - y1))
        in_face = (xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)
        tier = np.broadcast_to(np.where(in_face, 0, claim(i, xs, ys)), (height, width)).astype(np.int8)
        better = (tier < NOBODY) & ((tier < best_tier) | ((tier == best_tier) & (cost < best_cost)))
        labels[better], best_tier[better], best_cost[better] = i, tier[better], cost[better]
    return labels


def segment_labels(faces, own: np.ndarray, shared: np.ndarray, size_weighted: bool = False) -> np.ndarray:
    """int32 [H, W] for segments mode: `faces` (n, 4), left to right; own[i] / shared[i] (bool
    [n, H, W]): the pixels of the segments holding face i alone / with other faces. Priority:
    face boxes, then own segments, then shared ones; the nearest face centre among equals."""
    own, shared = np.asarray(own, bool), np.asarray(shared, bool)
    boxes = np.asarray(faces, np.float64).reshape(-1, 4)
    def claim(i, xs, ys):
        return np.where(own[i], 1, np.where(shared[i], 2, NOBODY))

    return _nearest_face(boxes, *own.shape[1:], claim, size_weighted)


def _edges(length: int, parts: int) -> list[int]:
    return [(i * length) // parts for i in range(parts + 1)]


def split_labels(mode: str, count: int, height: int, width: int, columns: int = 0) -> np.ndarray:
    """int32 [H, W] for a split of `count` regions. "grid": `columns` per row (0: ceil(sqrt(count))),
    as many rows as needed; a last row with fewer regions shares the full width among them."""
    if mode not in SPLIT_MODES:
        raise RegionError(f"split mode must be one of {', '.join(SPLIT_MODES)}, not {mode!r}")
    _check_count(count)
    _check_size(height, width)
    labels = np.empty((height, width), np.int32)
    if mode == "columns":
        cells = [(0, height, *span) for span in _spans(width, count, "width", "columns")]
    elif mode == "rows":
        cells = [(*span, 0, width) for span in _spans(height, count, "height", "rows")]
    else:
        if int(columns) != columns or columns < 0:
            raise RegionError(f"grid columns must be 0 (automatic) or more, not {columns}")
        per_row = min(count, int(columns) or math.ceil(math.sqrt(count)))
        n_rows = math.ceil(count / per_row)
        cells = []
        for r, (top, bottom) in enumerate(_spans(height, n_rows, "height", "grid rows")):
            in_row = min(per_row, count - r * per_row)
            cells += [(top, bottom, left, right) for left, right in _spans(width, in_row, "width", "grid columns")]
    for i, (top, bottom, left, right) in enumerate(cells):
        labels[top:bottom, left:right] = i
    return labels


def _spans(length: int, parts: int, side: str, what: str) -> list[tuple[int, int]]:
    if parts > length:
        raise RegionError(f"{parts} {what} do not fit in a {side} of {length} pixels: every region needs at least "
                          f"one pixel. Lower count or enlarge the {side}.")
    edges = _edges(length, parts)
    return list(zip(edges[:-1], edges[1:]))


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
def feather_kernel(feather: int, shape: str = "gaussian") -> np.ndarray:
    """The 1-D kernel (2 feather + 1 taps, summing to 1) applied along rows, then columns."""
    if shape not in FEATHER_SHAPES:
        raise RegionError(f"feather shape must be one of {', '.join(FEATHER_SHAPES)}, not {shape!r}")
    if int(feather) != feather or feather < 0:
        raise RegionError(f"feather must be a whole number of pixels, 0 or more, not {feather}")
    feather = int(feather)
    taps = np.arange(-feather, feather + 1, dtype=np.float64)
    if shape == "gaussian" and feather:
        kernel = np.exp(-0.5 * (taps / (feather / 2.0)) ** 2)
    else:
        kernel = np.ones_like(taps)
    return kernel / kernel.sum()


def labels_to_masks(labels: np.ndarray, count: int, feather: int = 0, shape: str = "gaussian") -> np.ndarray:
    """float32 [count, H, W]: mask i is 1 where labels == i, feathered as the module docstring says."""
    import cv2

    kernel = feather_kernel(feather, shape)
    labels = np.asarray(labels)
    hard = np.stack([labels == i for i in range(count)]).astype(np.float32)
    if len(kernel) == 1:
        return hard
    background = (labels == BACKGROUND)[None].astype(np.float32)
    maps = np.concatenate([hard, background]) if background.any() else hard
    soft = np.stack([cv2.sepFilter2D(m.astype(np.float64), cv2.CV_64F, kernel, kernel,
                                     borderType=cv2.BORDER_REPLICATE) for m in maps])
    soft = np.clip(soft, 0.0, 1.0)
    soft /= np.maximum(soft.sum(axis=0, keepdims=True), 1.0)  # 1 up to rounding already: said, not assumed
    # Rounded down to multiples of 2**-QUANTUM_BITS: float32 sums of such values are exact, so the
    # masks sum to <= 1 at every pixel with no rounding slack (and lose at most 1e-6 each). SNAP lifts
    # values a hair below a multiple (a kernel's float sum, e.g. 33 x 1/33, is 1 - 1e-16) onto it,
    # so untouched pixels stay exactly 1; fewer than 1 / SNAP maps keep the sum <= 1.
    quanta = np.floor(soft[:count] * 2.0 ** QUANTUM_BITS + SNAP)
    return (quanta / 2.0 ** QUANTUM_BITS).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The two sources
# ------------------------------------------------------------------------------------------------
def image_size(image) -> tuple[int, int]:
    """(height, width) of one ComfyUI IMAGE ([H, W, C] or a batch of one [1, H, W, C])."""
    shape = tuple(getattr(image, "shape", np.shape(image)))
    if len(shape) == 4:
        if shape[0] != 1:
            raise RegionError(f"the layout image is a batch of {shape[0]} images; regions are made from one: "
                              f"pick one with ImageFromBatch (batch_index, length 1).")
        shape = shape[1:]
    if len(shape) not in (2, 3) or min(shape[:2]) < 1:
        raise RegionError(f"expected one image [H, W, C], got shape {shape}")
    return int(shape[0]), int(shape[1])


def face_regions(analyzer: FaceAnalyzer, image, count: int, mode: str = "grow", *, grow: GrowShape = GrowShape(),
                 size_weighted: bool = False, feather: int = 0, feather_shape: str = "gaussian") -> Regions:
    """Regions for `count` persons from the faces of one layout image, at its size."""
    if mode not in FACE_MODES:
        raise RegionError(f"face mode must be one of {', '.join(FACE_MODES)}, not {mode!r}")
    height, width = image_size(image)
    feather_kernel(feather, feather_shape)  # bad settings fail before the detector runs
    bboxes, _, _ = detect_faces(analyzer, to_bgr_uint8(image))
    bboxes = np.asarray(bboxes, np.float32).reshape(-1, 5)
    chosen, unused = choose_faces(bboxes, count, f"the layout image ({width}x{height})")
    faces = bboxes[chosen]
    labels = face_labels(faces[:, :4], height, width, mode, grow, size_weighted)
    notes = (f"{_faces(len(unused))} more in the layout image not used: count keeps the largest.",) if unused else ()
    return Regions(labels_to_masks(labels, count, feather, feather_shape), labels, mode, faces, bboxes[unused],
                   notes)


def split_regions(mode: str, count: int, height: int, width: int, *, columns: int = 0, feather: int = 0,
                  feather_shape: str = "gaussian") -> Regions:
    """Regions for `count` persons from a columns / rows / grid split of a height x width canvas."""
    labels = split_labels(mode, count, height, width, columns)
    return Regions(labels_to_masks(labels, count, feather, feather_shape), labels, mode)


def segment_masks(segments, height: int, width: int) -> tuple[np.ndarray, list[str]]:
    """A MASK batch ([M, h, w], or one [h, w]) as bool [M, height, width] (value >= 0.5), and notes.
    Another size of the layout image's shape is resized (bilinear, as the host's mask nodes do);
    another shape is a RegionError. An empty batch [0, h, w] (SAM3 found nothing) comes back empty."""
    import cv2

    array = segments.detach().cpu().float().numpy() if hasattr(segments, "detach") else np.asarray(segments)
    array = np.nan_to_num(array.astype(np.float32))
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise RegionError(f"segments must be a MASK batch [M, H, W], one mask per person, not shape {array.shape}")
    h, w = array.shape[1:]
    if (h, w) == (height, width) or not len(array):
        return array >= 0.5, []
    if min(h, w) < 1 or abs((w / h) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        raise RegionError(f"the segments are {w}x{h} but the layout image is {width}x{height} (width x height), "
                          f"another shape: they were made from another picture. Segment the layout image itself "
                          f"(connect the same image to SAM3 Detect and to Regions).")
    resized = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in array])
    return resized >= 0.5, [f"the segments ({w}x{h}) were resized to the layout image's {width}x{height}."]


def box_masks(boxes, height: int, width: int) -> np.ndarray:
    """A BOUNDING_BOX value as bool [M, height, width] filled rectangles: a dict {x, y, width, height}
    in the layout image's pixels, a list of them, or a per-image list of such lists (SAM3 Detect's,
    RT-DETR's), which must be for one image. Pixels whose centres lie inside a box are in it."""
    if isinstance(boxes, dict):
        boxes = [boxes]
    boxes = list(boxes or [])
    if boxes and all(isinstance(b, (list, tuple)) for b in boxes):
        if len(boxes) > 1:
            raise RegionError(f"the boxes are for {len(boxes)} images (a list per image); regions are made from "
                              f"one layout image: detect on that one image.")
        boxes = list(boxes[0])
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    out = np.zeros((len(boxes), height, width), bool)
    for k, box in enumerate(boxes):
        try:
            x, y, w, h = (float(box[key]) for key in ("x", "y", "width", "height"))
        except (KeyError, TypeError, ValueError):
            raise RegionError(f"box {k} is not a bounding box {{x, y, width, height}}: {box!r}") from None
        out[k] = (xs >= x) & (xs <= x + w) & (ys >= y) & (ys <= y + h)
    return out


def face_cover(masks: np.ndarray, bboxes: np.ndarray) -> np.ndarray:
    """float [M, F]: the share of face f's box (its pixels, or the pixel under its centre when it has
    none) that mask m covers."""
    height, width = masks.shape[1:]
    cover = np.zeros((len(masks), len(bboxes)))
    for f, box in enumerate(bboxes):
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        rows = slice(max(0, math.ceil(y1 - 0.5)), min(height, math.floor(y2 - 0.5) + 1))
        cols = slice(max(0, math.ceil(x1 - 0.5)), min(width, math.floor(x2 - 0.5) + 1))
        if rows.start >= rows.stop or cols.start >= cols.stop:
            row = min(height - 1, max(0, int((y1 + y2) / 2)))
            col = min(width - 1, max(0, int((x1 + x2) / 2)))
            rows, cols = slice(row, row + 1), slice(col, col + 1)
        cover[:, f] = masks[:, rows, cols].mean(axis=(1, 2))
    return cover


def segment_regions(analyzer: FaceAnalyzer, image, count: int, segments=None, boxes=None, *,
                    size_weighted: bool = False, feather: int = 0, feather_shape: str = "gaussian") -> Regions:
    """Regions for `count` persons from segment masks (or, without them, person boxes) matched to the
    faces of one layout image, as the module docstring says. `segments` win when both are given."""
    height, width = image_size(image)
    _check_count(count)
    feather_kernel(feather, feather_shape)  # bad settings fail before the detector runs
    if segments is not None:
        masks, notes = segment_masks(segments, height, width)
        what = "segment"
        if boxes is not None:
            notes.append("boxes not used: segments are connected and take precedence.")
    elif boxes is not None:
        masks, notes, what = box_masks(boxes, height, width), [], "box"
    else:
        raise RegionError("mode 'segments' needs a MASK batch with one mask per person on `segments` (SAM3 Detect's "
                          "masks, individual_masks on), or person boxes on `boxes`; or choose grow or partition.")
    whats = "boxes" if what == "box" else "segments"
    if not len(masks):
        found = "The boxes are an empty list: the detector" if what == "box" else \
            "The segments are an empty MASK batch: SAM3 Detect (or your segmenter)"
        raise RegionError(f"{found} found nothing in the layout image, but count asks for {count} persons. Lower "
                          f"SAM3 Detect's threshold (e.g. 0.3), or try another prompt ('person', 'woman', 'man'), "
                          f"and check it gets the layout image.")
    bboxes, _, _ = detect_faces(analyzer, to_bgr_uint8(image))
    bboxes = np.asarray(bboxes, np.float32).reshape(-1, 5)
    holds = face_cover(masks, bboxes) >= MIN_FACE_COVER  # [M, F]
    held = np.flatnonzero(holds.any(axis=0))
    layout = f"the layout image ({width}x{height})"
    if len(held) < count and not len(bboxes):
        raise RegionError(f"{layout[0].upper()}{layout[1:]} has no face the analyzer can find, but segments mode "
                          f"matches each segment to a person by the face in it. Use a layout image where the "
                          f"people's faces are clearly visible (check it with FaceStudio Face Preview), or a "
                          f"columns, rows or grid split.")
    if len(held) < count:
        fix = (f"Set count to {len(held)}{' or fewer' if len(held) > 1 else ''}, or make" if len(held) else
               "Check that the segments are of the layout image, and make")
        raise RegionError(
            f"{len(masks)} {what if len(masks) == 1 else whats} and {_faces(len(bboxes))} in {layout}, but "
            f"{_only(len(held))} of the faces lie in a {what} (covering at least half its box), and count asks for "
            f"{count} persons. {fix} the segmentation find every person: SAM3 Detect gives one mask per prompt "
            f"unless the prompt says how many ('person:{count}' for {count}), keeps only those above its "
            f"threshold (lower it), and needs individual_masks on. Persons are matched by their faces: check them "
            f"with FaceStudio Face Preview.")
    chosen, left_out = choose_faces(bboxes[held], count, layout)
    person_of = {int(held[c]): i for i, c in enumerate(chosen)}
    # Every face held by a segment takes part in the split, persons and faces left out by count alike
    # (those parts then go to nobody), so no region spreads over another face in its segment.
    rank = {f: r for r, f in enumerate(face_order(bboxes))}
    slots = sorted(held.tolist(), key=rank.get)  # left to right: ties to the face further left
    own = np.zeros((len(slots),) + masks.shape[1:], bool)
    shared = np.zeros_like(own)
    sources: list[list[str]] = [[] for _ in range(count)]
    for k, mask in enumerate(masks):
        inside = np.flatnonzero(holds[k]).tolist()
        for f in inside:  # a left-out face's own segment too: it keeps its silhouette from shared ones
            (own if len(inside) == 1 else shared)[slots.index(f)] |= mask
        persons = sorted(person_of[f] for f in inside if f in person_of)
        if not persons:
            notes.append(f"{what} {k} holds no face: dropped (not a person, or one facing away: persons are "
                         f"matched by their faces)." if not inside else
                         f"{what} {k} holds only faces left out by count: dropped.")
            continue
        for p in persons:
            sources[p].append(f"{what} {k}" if len(inside) == 1 else f"part of {what} {k}")
        if len(inside) > 1:  # never whole to one of them: each keeps its face box and the pixels nearer its face
            extra = len(inside) - len(persons)
            held_faces = (f"the faces of persons {_and(persons)}" if len(persons) > 1 else
                          f"the face of person {persons[0]}")
            held_faces += f" and {_faces(extra)} left out by count" if extra else ""
            notes.append(f"{what} {k} holds {held_faces}: split between them by nearest face"
                         + ("; the left-out faces' parts are nobody's" if extra else "")
                         + ". For one mask per person, switch SAM3 Detect's individual_masks on.")
    for p, origin in enumerate(sources):
        whole = [o for o in origin if not o.startswith("part")]
        if len(whole) > 1:
            notes.append(f"{_and(whole)} hold person {p}'s face: merged.")
    outside = [f for f in range(len(bboxes)) if not holds[:, f].any()]
    if outside:
        notes.append(f"{_faces(len(outside))} of the layout image in no {what}: not used (a person the "
                     f"segmentation missed? lower SAM3 Detect's threshold).")
    if left_out:
        notes.append(f"{_faces(len(left_out))} in {whats} not used: count keeps the largest.")
    unused = bboxes[sorted(outside + [int(held[c]) for c in left_out], key=rank.get)]
    by_slot = segment_labels(bboxes[slots, :4], own, shared, size_weighted)
    person = np.array([person_of.get(f, BACKGROUND) for f in slots] + [BACKGROUND], np.int32)
    labels = person[by_slot]  # BACKGROUND (-1) picks the last entry: BACKGROUND
    return Regions(labels_to_masks(labels, count, feather, feather_shape), labels, SEGMENTS, bboxes[held[chosen]],
                   unused, tuple(notes), tuple(", ".join(o) for o in sources))



# ------------------------------------------------------------------------------------------------
# One person's mask
# ------------------------------------------------------------------------------------------------
def region_mask(masks, index: int):
    """Mask `index` of a MASK batch as a batch of one, [1, H, W]: what FaceStudio Person's
    `mask_index` picks from the same batch (a single mask [H, W] counts as a batch of one), for a
    per-person prompt (ConditioningSetMask) or any other node that takes one mask. A copy of the
    input's type and dtype (torch tensor or numpy array), so nothing downstream can change the batch.
    An index outside the batch is a RegionError saying how many masks there are."""
    shape = tuple(getattr(masks, "shape", np.shape(masks)))
    if len(shape) == 2:
        masks, shape = masks[None], (1,) + shape
    if len(shape) != 3:
        raise RegionError(f"expected a MASK batch [N, H, W] (one mask per person, e.g. FaceStudio Regions' "
                          f"masks), got shape {shape}")
    count = shape[0]
    if not count:
        raise RegionError(f"the mask batch is empty (0 masks of {shape[2]}x{shape[1]}), so it has no mask "
                          f"{index}: check the node that makes it (FaceStudio Regions' report, or your segmenter).")
    if int(index) != index or not 0 <= index < count:
        raise RegionError(f"index {index} is out of range: the mask batch has {count} mask"
                          f"{'s' if count != 1 else ''} (index {'0' if count == 1 else f'0 to {count - 1}'}). "
                          f"Set index to one of those, or make more masks (FaceStudio Regions' count).")
    index = int(index)
    picked = masks[index:index + 1]
    return picked.clone() if hasattr(picked, "clone") else np.array(picked, copy=True)


def _faces(n: int) -> str:
    return f"{n} face{'s' if n != 1 else ''}"


def _only(n: int) -> str:
    return "none" if n == 0 else f"only {n}"


def _and(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
