"""PuLID's face image for EVA-CLIP: the centre face aligned to 512 px, parsed, its background made white.

PuLID (pulid/pipeline_flux.py get_id_embedding) takes facexlib's FaceRestoreHelper for this:
RetinaFace ResNet50 (`detection_Resnet50_Final.pth`) finds faces and five landmarks
(score > 0.97, NMS 0.4, at the photo's own size), the face nearest the photo's centre is aligned
to FFHQ's 512-px five-point template (`cv2.estimateAffinePartial2D`, LMEDS; grey border), BiSeNet
(`parsing_bisenet.pth`, 19 labels) parses it, and labels 0, 7, 8, 9, 14, 15, 16, 18 (background,
ears, earring, neck, necklace, cloth, hair) become white while every other pixel becomes the grey
level of the face (0.299 R + 0.587 G + 0.114 B); the result is resized to 336 px (bicubic).

facexlib itself is not used: importing any part of it runs its package __init__, which imports its
tracker's numba and filterpy (with matplotlib), it declares `opencv-python` (which would clobber the
`opencv-python-headless` the host has), its loaders download weights at run time, and its NMS is
torchvision's compiled op, which CPU-only torch installs with a CUDA torchvision lack. The two
networks are small and fixed, so they are written here with facexlib's parameter names (its files
load strictly) and checked against facexlib's own modules in tests/test_pulid_identity.py. The
ResNet trunks are torchvision's (same names and maths as facexlib's).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .faces import FaceModelError, FaceNotFound

__all__ = ["RetinaFaceResNet50", "BiSeNet", "FaceParser", "load_face_parser", "ParsedFace", "detect_faces",
           "centre_face", "align_face", "parse_face", "to_eva_size", "face_features_image", "WHITE_LABELS",
           "FFHQ_TEMPLATE_512"]

DETECTOR_FILE = "detection_Resnet50_Final.pth"
PARSER_FILE = "parsing_bisenet.pth"
DETECTOR_URL = "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"
PARSER_URL = "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth"

# RetinaFace (Resnet50 config of facexlib / Pytorch_Retinaface)
_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
_STEPS = (8, 16, 32)
_VARIANCE = (0.1, 0.2)
_BGR_MEAN = (104.0, 117.0, 123.0)
DETECTION_THRESHOLD = 0.97  # what FaceRestoreHelper.get_face_landmarks_5 asks for
NMS_THRESHOLD = 0.4
# FFHQ's five points (eyes, nose, mouth corners) at 512 px, FaceRestoreHelper's `face_template`.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]])  # float64, as facexlib's
ALIGNED_SIZE = 512
BORDER_RGB = (132, 133, 135)  # FaceRestoreHelper's warp border, (135, 133, 132) in its BGR
# BiSeNet's labels PuLID paints white: background, ears (7, 8), earring, neck, necklace, cloth, hair.
WHITE_LABELS = (0, 7, 8, 9, 14, 15, 16, 18)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
EVA_SIZE = 336


# --- RetinaFace ResNet50 ---------------------------------------------------------------------------

def _conv_bn(cin: int, cout: int, kernel: int, relu: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)  # keys .0 conv, .1 bn


class _SSH(nn.Module):
    """Context module: a 3x3 branch and two stacked branches that act as 5x5 and 7x7, concatenated."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3X3 = _conv_bn(channels, channels // 2, 3, relu=False)
        self.conv5X5_1 = _conv_bn(channels, channels // 4, 3, relu=True)
        self.conv5X5_2 = _conv_bn(channels // 4, channels // 4, 3, relu=False)
        self.conv7X7_2 = _conv_bn(channels // 4, channels // 4, 3, relu=True)
        self.conv7x7_3 = _conv_bn(channels // 4, channels // 4, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], dim=1))


class _Head(nn.Module):
    """A 1x1 conv giving `width` numbers per anchor, rows in (row, column, anchor) order."""

    def __init__(self, channels: int, width: int, anchors: int = 2):
        super().__init__()
        self.width = width
        self.conv1x1 = nn.Conv2d(channels, anchors * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.width)


def _trunk(resnet: nn.Module) -> nn.Sequential:
    """A torchvision ResNet without its classifier (avgpool, fc), its stages' names kept (conv1 ... layer4)."""
    return nn.Sequential(OrderedDict((n, m) for n, m in resnet.named_children() if n not in ("avgpool", "fc")))


class RetinaFaceResNet50(nn.Module):
    """forward(BGR - mean, [1, 3, H, W]) -> (boxes [1, N, 4], scores [1, N, 2] softmaxed, landmarks [1, N, 10])."""

    def __init__(self):
        super().__init__()
        import torchvision

        trunk = torchvision.models.resnet50(weights=None)
        self.body = _trunk(trunk)
        channels = 256
        self.fpn = nn.Module()
        for i, cin in enumerate((512, 1024, 2048), start=1):
            setattr(self.fpn, f"output{i}", _conv_bn(cin, channels, 1, relu=True))
        self.fpn.merge1 = _conv_bn(channels, channels, 3, relu=True)
        self.fpn.merge2 = _conv_bn(channels, channels, 3, relu=True)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(channels), _SSH(channels), _SSH(channels)
        self.ClassHead = nn.ModuleList(_Head(channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(channels, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stages = []
        for name, module in self.body.named_children():
            x = module(x)
            if name in ("layer2", "layer3", "layer4"):
                stages.append(x)
        o1, o2, o3 = (getattr(self.fpn, f"output{i}")(s) for i, s in enumerate(stages, start=1))
        o2 = self.fpn.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.fpn.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        features = [self.ssh1(o1), self.ssh2(o2), self.ssh3(o3)]
        boxes = torch.cat([h(f) for h, f in zip(self.BboxHead, features)], dim=1)
        scores = torch.cat([h(f) for h, f in zip(self.ClassHead, features)], dim=1).softmax(dim=-1)
        landmarks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, features)], dim=1)
        return boxes, scores, landmarks


def _priors(height: int, width: int) -> torch.Tensor:
    """[N, 4] anchors (cx, cy, w, h) relative to the image, in the heads' row order."""
    rows = []
    for step, sizes in zip(_STEPS, _MIN_SIZES):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy, cx = torch.meshgrid((torch.arange(fh) + 0.5) * step / height, (torch.arange(fw) + 0.5) * step / width,
                                indexing="ij")
        for_sizes = [torch.stack([cx, cy, torch.full_like(cx, s / width), torch.full_like(cy, s / height)], dim=-1)
                     for s in sizes]
        rows.append(torch.stack(for_sizes, dim=2).reshape(-1, 4))  # (row, column, anchor)
    return torch.cat(rows)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS, highest score first, IoU without the +1 pixel (torchvision.ops.nms's rule)."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return np.asarray(keep, np.int64)


@torch.no_grad()
def detect_faces(detector: RetinaFaceResNet50, rgb: np.ndarray, threshold: float = DETECTION_THRESHOLD
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes [F, 4] x1 y1 x2 y2, scores [F], landmarks [F, 5, 2]) in the photo's pixels, best first."""
    p = next(detector.parameters())
    h, w = rgb.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1], dtype=np.float32)).to(p.device)
    x = (x - torch.tensor(_BGR_MEAN, device=p.device)).permute(2, 0, 1)[None].to(p.dtype)
    loc, conf, landm = (t[0].float() for t in detector(x))
    priors = _priors(h, w).to(loc.device)
    var0, var1 = _VARIANCE
    centres = priors[:, :2] + loc[:, :2] * var0 * priors[:, 2:]
    sizes = priors[:, 2:] * torch.exp(loc[:, 2:] * var1)
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1) * torch.tensor([w, h, w, h], device=loc.device)
    points = priors[:, None, :2] + landm.reshape(-1, 5, 2) * var0 * priors[:, None, 2:]
    points = points * torch.tensor([w, h], device=loc.device)
    scores = conf[:, 1]
    chosen = scores > threshold
    boxes, scores, points = (t[chosen].cpu().numpy() for t in (boxes, scores, points))
    keep = _nms(boxes, scores, NMS_THRESHOLD)
    return boxes[keep], scores[keep], points[keep]


def centre_face(boxes: np.ndarray, height: int, width: int) -> int:
    """The index of the box whose centre is nearest the photo's (FaceRestoreHelper's only_center_face)."""
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    return int(np.argmin(np.linalg.norm(centres - np.array([width / 2, height / 2]), axis=1)))


def align_face(rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """The 512-px face (uint8 RGB) with its five landmarks moved onto FFHQ's template: a similarity
    transform fitted by least median of squares, as FaceRestoreHelper.align_warp_face does."""
    import cv2

    matrix = cv2.estimateAffinePartial2D(np.asarray(landmarks, np.float64).reshape(5, 2),
                                         FFHQ_TEMPLATE_512.astype(np.float64), method=cv2.LMEDS)[0]
    if matrix is None:
        raise FaceNotFound("the face's five landmarks do not fit a similarity transform (degenerate points)", 0)
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (ALIGNED_SIZE, ALIGNED_SIZE),
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_RGB)


# --- BiSeNet ---------------------------------------------------------------------------------------

def _global_average(x: torch.Tensor) -> torch.Tensor:
    # avg_pool2d over the whole map, as BiSeNet was written: Tensor.mean sums in another order, and the
    # 1e-4 differences in the logits it gave flipped the argmax at a few near-tied pixels.
    return F.avg_pool2d(x, x.shape[2:])


class _ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class _AttentionRefinement(nn.Module):
    """Features re-weighted per channel by a sigmoid of their global average."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_average(feat))))


class _Output(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """forward(ImageNet-normalized RGB [B, 3, H, W]) -> logits [B, 19, H, W] (the main output; the two
    auxiliary heads of training, conv_out16/conv_out32, are loaded but not run)."""

    def __init__(self, classes: int = 19):
        super().__init__()
        import torchvision

        trunk = torchvision.models.resnet18(weights=None)
        self.cp = nn.Module()
        self.cp.resnet = _trunk(trunk)
        self.cp.arm16 = _AttentionRefinement(256, 128)
        self.cp.arm32 = _AttentionRefinement(512, 128)
        self.cp.conv_head32 = _ConvBNReLU(128, 128)
        self.cp.conv_head16 = _ConvBNReLU(128, 128)
        self.cp.conv_avg = _ConvBNReLU(512, 128, kernel=1)
        self.ffm = nn.Module()
        self.ffm.convblk = _ConvBNReLU(256, 256, kernel=1)
        self.ffm.conv1 = nn.Conv2d(256, 64, 1, bias=False)
        self.ffm.conv2 = nn.Conv2d(64, 256, 1, bias=False)
        self.conv_out = _Output(256, 256, classes)
        self.conv_out16 = _Output(128, 64, classes)
        self.conv_out32 = _Output(128, 64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cp, size = self.cp, x.shape[2:]
        feats = []
        for name, module in cp.resnet.named_children():
            x = module(x)
            if name in ("layer2", "layer3", "layer4"):
                feats.append(x)
        feat8, feat16, feat32 = feats
        avg = cp.conv_avg(_global_average(feat32))
        sum32 = cp.arm32(feat32) + F.interpolate(avg, size=feat32.shape[2:], mode="nearest")
        up32 = cp.conv_head32(F.interpolate(sum32, size=feat16.shape[2:], mode="nearest"))
        up16 = cp.conv_head16(F.interpolate(cp.arm16(feat16) + up32, size=feat8.shape[2:], mode="nearest"))
        fused = self.ffm.convblk(torch.cat([feat8, up16], dim=1))
        attention = torch.sigmoid(self.ffm.conv2(F.relu(self.ffm.conv1(_global_average(fused)))))
        fused = fused * attention + fused
        return F.interpolate(self.conv_out(fused), size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def parse_face(parser: BiSeNet, aligned: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [1, 1, 512, 512] int64, the white-background grey face [1, 3, 512, 512] in 0..1)."""
    p = next(parser.parameters())
    x = torch.from_numpy(np.ascontiguousarray(aligned)).to(p.device).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor(_IMAGENET_MEAN, device=p.device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=p.device).view(1, 3, 1, 1)
    labels = parser(((x - mean) / std).to(p.dtype)).argmax(dim=1, keepdim=True)
    white = torch.isin(labels, torch.tensor(WHITE_LABELS, device=labels.device))
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand(-1, 3, -1, -1)
    return labels, torch.where(white, torch.ones_like(x), grey)


def to_eva_size(features: torch.Tensor) -> torch.Tensor:
    """The 512-px face image [B, 3, 512, 512] at EVA-CLIP's 336 px: bicubic with antialiasing, which is
    torchvision's `resize(..., BICUBIC)` on a tensor (the reference's call), no clamping."""
    return F.interpolate(features, size=(EVA_SIZE, EVA_SIZE), mode="bicubic", align_corners=False, antialias=True)


# --- files and the whole recipe --------------------------------------------------------------------

def _load(module: nn.Module, path: Path, what: str, url: str) -> nn.Module:
    if not path.is_file():
        raise FaceModelError(f"{path} does not exist: PuLID needs facexlib's {what} there. Download {url}.")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise FaceModelError(f"{path} is not a torch file that loads weights-only ({type(e).__name__}: "
                             f"{str(e)[:200]}); PuLID needs facexlib's {what}: {url}") from e
    if not isinstance(sd, dict):
        raise FaceModelError(f"{path} holds a {type(sd).__name__}, not facexlib's {what} state dict: {url}")
    sd = {str(k).removeprefix("module."): v for k, v in sd.items()}  # the Pytorch_Retinaface DataParallel copy
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise FaceModelError(f"{path} is not facexlib's {what} ({' '.join(str(e).split())[:300]}). Download "
                             f"{url}.") from None
    return module.eval().requires_grad_(False)


@dataclass(eq=False)
class FaceParser:
    """facexlib's RetinaFace ResNet50 detector and BiSeNet face parser, loaded from local files."""

    detector: RetinaFaceResNet50
    parser: BiSeNet


def load_face_parser(detector_path: str | Path, parser_path: str | Path,
                     device: torch.device | str = "cpu") -> FaceParser:
    """Load `detection_Resnet50_Final.pth` and `parsing_bisenet.pth` (nothing is downloaded)."""
    with torch.device("meta"):  # random initialisation of values the files replace: skip it
        detector, parser = RetinaFaceResNet50(), BiSeNet()
    detector, parser = detector.to_empty(device=device), parser.to_empty(device=device)
    return FaceParser(_load(detector, Path(detector_path), f"face detector ({DETECTOR_FILE})", DETECTOR_URL),
                      _load(parser, Path(parser_path), f"face parser ({PARSER_FILE})", PARSER_URL))


@dataclass(frozen=True, eq=False)
class ParsedFace:
    image: torch.Tensor  # [1, 3, 336, 336] in 0..1: EVA-CLIP's input (before its normalization)
    aligned: np.ndarray  # [512, 512, 3] uint8 RGB: the aligned face (PuLID's ArcFace fallback crop)
    labels: torch.Tensor  # [1, 1, 512, 512] BiSeNet labels of `aligned`
    box: np.ndarray  # [4] x1 y1 x2 y2 in the photo's pixels
    landmarks: np.ndarray  # [5, 2]
    score: float


def face_features_image(models: FaceParser, rgb: np.ndarray, image_index: int = 0) -> ParsedFace:
    """PuLID's EVA-CLIP input from an RGB uint8 photo [H, W, 3]; FaceNotFound when no face scores above 0.97."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an RGB photo [H, W, 3], got shape {list(rgb.shape)}")
    rgb = np.ascontiguousarray(rgb[..., :3])
    boxes, scores, points = detect_faces(models.detector, rgb)
    if len(boxes) == 0:
        raise FaceNotFound(f"PuLID's face detector (RetinaFace) found no face scoring above {DETECTION_THRESHOLD} in "
                           f"photo {image_index} ({rgb.shape[1]}x{rgb.shape[0]}): use a photo where one face is "
                           "clearly visible, frontal and not tiny.", image_index)
    i = centre_face(boxes, *rgb.shape[:2])
    aligned = align_face(rgb, points[i])
    labels, features = parse_face(models.parser, aligned)
    return ParsedFace(to_eva_size(features), aligned, labels, boxes[i], points[i], float(scores[i]))
