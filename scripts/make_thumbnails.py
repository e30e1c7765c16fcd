"""Writes workflows/<name>.jpg: the thumbnail the host's templates browser shows for each workflow.

A thumbnail says what the workflow takes and does, in pictures a person can read at card size (about
250 px, square): its title, the pictures it loads as the pack's own preview nodes draw them (FaceStudio
Face Preview: the faces found, numbered; FaceStudio Regions' preview: whose region is where), and its
prompt. The previews come from the real server running the pack's nodes on the shipped example photos,
with OpenCV zoo's trained YuNet / SFace face models (tests/facestudio_testing/face_models.real_pack), as
the test suite uses them; the pictures and titles come from workflow_defs, so they follow the workflows.

    .venv/bin/python scripts/make_thumbnails.py [NAME ...]
(COMFYUI_DIR: the host, default .comfyui/ComfyUI.) scripts/update_pictures.sh runs it.
"""
from __future__ import annotations

import io
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from facestudio_testing import face_models, workflow_defs  # noqa: E402
from facestudio_testing.server import ComfyServer, execution_error  # noqa: E402

SIZE = 512
BACKGROUND, INK, MUTED = (24, 26, 30), (240, 240, 240), (170, 176, 186)
ACCENT = {"SD1.5": (63, 120, 158), "SDXL": (161, 48, 155), "FLUX": (46, 125, 80)}


def font(size: int):
    return ImageFont.load_default(size=size)  # Pillow's own scalable font: the same on every machine


def tiles(workflow) -> list[tuple[str, str, str]]:
    """(picture, caption, how to draw it) for each picture the workflow loads, in group order: 'regions'
    where it feeds FaceStudio Regions in a face-based mode, 'faces' where it feeds an identity or SAM3's
    layout, 'plain' otherwise (a style image, a pose skeleton)."""
    prompt, names = workflow.prompt, {v: k for k, v in workflow.graph.nodes.items()}
    titles = {**workflow_defs.DEFAULT_TITLES, **workflow.titles}

    def feeds(node_id: str) -> set[str]:
        seen, todo, types = set(), [node_id], set()
        while todo:
            current = todo.pop()
            for other, node in prompt.items():
                if other not in seen and any(v == [current, 0] for v in node["inputs"].values() if isinstance(v, list)):
                    seen.add(other)
                    types.add(node["class_type"])
                    if node["class_type"] == "ImageScale":
                        todo.append(other)
        return types

    regions_mode = next((n["inputs"]["mode"] for n in prompt.values() if n["class_type"] == "FaceStudioRegions"), None)
    order = [n for group in workflow.groups for n in group.nodes]
    out = []
    for name in order:
        node_id = workflow.graph[name]
        if prompt[node_id]["class_type"] != "LoadImage":
            continue
        downstream = feeds(node_id)
        if "FaceStudioRegions" in downstream and regions_mode != "segments":
            how = "regions"
        elif downstream & {"FaceStudioIdentityEncode", "FaceStudioPuLIDFluxIdentityEncode", "SAM3_Detect",
                            "FaceStudioRegions"}:
            how = "faces"
        else:
            how = "plain"
        out.append((prompt[node_id]["inputs"]["image"], titles.get(names[node_id], name), how))
    return out


def preview_prompt(workflow, pack: str) -> tuple[dict, list[str]]:
    """The API prompt that draws each tile with the pack's preview nodes; the SaveImage prefix of each."""
    prompt = {"analyzer": {"class_type": "FaceStudioFaceAnalyzerLoader",
                           "inputs": {"pack": pack, "provider": "auto", "det_size": 640}}}
    regions = next((n["inputs"] for n in workflow.prompt.values() if n["class_type"] == "FaceStudioRegions"), None)
    prefixes = []
    for i, (picture, _, how) in enumerate(tiles(workflow)):
        prompt[f"load{i}"] = {"class_type": "LoadImage", "inputs": {"image": picture}}
        if how == "regions":
            inputs = {**{k: v for k, v in regions.items() if not isinstance(v, list)},
                      "image": [f"load{i}", 0], "face_analyzer": ["analyzer", 0]}
            prompt[f"draw{i}"] = {"class_type": "FaceStudioRegions", "inputs": inputs}
            drawn = [f"draw{i}", 1]  # its preview
        elif how == "faces":
            prompt[f"draw{i}"] = {"class_type": "FaceStudioFacePreview",
                                  "inputs": {"image": [f"load{i}", 0], "face_analyzer": ["analyzer", 0],
                                             "order": "left-to-right", "mask_opacity": 0.35}}
            drawn = [f"draw{i}", 0]
        else:
            drawn = [f"load{i}", 0]
        prefixes.append(f"facestudio_thumbnail_{i}")
        prompt[f"save{i}"] = {"class_type": "SaveImage", "inputs": {"images": drawn, "filename_prefix": prefixes[-1]}}
    return prompt, prefixes


