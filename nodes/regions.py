"""FaceStudio Regions: one region mask per person, from a layout image's faces, segment masks or a split;
FaceStudio Region Mask: one person's mask of such a batch; FaceStudio Region Prompt: a person's own prompt in
their region, in one node."""
import dataclasses
import logging

from comfy_api.latest import io, ui

from ..encoders.regions import (FACE_MODES, FEATHER_SHAPES, GROW_DOWN, GROW_UP, GROW_WIDTH, MODES, SEGMENTS,
                                GrowShape, RegionError, face_regions, region_mask, segment_regions,
                                split_regions)
from ..encoders.region_prompts import region_prompt
from ..inspection.drawing import draw_regions
from .types import FaceStudioFaceAnalyzer

logger = logging.getLogger("FaceStudio.regions")


def _boxes_input() -> list:
    """The boxes socket, where the host has the BOUNDING_BOX type (ComfyUI 0.33 on; 0.3.64 has none)."""
    if not hasattr(io, "BoundingBox"):
        return []
    return [io.BoundingBox.Input("boxes", optional=True, force_input=True,
                                 tooltip="segments, without segments connected: person boxes (SAM3 Detect's or "
                                         "RT-DETR's bboxes) in the layout image's pixels, each used as a filled "
                                         "rectangle. Matched to faces and numbered as segments are.")]


class FaceStudioRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioRegions",
            display_name="FaceStudio Regions",
            category="FaceStudio/faces",
            description="Makes one region mask per person (a MASK batch: mask i for person i, the mask_index of "
                        "FaceStudio Person) from the faces of a layout image, numbered left to right as Encode "
                        "Identity's index and Face Preview count them, from a segmentation model's masks "
                        "(SAM3 Detect: silhouettes) matched to those faces, or from a columns / rows / grid "
                        "split; a preview of the regions in each person's colour, and a report.",
            inputs=[
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip="grow: each face box grown to the person's head and upper body (needs the "
                                       "image and a face analyzer). partition: every pixel to the nearest face, so "
                                       "the regions cover the image without overlapping (same needs). segments: "
                                       "each person's silhouette from the segments masks (SAM3 Detect, "
                                       "individual_masks on), matched to the faces (same needs). columns / "
                                       "rows / grid: an even split, no faces needed. No two regions overlap, and "
                                       "in the face modes no region covers another person's face."),
                io.Int.Input("count", default=2, min=1, max=32,
                             tooltip="How many persons (masks). With faces: fewer faces (in segments mode: "
                                     "faces in a segment) than this is an error; with more, the largest faces "
                                     "are taken (then numbered left to right)."),
                io.Image.Input("image", optional=True,
                               tooltip="The layout image (one image): its faces place the regions (grow, "
                                       "partition, segments) and its size is the masks' size (all modes)."),
                FaceStudioFaceAnalyzer.Input("face_analyzer", optional=True,
                                             tooltip="From FaceStudio Load Face Analyzer; needed by grow, "
                                                     "partition and segments. Use the one your Encode Identity "
                                                     "nodes use."),
                io.Int.Input("width", default=512, min=8, max=16384, step=8,
                             tooltip="The masks' width for a split without an image (ignored when an image is "
                                     "connected). Any size works: FaceStudio Apply resizes masks to the latent."),
                io.Int.Input("height", default=512, min=8, max=16384, step=8,
                             tooltip="The masks' height for a split without an image (ignored when an image is "
                                     "connected)."),
                io.Int.Input("feather", default=0, min=0, max=512,
                             tooltip="Soft borders: the width in pixels over which a region fades into its "
                                     "neighbour on each side of the border (0: hard). Masks still sum to at "
                                     "most 1 at every pixel."),
                io.Combo.Input("feather_shape", options=list(FEATHER_SHAPES), default=FEATHER_SHAPES[0],
                               tooltip="gaussian: a smooth S-shaped fade; linear: a straight ramp across a "
                                       "straight border."),
                io.Float.Input("grow_width", default=GROW_WIDTH, min=1.0, max=12.0, step=0.1,
                               tooltip="grow: the region's width in face-box widths, centred on the face "
                                       "(3: about the shoulders)."),
                io.Float.Input("grow_up", default=GROW_UP, min=0.0, max=5.0, step=0.1,
                               tooltip="grow: how far the region reaches above the face box, in face-box heights "
                                       "(0.5: the top of the head and hair)."),
                io.Float.Input("grow_down", default=GROW_DOWN, min=0.0, max=20.0, step=0.1,
                               tooltip="grow: how far the region reaches below the face box, in face-box heights "
                                       "(3: about the waist; 7 or more for a standing full figure)."),
                io.Boolean.Input("size_weighted", default=False,
                                 tooltip="grow, partition, segments: measure the distance to each face in units "
                                         "of its size, so a larger (nearer) face claims more of the space between "
                                         "two faces (or of two overlapping segments). Off: plain nearest face "
                                         "centre (straight borders)."),
                io.Int.Input("grid_columns", default=0, min=0, max=32,
                             tooltip="grid: regions per row (0: automatic, the square root of count rounded up). "
                                     "Regions go row by row, left to right; a shorter last row shares the width."),
                # Sockets only, after every widget: saved workflows keep their widget values in order.
                io.Mask.Input("segments", optional=True,
                              tooltip="segments: a MASK batch, one mask per person, at the layout image's size "
                                      "(SAM3 Detect's masks with individual_masks on, prompt e.g. 'person:2' for "
                                      "two). Any order: each is matched to the face it holds. A mask without a "
                                      "face is dropped, one holding several faces is split by nearest face; the "
                                      "report says so."),
                *_boxes_input(),
            ],
            outputs=[
                io.Mask.Output(display_name="masks", tooltip="A MASK batch [count, H, W]: mask i for person i "
                                                             "(FaceStudio Person's mask_index), values in 0..1."),
                io.Image.Output(display_name="preview", tooltip="The regions tinted in each person's colour and "
                                                                "labelled, over the layout image (grey without "
                                                                "one); face boxes labelled by number."),
                io.String.Output(display_name="report", tooltip="What was made: each mask's face (and segment), "
                                                                "and warnings: segments dropped or split, faces "
                                                                "not used."),
            ],
            is_output_node=True,  # shows its preview when queued on its own, as Face Preview does
        )

    @classmethod
    def execute(cls, mode: str, count: int, width: int, height: int, feather: int, feather_shape: str,
                grow_width: float, grow_up: float, grow_down: float, size_weighted: bool, grid_columns: int,
                image=None, face_analyzer=None, segments=None, boxes=None) -> io.NodeOutput:
        import torch

        if mode in FACE_MODES + (SEGMENTS,):
            if image is None or face_analyzer is None:
                missing = " and ".join(n for n, v in (("a layout image", image), ("a face analyzer", face_analyzer))
                                       if v is None)
                raise RegionError(f"mode {mode!r} places the regions by the faces of a layout image: connect "
                                  f"{missing} (FaceStudio Load Face Analyzer), or choose columns, rows or grid.")
        if mode == SEGMENTS:
            regions = segment_regions(face_analyzer, image, count, segments, boxes, size_weighted=size_weighted,
                                      feather=feather, feather_shape=feather_shape)
        elif mode in FACE_MODES:
            regions = face_regions(face_analyzer, image, count, mode,
                                   grow=GrowShape(grow_width, grow_up, grow_down), size_weighted=size_weighted,
                                   feather=feather, feather_shape=feather_shape)
        else:
            if image is not None:  # any batch: only its size is used
                height, width = int(image.shape[-3]), int(image.shape[-2])
            regions = split_regions(mode, count, height, width, columns=grid_columns, feather=feather,
                                    feather_shape=feather_shape)
        if mode != SEGMENTS and (segments is not None or boxes is not None):
            regions = dataclasses.replace(regions, notes=regions.notes + (
                f"segments / boxes not used in mode {mode!r}: choose segments to use them.",))
        report = regions.report()
        logger.info("%s", report.split("\n")[0])
        for note in regions.notes:
            logger.warning("FaceStudio Regions: %s", note)
        layout = None if image is None else image[0] if image.ndim == 4 else image
        preview = torch.from_numpy(draw_regions(regions, layout))[None]
        return io.NodeOutput(torch.from_numpy(regions.masks), preview, report, ui=ui.PreviewImage(preview, cls=cls))


class FaceStudioRegionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioRegionMask",
            display_name="FaceStudio Region Mask",
            category="FaceStudio/faces",
            description="One person's region: mask i of a MASK batch (FaceStudio Regions' masks), the mask "
                        "FaceStudio Person's mask_index i picks, as a single MASK for a per-person prompt "
                        "(ConditioningSetMask) or any node that takes one mask.",
            inputs=[
                io.Mask.Input("masks", tooltip="A MASK batch, one mask per person: FaceStudio Regions' masks "
                                               "(or a segmenter's)."),
                io.Int.Input("index", default=0, min=0, max=63,
                             tooltip="Which mask of the batch: the person's number, as FaceStudio Person's "
                                     "mask_index counts it (0 = the first; in Regions' face modes, the "
                                     "leftmost person)."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="Mask index of the batch, one mask [1, H, W] at "
                                                            "the batch's size, values unchanged."),
            ],
        )

    @classmethod
    def execute(cls, masks, index: int) -> io.NodeOutput:
        return io.NodeOutput(region_mask(masks, index))


class FaceStudioRegionPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioRegionPrompt",
            display_name="FaceStudio Region Prompt",
            category="FaceStudio/faces",
            description="A person's own prompt inside their region: the text encoded with CLIP and limited to mask "
                        "mask_index of a MASK batch (FaceStudio Regions' masks), added to the conditioning "
                        "connected (the whole-image prompt, or the previous person's Region Prompt). The same "
                        "as CLIP Text Encode -> ConditioningSetMask -> ConditioningCombine, in one node.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP the text is encoded with: the checkpoint's."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="What this person looks like or wears: only the image inside their "
                                        "region follows it."),
                io.Mask.Input("masks", tooltip="A MASK batch, one mask per person: FaceStudio Regions' masks "
                                               "(or a segmenter's), the batch FaceStudio Person's mask takes."),
                io.Int.Input("mask_index", default=0, min=0, max=63,
                             tooltip="Whose region: the person's number, as FaceStudio Person's mask_index "
                                     "counts it (0 = the first; in Regions' face modes, the leftmost person)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="How strongly the region follows this prompt (ConditioningSetMask's "
                                       "strength)."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The prompt this one is added to: the whole-image prompt for the "
                                              "first person, the previous Region Prompt for the next. Without it, "
                                              "the output is this region's prompt alone."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="The connected conditioning plus this person's prompt in their "
                                               "region: into the sampler's positive, or the next Region Prompt."),
            ],
        )

    @classmethod
    def execute(cls, clip, text: str, masks, mask_index: int, strength: float, conditioning=None) -> io.NodeOutput:
        if clip is None:  # a checkpoint without a text encoder gives None here, as CLIP Text Encode says
            raise RegionError("clip is None: the checkpoint connected has no text encoder; load one (Load CLIP) "
                              "and connect its CLIP.")
        encoded = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return io.NodeOutput(region_prompt(encoded, masks, mask_index, strength, conditioning))
