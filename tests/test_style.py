"""encoders/style.py and FaceStudio Encode Style, on a tiny seeded CLIP vision model built by the host's own class."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facestudio_testing import face_models as fm

pytestmark = pytest.mark.filterwarnings("ignore:.*estimate.*deprecated:FutureWarning")


@pytest.fixture(scope="module")
def style(booted):
    return booted.pack_module("encoders.style")


@pytest.fixture(scope="module")
def tiny(booted):
    return booted.pack_module("encoders.faces").load_face_analyzer(fm.tiny_pack(), providers="cpu")


def photo(cells=((6, 6, "white"),)):
    return torch.from_numpy(fm.tiny_face_image(cells).astype(np.float32) / 255.0)[None]


def test_encode_style_gives_the_host_encoders_outputs(style, tiny_clip):
    image = torch.rand(2, 200, 300, 3, generator=torch.Generator().manual_seed(1))
    encoded = style.encode_style(tiny_clip, image)
    direct = tiny_clip.encode_image(image, crop=True)
    assert encoded.image_embeds.shape == (2, 16) and encoded.penultimate_hidden_states.shape == (2, 50, 32)
    assert encoded.clip_width == 32 and encoded.batch_size == 2 and encoded.masked_faces == (0, 0)
    torch.testing.assert_close(encoded.image_embeds, direct["image_embeds"].float())
    torch.testing.assert_close(encoded.penultimate_hidden_states, direct["penultimate_hidden_states"].float())
    with pytest.raises(style.StyleError, match="CLIP vision model"):
        style.encode_style(object(), image)
    with pytest.raises(style.StyleError, match="IMAGE batch"):
        style.encode_style(tiny_clip, image[0])


def test_faces_are_painted_out_before_encoding(style, tiny_clip, tiny):
    image = photo()
    before = image.clone()
    boxes = style.face_boxes(tiny, image)
    assert [len(b) for b in boxes] == [1]
    masked = style.mask_boxes(image, boxes, margin=0.0)
    torch.testing.assert_close(image, before)  # the input is untouched
    x1, y1, x2, y2 = boxes[0][0]
    inside = masked[0, int(np.ceil(y1)):int(y2), int(np.ceil(x1)):int(x2)]
    assert torch.all(inside == style.MASK_VALUE)
    assert torch.equal(masked[0, :int(y1) - 1], image[0, :int(y1) - 1])  # rows above the face unchanged
    plain = style.encode_style(tiny_clip, image)
    without_face = style.encode_style(tiny_clip, image, analyzer=tiny)
    assert without_face.masked_faces == (1,)
    assert not torch.allclose(plain.image_embeds, without_face.image_embeds)
    # A faceless image is encoded unchanged.
    black = torch.zeros(1, 64, 64, 3)
    assert style.encode_style(tiny_clip, black, analyzer=tiny).masked_faces == (0,)


def test_node(comfy_host, tiny_clip, tiny, style):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["FaceStudioStyleEncode"]
    info = cls.GET_NODE_INFO_V1()
    assert info["category"] == "FaceStudio/style" and info["output"] == ["FACESTUDIO_STYLE"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert inputs["clip_vision"][0] == "CLIP_VISION" and all(spec[1].get("tooltip") for spec in inputs.values())
    out = cls.execute(image=photo(), clip_vision=tiny_clip, mask_margin=0.25, face_analyzer=tiny).result[0]
    assert isinstance(out, style.StyleEncoding) and out.masked_faces == (1,)