def fit(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail(box, Image.LANCZOS)
    return image


def compose(workflow, pictures: list[Image.Image]) -> Image.Image:
    canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    accent = ACCENT[workflow.base]
    # A band in the base model's colour with the base's name, then the card's own title (no number).
    # 1.48 draws a "Node graph" badge over the top left corner: only the band goes there.
    draw.rectangle([0, 0, SIZE, 30], fill=accent)
    draw.text((SIZE - 16, 15), workflow.base, font=font(20), fill=INK, anchor="rm")
    draw.text((20, 15), "FaceStudio", font=font(20), fill=INK, anchor="lm")
    y = 76  # under the badge 1.48 draws over a card's top left ("Node graph")
    for line in textwrap.wrap(workflow.name[3:], 24)[:2]:
        draw.text((20, y), line, font=font(38), fill=INK)
        y += 44
    captions = [caption for _, caption, _ in tiles(workflow)]
    count = len(pictures)
    columns = 1 if count == 1 else 2 if count in (2, 4) else 3
    rows = -(-count // columns)
    top, bottom = y + 10, SIZE - 110
    cell_w, cell_h = (SIZE - 20 * (columns + 1)) // columns, (bottom - top) // rows
    for i, (picture, caption) in enumerate(zip(pictures, captions)):
        row, column = divmod(i, columns)
        x0, y0 = 20 + column * (cell_w + 20), top + row * cell_h
        shown = fit(picture, (cell_w, cell_h - 28))
        canvas.paste(shown, (x0 + (cell_w - shown.width) // 2, y0))
        short = textwrap.shorten(caption, 24 if columns > 1 else 40, placeholder="...")
        draw.text((x0 + cell_w // 2, y0 + shown.height + 14), short, font=font(17), fill=MUTED, anchor="mm")
    text = workflow.prompt[workflow.graph["positive"]]["inputs"]["text"]
    lines = textwrap.wrap(f"\u201c{text}\u201d", 40)
    if len(lines) > 2:
        lines = lines[:2]
        lines[1] = lines[1][:37].rstrip(" ,") + "...\u201d"
    y = SIZE - 100
    draw.text((20, y), "prompt", font=font(17), fill=accent)
    for line in lines:
        y += 26
        draw.text((20, y), line, font=font(21), fill=INK)
    return canvas


def main(names: list[str]) -> int:
    workflows = [workflow_defs.WORKFLOWS[n] for n in names] if names else list(workflow_defs.WORKFLOWS.values())
    server = ComfyServer()
    made = {}
    try:
        server.start()
        pack = face_models.real_pack()
        link = server.models / "insightface" / "models" / pack.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(pack)
        for workflow in workflows:
            prompt, prefixes = preview_prompt(workflow, pack.name)
            entry = server.run(prompt, timeout=300)
            if execution_error(entry):
                raise RuntimeError(f"{workflow.name}: {execution_error(entry)}")
            pictures = []
            for i, prefix in enumerate(prefixes):
                image = entry["outputs"][f"save{i}"]["images"][0]
                pictures.append(Image.open(io.BytesIO(server.view(image["filename"], image["subfolder"]))))
            made[ROOT / "workflows" / f"{workflow.name}.jpg"] = compose(workflow, pictures)
            print(f"drew {workflow.name} ({len(pictures)} pictures)")
    finally:
        server.cleanup()
    for path, image in made.items():
        image.save(path, "JPEG", quality=88)
    print(f"wrote {len(made)} thumbnails in workflows/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
