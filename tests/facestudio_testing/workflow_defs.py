"""The bundled workflows (workflows/*.json), defined once as API-format prompts with their layout.

Each definition is the prompt POST /prompt takes (node ids, class types, every widget value) plus
what the UI-format file adds on top: node titles, groups (a title, a colour and the named nodes they
frame, laid out as columns left to right) and one note per group saying what that step does.
`scripts/make_workflows.py` loads each prompt in the host's own frontend (app.loadApiJson), places
the nodes, groups and notes, and saves the frontend's serialization (app.graph.serialize()); so the
UI files' widget order is the frontend's by construction.
`tests/test_workflows.py` checks that the frontend's own graph-to-prompt conversion of each stored
file equals `Workflow.prompt` (saving a screenshot of each: the thumbnails, see
scripts/update_pictures.sh), then runs that prompt on small models saved under the file names below.

Model file names are the public releases' names, so a user who has them runs a workflow unchanged.
Most workflows are on SD1.5; the one-person and the two-people (regions) workflows also come on SDXL
(`base="SDXL"`, at SDXL's sizes), with the SDXL releases' file names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .graphs import Graph

# --- the public file names the workflows use ----------------------------------------------------
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
FACEID_PLUS_V2 = "ip-adapter-faceid-plusv2_sd15.bin"
STYLE_ADAPTER = "ip-adapter-plus_sd15.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
FACE_PACK = "buffalo_l"
CONTROLNET_POSE = "control_v11p_sd15_openpose.pth"
STYLE_LORA = "add_detail.safetensors"  # any SD1.5 LoRA: this popular one is an example
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
FACEID_PLUS_V2_SDXL = "ip-adapter-faceid-plusv2_sdxl.bin"
FACEID_PLUS_V2_SDXL_LORA = "ip-adapter-faceid-plusv2_sdxl_lora.safetensors"  # found by Apply in models/loras
SAM3_CHECKPOINT = "sam3.1_multiplex_fp16.safetensors"  # Comfy-Org/sam3.1, as the host's SAM3 blueprints load it
# FLUX.1 dev as ComfyUI's own FLUX examples load it (diffusion model, the two text encoders, the VAE), and
# PuLID-FLUX with what its identity needs (antelopev2, EVA-CLIP; facexlib's two files are the Loader's own).
FLUX_UNET = "flux1-dev.safetensors"
FLUX_T5 = "t5xxl_fp16.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_VAE = "ae.safetensors"
PULID_FLUX = "pulid_flux_v0.9.1.safetensors"
EVA_CLIP = "EVA02_CLIP_L_336_psz14_s6B.pt"
FLUX_FACE_PACK = "antelopev2"
# Pictures the workflows load from ComfyUI's input folder: the pack's example_photos/, which it copies
# there when the host loads it (startup/example_photos.py); the user picks their own.
PHOTO, PHOTO_2, PHOTO_3 = "facestudio_person.jpg", "facestudio_person_2.jpg", "facestudio_person_3.jpg"
OTHER_PHOTO = "facestudio_other_person.jpg"
LAYOUT = "facestudio_two_people_layout.jpg"
STYLE_IMAGE = "facestudio_style.jpg"
POSE = "facestudio_pose.png"
SCENE = "facestudio_scene.jpg"

# Display-only widgets: frontend 1.27 queues Preview Any's text box (empty) with the prompt, 1.48 does
# not, and the host ignores it either way; prompt comparisons leave them out.
DISPLAY_ONLY_WIDGETS = {("PreviewAny", "preview")}

# Group colours (LiteGraph's palette): one per kind of step, the same in every workflow.
COLORS = {"models": "#3f789e", "faces": "#8A8", "style": "#a1309b", "prompt": "#b58b2a", "sample": "#b06634",
          "check": "#88A"}


# The view each workflow file opens at (its `extra.ds`): the overview note and the first steps at the top
# left, well above the frontends' low-detail threshold (text under 8 px on screen: below about scale 0.6
# for the 14-px font). 1.27 restores it whenever it loads a file; 1.48 when a file is opened, but it Fit-
# Views every template it opens, which is why the layout is one compact block (see frontend.ARRANGE_JS).
VIEW = {"scale": 0.8, "offset": [100, 130]}

DEFAULT_TITLES = {"positive": "Prompt (whole image)", "negative": "Negative prompt",
                  "adapter": "FaceID adapter (FaceID Plus v2)", "clip_vision": "CLIP vision (ViT-H)"}


@dataclass
class Group:
    title: str
    color: str
    nodes: list[str]  # named nodes, top to bottom
    note: str         # the Note shown at the top of the group


@dataclass
class Workflow:
    name: str          # workflows/<name>.json and .jpg
    title: str
    description: str   # the overview note
    graph: Graph
    groups: list[Group] = field(default_factory=list)
    titles: dict[str, str] = field(default_factory=dict)  # named node -> title shown
    base: str = "SD1.5"  # "SD1.5", "SDXL" or "FLUX": the model and adapters it is made for
    # Host node types it needs beyond the core's and the pack's (e.g. SAM3_Detect, ComfyUI 0.33 on): the
    # tests skip it on hosts without them, and do not run it on the tiny test models (no weights for those).
    requires: tuple[str, ...] = ()
    # One line on what it makes: the first line of the overview note (the templates browser shows only the
    # file name, so this is where a user reads it).
    summary: str = ""

    @property
    def prompt(self) -> dict:
        return self.graph.prompt

    def layout(self) -> dict:
        """What the frontend page needs to place everything (node ids instead of names)."""
        ids = self.graph.nodes
        named = {n for group in self.groups for n in group.nodes}
        missing = sorted(set(ids) - named)
        if missing:
            raise ValueError(f"{self.name}: nodes in no group: {missing}")
        return {
            "name": self.name, "title": self.title, "description": f"{self.summary}\n\n{self.description}",
            "groups": [{"title": g.title, "color": g.color, "note": g.note, "nodes": [ids[n] for n in g.nodes]}
                       for g in self.groups],
            "titles": {ids[n]: t for n, t in {**DEFAULT_TITLES, **self.titles}.items() if n in ids},
        }


# --- building blocks ----------------------------------------------------------------------------
def _base(positive: str, negative: str = "blurry, lowres, deformed, watermark", width: int = 512,
          height: int = 512, seed: int = 42, steps: int = 30, cfg: float = 6.0, denoise: float = 1.0,
          prefix: str = "FaceStudio", checkpoint: str = CHECKPOINT) -> Graph:
    g = Graph()
    g.add("CheckpointLoaderSimple", {"ckpt_name": checkpoint}, "checkpoint")
    g.add("CLIPTextEncode", {"text": positive, "clip": g.link("checkpoint", 1)}, "positive")
    g.add("CLIPTextEncode", {"text": negative, "clip": g.link("checkpoint", 1)}, "negative")
    g.add("EmptyLatentImage", {"width": width, "height": height, "batch_size": 1}, "latent")
    g.add("KSampler", {"model": g.link("checkpoint", 0), "positive": g.link("positive"),
                       "negative": g.link("negative"), "latent_image": g.link("latent"), "seed": seed,
                       "steps": steps, "cfg": cfg, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                       "denoise": denoise}, "sampler")
    g.add("VAEDecode", {"samples": g.link("sampler"), "vae": g.link("checkpoint", 2)}, "decode")
    g.add("SaveImage", {"images": g.link("decode"), "filename_prefix": prefix}, "save")
    return g


def _analyzer(g: Graph) -> None:
    g.add("FaceStudioFaceAnalyzerLoader", {"pack": FACE_PACK, "provider": "auto", "det_size": 640}, "analyzer")


def _clip_vision(g: Graph) -> None:
    g.add("CLIPVisionLoader", {"clip_name": CLIP_VISION}, "clip_vision")


def _faceid(g: Graph, adapter: str = FACEID_PLUS_V2) -> None:
    g.add("FaceStudioAdapterLoader", {"adapter_name": adapter, "kind": "auto"}, "adapter")


def _face_models(g: Graph, adapter: str = FACEID_PLUS_V2) -> None:
    """The face analyzer, the CLIP vision model and the FaceID Plus v2 adapter, in that order."""
    _analyzer(g)
    _clip_vision(g)
    _faceid(g, adapter)


def _encode(g: Graph, name: str, image: list, face: str = "largest", index: int = 0) -> list:
    g.add("FaceStudioIdentityEncode", {"face_analyzer": g.link("analyzer"), "image": image, "face": face,
                                       "index": index, "on_missing": "error", "outlier_threshold": 0.4,
                                       "clip_vision": g.link("clip_vision")}, name)
    return g.link(name)


def _photo_identity(g: Graph, name: str, photo: str) -> list:
    g.add("LoadImage", {"image": photo}, f"{name}_photo")
    return _encode(g, name, g.link(f"{name}_photo"))


def _person(g: Graph, name: str, identity: list, persons: list | None = None, masks: list | None = None,
            mask_index: int = 0, weight: float = 1.0) -> list:
    return _add_person(g, "FaceStudioPerson", name, {"identity": identity, "weight": weight, "start": 0.0, "end": 1.0,
                                                     "mask_index": mask_index, "faceid_v2_weight": 1.0}, persons, masks)


def _add_person(g: Graph, class_type: str, name: str, inputs: dict, persons: list | None, masks: list | None) -> list:
    """A Person node (SD's or PuLID-FLUX's) with its optional person list and masks connected."""
    if persons is not None:
        inputs["persons"] = persons
    if masks is not None:
        inputs["mask"] = masks
    g.add(class_type, inputs, name)
    return g.link(name)


def _apply(g: Graph, persons: list, lora_strength: float = 1.0, alpha: float = 0.5, model: list | None = None,
           **extra) -> None:
    inputs = {"model": model or g.link("checkpoint", 0), "adapter": g.link("adapter"), "persons": persons,
              "alpha": alpha, "style_weight": 1.0, "lora_strength": lora_strength, "embeds_scaling": "V only",
              "style_blocks": "all", "style_block_weights": "", "unfold_batch": False, "image_text_blend": 0.5, **extra}
    g.add("FaceStudioApply", inputs, "apply")
    g.prompt[g["sampler"]]["inputs"]["model"] = g.link("apply")


def _regional_prompts(g: Graph, masks: list, texts: tuple[str, ...], clip: list | None = None,
                      into: tuple[str, str] = ("sampler", "positive")) -> None:
    """Person i's own prompt in region i (FaceStudio Region Prompt, mask_index i), each added to the
    whole-image prompt in turn; the result goes to node `into[0]`'s input `into[1]`."""
    combined = g.link("positive")
    for i, text in enumerate(texts):
        g.add("FaceStudioRegionPrompt", {"clip": clip or g.link("checkpoint", 1), "text": text, "masks": masks,
                                         "mask_index": i, "strength": 1.0, "conditioning": combined}, f"prompt{i}")
        combined = g.link(f"prompt{i}")
    g.prompt[g[into[0]]]["inputs"][into[1]] = combined


def _sam3_segments(g: Graph) -> list:
    """SAM3 Detect on the layout photo, one mask per person (its own checkpoint and prompt)."""
    g.add("CheckpointLoaderSimple", {"ckpt_name": SAM3_CHECKPOINT}, "sam3")
    # SAM3 Detect keeps one detection per prompt unless it says how many: "person:2" for two.
    g.add("CLIPTextEncode", {"text": "person:2", "clip": g.link("sam3", 1)}, "sam3_prompt")
    g.add("SAM3_Detect", {"model": g.link("sam3"), "image": g.link("layout"), "conditioning": g.link("sam3_prompt"),
                          "threshold": 0.5, "refine_iterations": 2, "individual_masks": True}, "segment")
    return g.link("segment")


def _two_people_in_regions(g: Graph, mode: str, image: list, width: int, height: int, feather: int,
                           size_weighted: bool, segments: list | None = None) -> None:
    """FaceStudio Regions on `image` (two regions, faces left to right; `segments`: its segment masks),
    PHOTO's person in region 0 and OTHER_PHOTO's in region 1, applied to the model."""
    g.add("FaceStudioRegions", {"mode": mode, "count": 2, "image": image,
                                "face_analyzer": g.link("analyzer"), "width": width, "height": height,
                                "feather": feather,
                                "feather_shape": "gaussian", "grow_width": 3.0, "grow_up": 0.5, "grow_down": 3.0,
                                "size_weighted": size_weighted, "grid_columns": 0,
                                **({"segments": segments} if segments is not None else {})}, "regions")
    first = _photo_identity(g, "identity0", PHOTO)
    second = _photo_identity(g, "identity1", OTHER_PHOTO)
    persons = _person(g, "person0", first, masks=g.link("regions"), mask_index=0)
    persons = _person(g, "person1", second, persons, masks=g.link("regions"), mask_index=1)
    _apply(g, persons)


MODELS_NOTE = ("Models. Checkpoint: any SD1.5 model in models/checkpoints. FaceID Plus v2 "
               f"({FACEID_PLUS_V2}) in models/ipadapter; its LoRA is applied by FaceStudio Apply's "
               "lora_strength (from the file, or ip-adapter-faceid-plusv2_sd15_lora.safetensors in "
               f"models/loras). CLIP vision ViT-H ({CLIP_VISION}) in models/clip_vision. Face "
               f"analyzer: the insightface pack '{FACE_PACK}' (a folder of .onnx files) in "
               "models/insightface/models.")
SDXL_MODELS_NOTE = ("Models. Checkpoint: any SDXL model in models/checkpoints (here the base model, "
                    f"{SDXL_CHECKPOINT}). FaceID Plus v2 for SDXL ({FACEID_PLUS_V2_SDXL}) in models/ipadapter; its "
                    "LoRA is applied by FaceStudio Apply's lora_strength (from the file, or "
                    f"{FACEID_PLUS_V2_SDXL_LORA} in models/loras). CLIP vision ViT-H ({CLIP_VISION}, the same "
                    f"as for SD1.5) in models/clip_vision. Face analyzer: the insightface pack '{FACE_PACK}' in "
                    "models/insightface/models.")
SAMPLE_NOTE = ("Sampling. The prompt describes the scene; the face comes from the identity. cfg 4-7 and "
               "30 steps are good starting points. lora_strength 0.6-1.0 and weight 0.8-1.2 trade "
               "likeness against prompt freedom.")
SDXL_SAMPLE_NOTE = ("Sampling. SDXL works at about one megapixel: 1024x1024, 1216x832, 832x1216, 1152x896. "
                    "cfg 4-7 and 30 steps are good starting points; lora_strength 0.6-1.0 and weight 0.8-1.2 "
                    "trade likeness against prompt freedom.")


def _on_base(base: str) -> tuple[str, dict[str, str]]:
    """Words for the overview note and node titles that name the base, where it is not SD1.5."""
    if base == "SD1.5":
        return "", {}
    return f" on {base}", {"adapter": f"FaceID adapter (FaceID Plus v2 {base})"}


BASES = {  # base -> (checkpoint, FaceID adapter, models note, sampling note, title prefix, short name prefix)
    "SD1.5": (CHECKPOINT, FACEID_PLUS_V2, MODELS_NOTE, SAMPLE_NOTE, "", ""),
    "SDXL": (SDXL_CHECKPOINT, FACEID_PLUS_V2_SDXL, SDXL_MODELS_NOTE, SDXL_SAMPLE_NOTE, "SDXL - ", "SDXL "),
}


def one_person(number: int = 1, base: str = "SD1.5") -> Workflow:
    checkpoint, adapter, models_note, sample_note, title, short = BASES[base]
    on, titles = _on_base(base)
    size = {"width": 1024, "height": 1024, "cfg": 5.0} if base == "SDXL" else {}
    g = _base("a photo of a person in a leather jacket on a city street at night, neon lights, 35mm",
              checkpoint=checkpoint, **size)
    _face_models(g, adapter)
    _photo_identity(g, "identity", PHOTO)
    _apply(g, _person(g, "person", g.link("identity")))
    return Workflow(
        f"{number:02d} {short}one person" if short else f"{number:02d} One person, one photo", f"{title}One person from one photo",
        f"One person from one photo{on}, with IP-Adapter FaceID Plus v2 and its LoRA (FaceStudio Apply's "
        "lora_strength). Put a clear photo of one face in ComfyUI's input folder and pick it in Load Image.",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "adapter", "clip_vision", "analyzer"], models_note),
         Group("2. The person", COLORS["faces"], ["identity_photo", "identity", "person"],
               "The person. Encode Identity finds the largest face of the photo, aligns it and embeds it "
               "(ArcFace + CLIP vision of the face crop, which Plus v2 needs). Person says who (and where: "
               "no mask = the whole image)."),
         Group("3. Prompt and apply", COLORS["prompt"], ["positive", "negative", "apply"],
               "FaceStudio Apply patches a clone of the model: the identity's tokens join the text in every "
               "cross-attention layer. lora_strength 1.0 (the reference's strength) applies FaceID Plus v2's own "
               "LoRA; the person's faceid_v2_weight trades face structure against identity."),
         Group("4. Sample", COLORS["sample"], ["latent", "sampler", "decode", "save"], sample_note)],
        {"identity_photo": "Photo of the person", **titles},
        base,
        summary=("SDXL: your face photo and a prompt make an image of that person, at 1024x1024 (FaceID Plus v2 "
                 "SDXL)." if base == "SDXL" else
                 "Your face photo and a prompt make an image of that person, in seconds (FaceID Plus v2 and its LoRA)."),
    )


def stylized_portrait() -> Workflow:
    g = _base("a portrait of a person, oil painting, thick brush strokes", cfg=5.0)
    _face_models(g)
    _photo_identity(g, "identity", PHOTO)
    g.add("FaceStudioAdapterLoader", {"adapter_name": STYLE_ADAPTER, "kind": "auto"}, "style_adapter")
    g.add("LoadImage", {"image": STYLE_IMAGE}, "style_photo")
    g.add("FaceStudioStyleEncode", {"image": g.link("style_photo"), "clip_vision": g.link("clip_vision"),
                                    "mask_margin": 0.25, "face_analyzer": g.link("analyzer")}, "style")
    _apply(g, _person(g, "person", g.link("identity")), alpha=0.6, style_adapter=g.link("style_adapter"),
           style=g.link("style"))
    g.set("apply", style_weight=0.8)
    return Workflow(
        "02 Portrait in a style", "Stylized portrait (person + style image)",
        "A person in the look of a style image: FaceStudio's hybrid guidance. Identity from the person's "
        "photo; the look from the style image (an IP-Adapter image-prompt model); the text from the prompt. "
        "alpha balances the style image against the text.",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "adapter", "style_adapter", "clip_vision", "analyzer"],
               MODELS_NOTE + f" Style: the IP-Adapter image-prompt model {STYLE_ADAPTER} (or "
               "ip-adapter_sd15.safetensors) in models/ipadapter."),
         Group("2. The person", COLORS["faces"], ["identity_photo", "identity", "person"],
               "The person's identity, from one photo (its largest face)."),
         Group("3. The style image", COLORS["style"], ["style_photo", "style"],
               "Encode Style takes the style image's look through CLIP vision. With the face analyzer "
               "connected, the faces in the style image are painted out first, so it gives its look but "
               "not its people."),
         Group("4. Prompt and apply", COLORS["prompt"], ["positive", "negative", "apply"],
               "alpha: 0.5 balances style image and text; above 0.5 the style image leads, below the text "
               "does. style_weight scales the style image; style_blocks 'style only' keeps its look "
               "without copying its layout (InstantStyle)."),
         Group("5. Sample", COLORS["sample"], ["latent", "sampler", "decode", "save"], SAMPLE_NOTE)],
        {"identity_photo": "Photo of the person", "style_photo": "Style image",
         "style_adapter": "Style adapter (image prompt)"},
        summary="A person in the look of a style image: the text, the style image and the identity blended (alpha).",
    )


TWO_PEOPLE_PROMPTS = ("a woman with long red hair, green coat", "a man with a beard, blue denim jacket")
TWO_PEOPLE_TITLES = {"identity0_photo": "Photo of person 0 (left)", "identity1_photo": "Photo of person 1 (right)",
                     "layout": "Layout photo (two people)", "prompt0": "Prompt of person 0",
                     "prompt1": "Prompt of person 1"}


def _two_people_groups(place: str, sample_note: str) -> list[Group]:
    """Groups 3-5 of the two-people workflows (the people, their prompts, Apply and sample); `place` is
    what each person is bound to ("region", "silhouette")."""
    return [
        Group("3. The people", COLORS["faces"], ["identity0_photo", "identity0", "person0", "identity1_photo",
                                                  "identity1", "person1"],
              f"Person 0 gets mask_index 0 (left {place}), person 1 mask_index 1 (right)."),
        Group("4. Per-person prompts", COLORS["prompt"],
              ["positive", "negative", "prompt0", "prompt1"],
              f"The whole-image prompt, then each person's own prompt inside their {place}: Region Prompt "
              f"mask_index i, as Person's."),
        Group("5. Apply and sample", COLORS["sample"], ["apply", "latent", "sampler", "decode", "save"],
              f"FaceStudio Apply routes each person's identity to their {place}, in one attention pass. "
              + sample_note)]


def two_people(number: int = 3, base: str = "SD1.5") -> Workflow:
    checkpoint, adapter, models_note, sample_note, title, short = BASES[base]
    on, titles = _on_base(base)
    width, height, feather = (1216, 832, 32) if base == "SDXL" else (768, 512, 16)
    g = _base("two friends standing side by side in a park, autumn, golden hour, photo", width=width, height=height,
              checkpoint=checkpoint, cfg=5.0 if base == "SDXL" else 6.0)
    _face_models(g, adapter)
    g.add("LoadImage", {"image": LAYOUT}, "layout")
    _two_people_in_regions(g, "grow", g.link("layout"), width, height, feather, size_weighted=False)
    _regional_prompts(g, g.link("regions"), TWO_PEOPLE_PROMPTS)
    return Workflow(
        f"{number:02d} {short}two people" if short else f"{number:02d} Two people in regions", f"{title}Two people, each in their own region",
        f"Two people in one image{on}, each bound to a region: FaceStudio's multi-identity attention, where the "
        "image inside person i's region attends only to person i's identity. The regions come from the faces "
        "of a layout photo (two people, left to right); each person also gets their own prompt in their "
        "region.",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "adapter", "clip_vision", "analyzer"], models_note),
         Group("2. Regions", COLORS["check"], ["layout", "regions"],
               "FaceStudio Regions: one mask per person from the layout photo's faces, numbered left to "
               "right (mask 0 = left). 'grow' grows each face box to head and upper body; 'partition' gives "
               "every pixel to the nearest face; 'columns' needs no layout photo. Its preview shows whose "
               "region is where. The layout photo is any picture with the two people placed as you want "
               "them; its aspect ratio should match the latent's."),
         *_two_people_groups("region", sample_note)],
        {**TWO_PEOPLE_TITLES, **titles},
        base,
        summary=("SDXL: two people in one image, each face bound to its own region, each with its own prompt, at "
                 "1216x832." if base == "SDXL" else
                 "Two people in one image, each face bound to its own region, each with its own prompt."),
    )


def two_people_sam3(number: int = 11) -> Workflow:
    """Two people in SAM3 silhouettes (SAM3_Detect: ComfyUI 0.33 on; the workflow tests skip it on older
    hosts and do not run it: no SAM3 weights exist for tests, test_regions.py routes real mask batches)."""
    g = _base("two friends standing side by side in a park, autumn, golden hour, photo", width=768, height=512)
    _face_models(g)
    g.add("LoadImage", {"image": LAYOUT}, "layout")
    _two_people_in_regions(g, "segments", g.link("layout"), 768, 512, 8, size_weighted=False,
                           segments=_sam3_segments(g))
    _regional_prompts(g, g.link("regions"), TWO_PEOPLE_PROMPTS)
    return Workflow(
        f"{number:02d} Two people with SAM3", "Two people, each in their own silhouette (SAM3)",
        "Two people in one image, each bound to their own silhouette: SAM3 segments the people of a layout "
        "photo, FaceStudio Regions matches each mask to the face in it and numbers them left to right, and the "
        "image inside person i's silhouette attends only to person i's identity. Needs ComfyUI 0.33 or later "
        "(SAM3 Detect).",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "adapter", "clip_vision", "analyzer", "sam3"],
               MODELS_NOTE + f" SAM3: {SAM3_CHECKPOINT} (Comfy-Org/sam3.1) in models/checkpoints."),
         Group("2. Silhouettes", COLORS["check"], ["layout", "sam3_prompt", "segment", "regions"],
               "SAM3 Detect finds the people of the layout photo ('person:2': up to two; lower threshold if it "
               "misses one) with individual_masks on, one mask per person in score order. FaceStudio Regions "
               "'segments' matches each mask to the face in it and numbers them left to right (mask 0 = left); "
               "its report says which masks were dropped (no face) or split (two faces). The layout photo's "
               "aspect ratio should match the latent's."),
         *_two_people_groups("silhouette", SAMPLE_NOTE)],
        {**TWO_PEOPLE_TITLES, "sam3": "SAM3 (segmentation)", "sam3_prompt": "What to segment",
         "segment": "SAM3 Detect"},
        requires=("SAM3_Detect",),
        summary="Two people in one image, each bound to their own SAM3 silhouette (ComfyUI 0.33 or later).",
    )


# --- FLUX.1 with PuLID-FLUX -----------------------------------------------------------------------
FLUX_MODELS_NOTE = (f"Models. FLUX.1 dev: {FLUX_UNET} in models/diffusion_models, {FLUX_T5} and {FLUX_CLIP_L} in "
                    f"models/text_encoders, {FLUX_VAE} in models/vae. PuLID-FLUX: {PULID_FLUX} in models/pulid, "
                    f"EVA-CLIP {EVA_CLIP} in models/clip_vision, facexlib's detection_Resnet50_Final.pth and "
                    "parsing_bisenet.pth in models/facexlib. Face analyzer: the insightface pack "
                    f"'{FLUX_FACE_PACK}' in models/insightface/models (PuLID-FLUX was trained on its embeddings).")
FLUX_SAMPLE_NOTE = ("Sampling. FLUX.1 dev takes its guidance from FluxGuidance (3.5), so cfg stays 1.0 and the "
                    "negative prompt is unused; euler / simple, 20 steps, about one megapixel. weight 0.8-1.2 "
                    "trades likeness against prompt freedom; start 0 to end 1 is the whole schedule.")
FLUX_TITLES = {"unet": "FLUX.1 dev (diffusion model)", "text_encoders": "Text encoders (T5-XXL, CLIP-L)",
               "vae": "FLUX VAE", "pulid": "PuLID-FLUX", "positive": "Prompt (whole image)",
               "negative": "Negative (unused at cfg 1)"}


def _flux_base(positive: str, width: int, height: int, seed: int = 42, steps: int = 20) -> Graph:
    """FLUX.1 dev as ComfyUI's own FLUX example graph: diffusion model, dual text encoders, VAE, FluxGuidance
    3.5 on the prompt, cfg 1.0 (so the negative, the prompt zeroed, is unused), euler / simple."""
    g = Graph()
    g.add("UNETLoader", {"unet_name": FLUX_UNET, "weight_dtype": "default"}, "unet")
    g.add("DualCLIPLoader", {"clip_name1": FLUX_T5, "clip_name2": FLUX_CLIP_L, "type": "flux", "device": "default"},
          "text_encoders")
    g.add("VAELoader", {"vae_name": FLUX_VAE}, "vae")
    g.add("CLIPTextEncode", {"text": positive, "clip": g.link("text_encoders")}, "positive")
    g.add("FluxGuidance", {"conditioning": g.link("positive"), "guidance": 3.5}, "guidance")
    g.add("ConditioningZeroOut", {"conditioning": g.link("positive")}, "negative")
    g.add("EmptySD3LatentImage", {"width": width, "height": height, "batch_size": 1}, "latent")
    g.add("KSampler", {"model": g.link("unet"), "positive": g.link("guidance"), "negative": g.link("negative"),
                       "latent_image": g.link("latent"), "seed": seed, "steps": steps, "cfg": 1.0,
                       "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}, "sampler")
    g.add("VAEDecode", {"samples": g.link("sampler"), "vae": g.link("vae")}, "decode")
    g.add("SaveImage", {"images": g.link("decode"), "filename_prefix": "FaceStudio_FLUX"}, "save")
    g.add("FaceStudioPuLIDFluxLoader", {"pulid_file": PULID_FLUX, "eva_clip": EVA_CLIP}, "pulid")
    g.add("FaceStudioFaceAnalyzerLoader", {"pack": FLUX_FACE_PACK, "provider": "auto", "det_size": 640}, "analyzer")
    return g


def _flux_person(g: Graph, name: str, photo: str, persons: list | None = None, masks: list | None = None,
                 mask_index: int = 0) -> list:
    g.add("LoadImage", {"image": photo}, f"{name}_photo")
    g.add("FaceStudioPuLIDFluxIdentityEncode", {"pulid_flux": g.link("pulid"), "face_analyzer": g.link("analyzer"),
                                                "image": g.link(f"{name}_photo")}, f"{name}_identity")
    return _add_person(g, "FaceStudioPuLIDFluxPerson", name, {"identity": g.link(f"{name}_identity"), "weight": 1.0,
                                                              "start": 0.0, "end": 1.0, "mask_index": mask_index},
                       persons, masks)


def _flux_apply(g: Graph, persons: list) -> None:
    g.add("FaceStudioPuLIDFluxApply", {"model": g.link("unet"), "pulid_flux": g.link("pulid"), "persons": persons},
          "apply")
    g.prompt[g["sampler"]]["inputs"]["model"] = g.link("apply")


FLUX_MODEL_GROUP = ["unet", "text_encoders", "vae", "pulid", "analyzer"]


def flux_one_person(number: int = 12) -> Workflow:
    g = _flux_base("a photo of a person in a leather jacket on a city street at night, neon lights, 35mm",
                   1024, 1024)
    _flux_apply(g, _flux_person(g, "person", PHOTO))
    return Workflow(
        f"{number:02d} FLUX one person", "FLUX - One person from one photo",
        "One person from one photo on FLUX.1 dev, with PuLID-FLUX: the face's ArcFace embedding (antelopev2) and "
        "its EVA-CLIP features become 32 ID tokens that PuLID's identity cross-attention adds to FLUX's image "
        "tokens. Put a clear photo of one face in ComfyUI's input folder and pick it in Load Image.",
        g,
        [Group("1. Models", COLORS["models"], FLUX_MODEL_GROUP, FLUX_MODELS_NOTE),
         Group("2. The person", COLORS["faces"], ["person_photo", "person_identity", "person"],
               "The person. Encode Identity PuLID-FLUX takes the largest face of the photo (several photos in "
               "one batch are averaged). Person PuLID-FLUX says who and where (no mask = the whole image)."),
         Group("3. Prompt and apply", COLORS["prompt"], ["positive", "guidance", "negative", "apply"],
               "Apply PuLID-FLUX patches a clone of the FLUX model through the host's block replacements: after "
               "every second double block and every fourth single block, the image tokens attend to the ID "
               "tokens."),
         Group("4. Sample", COLORS["sample"], ["latent", "sampler", "decode", "save"], FLUX_SAMPLE_NOTE)],
        {**FLUX_TITLES, "person_photo": "Photo of the person"},
        "FLUX",
        summary="FLUX.1: your face photo and a prompt make an image of that person (PuLID-FLUX).",
    )


def flux_two_people(number: int = 13, sam3: bool = False) -> Workflow:
    width, height = 1216, 832
    g = _flux_base("two friends standing side by side in a park, autumn, golden hour, photo", width, height)
    g.add("LoadImage", {"image": LAYOUT}, "layout")
    segments = None
    if sam3:
        segments = _sam3_segments(g)
    g.add("FaceStudioRegions", {"mode": "segments" if sam3 else "grow", "count": 2, "image": g.link("layout"),
                                "face_analyzer": g.link("analyzer"), "width": width, "height": height,
                                "feather": 8 if sam3 else 32, "feather_shape": "gaussian", "grow_width": 3.0,
                                "grow_up": 0.5, "grow_down": 3.0, "size_weighted": False, "grid_columns": 0,
                                **({"segments": segments} if sam3 else {})}, "regions")
    persons = _flux_person(g, "person0", PHOTO, masks=g.link("regions"), mask_index=0)
    persons = _flux_person(g, "person1", OTHER_PHOTO, persons, masks=g.link("regions"), mask_index=1)
    _flux_apply(g, persons)
    _regional_prompts(g, g.link("regions"), TWO_PEOPLE_PROMPTS, clip=g.link("text_encoders"),
                      into=("guidance", "conditioning"))
    place = "silhouette" if sam3 else "region"
    if sam3:
        name, title = f"{number:02d} FLUX two people, SAM3", "FLUX - Two people, each in their own silhouette (SAM3)"
        layout_group = Group(
            "2. Silhouettes", COLORS["check"], ["layout", "sam3_prompt", "segment", "regions"],
            "SAM3 Detect finds the people of the layout photo ('person:2': up to two) with individual_masks on. "
            "FaceStudio Regions 'segments' matches each mask to the face in it and numbers them left to right "
            "(mask 0 = left). The layout photo's aspect ratio should match the latent's.")
        models = Group("1. Models", COLORS["models"], [*FLUX_MODEL_GROUP, "sam3"],
                       FLUX_MODELS_NOTE + f" SAM3: {SAM3_CHECKPOINT} (Comfy-Org/sam3.1) in models/checkpoints.")
        summary = "FLUX.1: two people, each face bound to their own SAM3 silhouette (ComfyUI 0.33 or later)."
        extra_titles = {"sam3": "SAM3 (segmentation)", "sam3_prompt": "What to segment", "segment": "SAM3 Detect"}
    else:
        name, title = f"{number:02d} FLUX two people", "FLUX - Two people, each in their own region"
        layout_group = Group(
            "2. Regions", COLORS["check"], ["layout", "regions"],
            "FaceStudio Regions: one mask per person from the layout photo's faces, numbered left to right (mask 0 "
            "= left); 'grow' grows each face box to head and upper body. Its preview shows whose region is where. "
            "The layout photo's aspect ratio should match the latent's.")
        models = Group("1. Models", COLORS["models"], FLUX_MODEL_GROUP, FLUX_MODELS_NOTE)
        summary = "FLUX.1: two people in one image, each face bound to its own region, each with its own prompt."
        extra_titles = {}
    return Workflow(
        name, title,
        f"Two people in one FLUX.1 image, each bound to a {place}: FaceStudio's multi-identity attention on "
        f"PuLID-FLUX, where FLUX's image tokens inside person i's {place} attend only to person i's ID tokens, all "
        "persons in one routed pass. Each person also gets their own prompt in their " + place + "."
        + (" Needs ComfyUI 0.33 or later (SAM3 Detect)." if sam3 else ""),
        g,
        [models, layout_group,
         Group("3. The people", COLORS["faces"], ["person0_photo", "person0_identity", "person0", "person1_photo",
                                                  "person1_identity", "person1"],
               f"Person 0 gets mask_index 0 (left {place}), person 1 mask_index 1 (right)."),
         Group("4. Per-person prompts", COLORS["prompt"], ["positive", "prompt0", "prompt1", "guidance", "negative"],
               f"The whole-image prompt, then each person's own prompt inside their {place} (Region Prompt "
               "mask_index i, as Person's), then FluxGuidance."),
         Group("5. Apply and sample", COLORS["sample"], ["apply", "latent", "sampler", "decode", "save"],
               f"Apply PuLID-FLUX routes each person's ID tokens to their {place}. " + FLUX_SAMPLE_NOTE)],
        {**FLUX_TITLES, "person0_photo": "Photo of person 0 (left)", "person1_photo": "Photo of person 1 (right)",
         "layout": "Layout photo (two people)", "prompt0": "Prompt of person 0", "prompt1": "Prompt of person 1",
         **extra_titles},
        "FLUX",
        requires=("SAM3_Detect",) if sam3 else (),
        summary=summary,
    )


def multi_shot() -> Workflow:
    g = _base("a photo of a person hiking in the mountains, backpack, sunny day")
    _face_models(g)
    for i, photo in enumerate((PHOTO, PHOTO_2, PHOTO_3)):
        g.add("LoadImage", {"image": photo}, f"shot{i}")
    identity = _encode(g, "identity", g.link("shot0"))
    g.set("identity", image_2=g.link("shot1"), image_3=g.link("shot2"))  # each photo at its own size
    g.add("PreviewAny", {"source": g.link("identity", 1)}, "report")
    g.add("FaceStudioIdentitySave", {"identity": identity, "filename_prefix": "person"}, "save_identity")
    _apply(g, _person(g, "person", identity))
    return Workflow(
        "04 One face, many photos", "One person from several photos",
        "One person from several photos (multi-shot): more views of a face give a steadier likeness. The "
        "report shows which shots were used and which were dropped as not matching the others.",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "adapter", "clip_vision", "analyzer"], MODELS_NOTE),
         Group("2. Several photos", COLORS["faces"], ["shot0", "shot1", "shot2"],
               "Three photos of the same person, each at its own size, into Encode Identity's image, image_2 "
               "and image_3 (image_4 takes a fourth; for more, chain Encode Identity nodes through their "
               "'identity' input)."),
         Group("3. One identity", COLORS["faces"], ["identity", "report", "save_identity", "person"],
               "Encode Identity combines the shots (weighted by detection score); with 3+ shots, one whose "
               "similarity to the others is below outlier_threshold is dropped. The report (Preview Any) says "
               "which. Save Identity keeps the result for Load Identity."),
         Group("4. Prompt, apply, sample", COLORS["sample"], ["positive", "negative", "apply", "latent", "sampler",
                                                             "decode", "save"], SAMPLE_NOTE)],
        {"shot0": "Photo 1", "shot1": "Photo 2", "shot2": "Photo 3", "report": "Shots used / dropped"},
        summary="Several photos of one person make one steadier identity; a shot that does not match is dropped.",
    )


def identity_mix() -> Workflow:
    g = _base("a photo of a person smiling, studio portrait, soft light")
    _face_models(g)
    first = _photo_identity(g, "identity_a", PHOTO)
    second = _photo_identity(g, "identity_b", OTHER_PHOTO)
    g.add("FaceStudioIdentityMix", {"identity_a": first, "identity_b": second, "weight": 0.5, "weight_c": 0.0,
                                    "weight_d": 0.0}, "mix")
    _apply(g, _person(g, "person", g.link("mix")))
    return Workflow(
        "05 Mix two faces", "Identity mixing",
        "A new face between two people: Mix Identities blends their identities (weight = share of B). "
        "Up to four identities made with the same face analyzer can be mixed.",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "adapter", "clip_vision", "analyzer"], MODELS_NOTE),
         Group("2. Two people", COLORS["faces"], ["identity_a_photo", "identity_a", "identity_b_photo", "identity_b"],
               "The two identities to blend, one photo each."),
         Group("3. Mix", COLORS["faces"], ["mix", "person"],
               "weight 0: person A; 1: person B; 0.5 halfway. identity_c / identity_d (with weight_c / "
               "weight_d) add more."),
         Group("4. Prompt, apply, sample", COLORS["sample"], ["positive", "negative", "apply", "latent", "sampler",
                                                             "decode", "save"], SAMPLE_NOTE)],
        {"identity_a_photo": "Photo of person A", "identity_b_photo": "Photo of person B"},
        summary="A new face halfway between two people (Mix Identities).",
    )


def controlnet_lora() -> Workflow:
    g = _base("a dancer on a stage, dramatic lighting, photo")
    g.add("LoraLoader", {"model": g.link("checkpoint", 0), "clip": g.link("checkpoint", 1),
                         "lora_name": STYLE_LORA, "strength_model": 0.7, "strength_clip": 0.7}, "lora")
    for name in ("positive", "negative"):
        g.prompt[g[name]]["inputs"]["clip"] = g.link("lora", 1)
    _face_models(g)
    _photo_identity(g, "identity", PHOTO)
    g.add("ControlNetLoader", {"control_net_name": CONTROLNET_POSE}, "controlnet")
    g.add("LoadImage", {"image": POSE}, "pose")
    g.add("ControlNetApplyAdvanced", {"positive": g.link("positive"), "negative": g.link("negative"),
                                      "control_net": g.link("controlnet"), "image": g.link("pose"),
                                      "strength": 0.8, "start_percent": 0.0, "end_percent": 1.0,
                                      "vae": g.link("checkpoint", 2)}, "control")
    g.prompt[g["sampler"]]["inputs"].update(positive=g.link("control", 0), negative=g.link("control", 1))
    _apply(g, _person(g, "person", g.link("identity")), model=g.link("lora", 0))
    return Workflow(
        "06 ControlNet and LoRA", "With a ControlNet (pose) and a LoRA",
        "FaceStudio with the tools you already use: a LoRA on the checkpoint, an OpenPose ControlNet for the "
        "body's pose, and FaceStudio Apply for the face, all in one graph.",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "lora", "adapter", "clip_vision", "analyzer"],
               MODELS_NOTE + f" LoRA: any SD1.5 LoRA in models/loras ({STYLE_LORA} is an example)."),
         Group("2. The person", COLORS["faces"], ["identity_photo", "identity", "person"],
               "The person's identity, from one photo (its largest face)."),
         Group("3. Pose", COLORS["style"], ["controlnet", "pose", "control"],
               f"An OpenPose skeleton image (e.g. from an OpenPose preprocessor) and {CONTROLNET_POSE} in "
               "models/controlnet. The ControlNet sets the body; FaceStudio the face."),
         Group("4. Prompt, apply, sample", COLORS["sample"], ["positive", "negative", "apply", "latent", "sampler",
                                                             "decode", "save"],
               "FaceStudio Apply goes after the LoRA loader (it patches the LoRA'd model). " + SAMPLE_NOTE)],
        {"identity_photo": "Photo of the person", "pose": "Pose image (OpenPose)", "lora": "Style LoRA"},
        summary="A face from a photo, a body pose from an OpenPose ControlNet and a LoRA's look, in one graph.",
    )


def image_to_image() -> Workflow:
    g = _base("two people at a cafe table, candid photo", denoise=0.6)
    _face_models(g)
    g.add("LoadImage", {"image": SCENE}, "scene")
    g.add("ImageScale", {"image": g.link("scene"), "upscale_method": "lanczos", "width": 768, "height": 512,
                         "crop": "center"}, "scene_scaled")
    g.add("VAEEncode", {"pixels": g.link("scene_scaled"), "vae": g.link("checkpoint", 2)}, "scene_latent")
    del g.prompt[g["latent"]], g.nodes["latent"]
    g.prompt[g["sampler"]]["inputs"]["latent_image"] = g.link("scene_latent")
    _two_people_in_regions(g, "partition", g.link("scene_scaled"), 768, 512, 16, size_weighted=True)
    return Workflow(
        "07 Image to image", "Image to image: keep the scene, replace the people",
        "Image to image: the scene photo's layout (composition, poses, colours) is kept and its two people "
        "become the two identities. denoise below 1 (0.5-0.7) sets how much is redrawn.",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "adapter", "clip_vision", "analyzer"], MODELS_NOTE),
         Group("2. The scene", COLORS["check"], ["scene", "scene_scaled", "scene_latent", "regions"],
               "The scene photo, scaled to the output size and encoded as the starting latent. Regions "
               "'partition' gives every pixel to the nearest of its two faces (size-weighted), numbered left "
               "to right: each new person takes the place of the old one on that side."),
         Group("3. The people", COLORS["faces"], ["identity0_photo", "identity0", "person0", "identity1_photo",
                                                   "identity1", "person1"],
               "Person 0 replaces the scene's left person (mask_index 0), person 1 the right one."),
         Group("4. Prompt, apply, sample", COLORS["sample"], ["positive", "negative", "apply", "sampler", "decode",
                                                             "save"],
               "denoise 0.6: lower keeps more of the scene (and of its people's faces), higher follows the "
               "identities and the prompt more. " + SAMPLE_NOTE)],
        {"identity0_photo": "Photo of person 0 (left)", "identity1_photo": "Photo of person 1 (right)",
         "scene": "Scene photo"},
        summary="A scene photo keeps its composition; its two people become yours (denoise 0.6).",
    )


def scoring() -> Workflow:
    g = _base("a photo of a person reading in a library, warm light")
    _face_models(g)
    identity = _photo_identity(g, "identity", PHOTO)
    _apply(g, _person(g, "person", identity))
    g.add("FaceStudioIdentityScore", {"image": g.link("decode"), "face_analyzer": g.link("analyzer"),
                                      "identity_1": identity, "threshold": 0.3}, "score")
    g.add("PreviewAny", {"source": g.link("score", 1)}, "score_report")
    return Workflow(
        "08 Generate and score", "Generate, then score the likeness",
        "Generation followed by FaceStudio Identity Score: how much each generated face looks like the "
        "reference identity (cosine similarity of face embeddings), so settings can be compared by numbers.",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "adapter", "clip_vision", "analyzer"], MODELS_NOTE),
         Group("2. The person", COLORS["faces"], ["identity_photo", "identity", "person"],
               "The person's identity, from one photo (its largest face)."),
         Group("3. Prompt, apply, sample", COLORS["sample"], ["positive", "negative", "apply", "latent", "sampler",
                                                             "decode", "save"], SAMPLE_NOTE),
         Group("4. Score", COLORS["check"], ["score", "score_report"],
               "Identity Score finds the faces of the generated image, pairs them with the identities and "
               "reports each one's similarity (a face not found is reported, not an error). Use the same "
               "face analyzer as for encoding. Compare seeds, weights or lora_strength by these numbers.")],
        {"identity_photo": "Photo of the person", "score_report": "Score report"},
        summary="Generate, then measure how much the generated face looks like the reference (Identity Score).",
    )


DATASET_FOLDER = "facestudio_training_photos"  # in ComfyUI's input folder: the user's photos (and .txt captions)


def train_adapter(number: int = 15) -> Workflow:
    """Prepare a folder of face photos, train a FaceStudio adapter on it, save it, and generate with it at once."""
    g = _base("a photo of a person in a garden, soft daylight")
    _analyzer(g)
    _clip_vision(g)
    g.add("FaceStudioPrepareDataset", {"folder": DATASET_FOLDER, "face_analyzer": g.link("analyzer"),
                                       "clip_vision": g.link("clip_vision"), "vae": g.link("checkpoint", 2),
                                       "clip": g.link("checkpoint", 1), "resolution": 512}, "dataset")
    g.add("PreviewAny", {"source": g.link("dataset", 1)}, "dataset_report")
    g.add("FaceStudioTrainAdapter", {"model": g.link("checkpoint", 0), "dataset": g.link("dataset"),
                                     "adapter_name": "facestudio/my_adapter", "steps": 2000, "batch_size": 4,
                                     "learning_rate": 1e-4, "optimizer": "AdamW", "seed": 0, "save_every": 250,
                                     "resume": False, "style_dropout": 0.64, "face_dropout": 0.1, "num_tokens": 4,
                                     "dataset_licence": "", "face_models_licence": ""}, "train")
    g.add("LossGraphNode", {"loss": g.link("train", 1), "filename_prefix": "facestudio_loss"}, "loss_graph")
    g.add("FaceStudioSaveAdapter", {"adapter": g.link("train"), "adapter_name": "facestudio/my_adapter_final",
                                    "overwrite": False}, "save_adapter")
    _photo_identity(g, "identity", PHOTO)
    g.add("LoadImage", {"image": STYLE_IMAGE}, "style_photo")
    g.add("FaceStudioStyleEncode", {"image": g.link("style_photo"), "clip_vision": g.link("clip_vision"),
                                    "face_analyzer": g.link("analyzer"), "mask_margin": 0.25}, "style")
    g.prompt[g["identity"]]["inputs"].pop("clip_vision")  # a FaceStudio adapter reads the face embedding only
    _person(g, "person", g.link("identity"))
    g.add("FaceStudioApply", {"model": g.link("checkpoint", 0), "adapter": g.link("train"), "persons": g.link("person"),
                              "alpha": 0.5, "style_weight": 1.0, "lora_strength": 0.0, "embeds_scaling": "V only",
                              "style_blocks": "all", "style_block_weights": "", "unfold_batch": False,
                              "style": g.link("style"), "image_text_blend": 0.5, "prompt": g.link("positive")}, "apply")
    g.prompt[g["sampler"]]["inputs"]["model"] = g.link("apply")
    return Workflow(
        f"{number:02d} Train a FaceStudio adapter", "Train a FaceStudio adapter on your photos, then use it",
        "FaceStudio's own model, trained here: a folder of face photos becomes a FaceStudio adapter (the paper's "
        "fused image + identity and text + identity tokens), saved to models/ipadapter, and the same graph "
        "generates with it. Train on many photos of many people (thousands: FFHQ-like) on a GPU; for long runs "
        "use scripts/train.py. Queue once to train; later, load the saved file with FaceStudio Load Adapter.",
        g,
        [Group("1. Models", COLORS["models"], ["checkpoint", "clip_vision", "analyzer"],
               "Models. Checkpoint: the SD1.5 model to train on (the adapter works with any checkpoint of its "
               f"family). CLIP vision: {CLIP_VISION} in models/clip_vision. Face analyzer: the insightface pack "
               "whose embeddings the adapter learns (recorded in the file; identities must use the same pack)."),
         Group("2. The dataset", COLORS["faces"], ["dataset", "dataset_report"],
               f"Put the photos in ComfyUI's input/{DATASET_FOLDER}/ folder, one face each, each with an optional "
               "caption in a .txt file of the same name. Each photo is cropped to a square, its face embedded and "
               "painted out for the CLIP image embedding, and encoded once (cached beside the photos). The report "
               "lists every photo left out and why (no face, several faces, too small, unreadable)."),
         Group("3. Train and save", COLORS["check"], ["train", "loss_graph", "save_adapter"],
               "Train Adapter keeps the model frozen and trains the fusion and per-layer K/V, with the paper's "
               "style and face dropout. It writes models/ipadapter/facestudio/my_adapter.safetensors every "
               "save_every steps with a .state.pt beside it: turn 'resume' on to continue a stopped run exactly. "
               "State the licences of your photos and face models: they go into the file."),
         Group("4. Generate with it", COLORS["sample"], ["identity_photo", "identity", "style_photo", "style",
                                                         "person", "positive", "negative", "apply", "latent",
                                                         "sampler", "decode", "save"],
               "Apply with the trained adapter: image_text_blend is the paper's a, blending the identity fused with "
               "the style image (1) and with the prompt (0). " + SAMPLE_NOTE)],
        {"identity_photo": "Photo of the person", "style_photo": "Style image", "dataset_report": "Dataset report",
         "train": "Train the adapter", "save_adapter": "Save the adapter"},
        summary="Train FaceStudio's own adapter on a folder of face photos, save it, and generate with it.",
    )


WORKFLOWS = {w.name: w for w in (one_person(), stylized_portrait(), two_people(), multi_shot(), identity_mix(),
                                 controlnet_lora(), image_to_image(), scoring(),
                                 one_person(9, "SDXL"), two_people(10, "SDXL"), two_people_sam3(),
                                 flux_one_person(), flux_two_people(), flux_two_people(14, sam3=True),
                                 train_adapter())}

# --- model metadata: what the frontends' Missing Models panels read -------------------------------
# The loader inputs that name a model file, with the host folder each reads. Frontend 1.48 lists a
# missing file from an unlinked combo whose value ends in a model extension, takes its folder from a
# built-in table of core nodes and fills it (and the URL) from the node's `properties.models` or the
# workflow's top-level `models`; 1.27 reads those lists themselves. An insightface pack is a folder,
# not a file: no frontend lists it, so it gets no entry (its loader names it, with its URL, at validation).
MODEL_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
                ("CLIPVisionLoader", "clip_name"): "clip_vision",
                ("FaceStudioAdapterLoader", "adapter_name"): "ipadapter",
                ("ControlNetLoader", "control_net_name"): "controlnet", ("LoraLoader", "lora_name"): "loras",
                ("FaceStudioFaceAnalyzerLoader", "pack"): "insightface",
                ("UNETLoader", "unet_name"): "diffusion_models", ("DualCLIPLoader", "clip_name1"): "text_encoders",
                ("DualCLIPLoader", "clip_name2"): "text_encoders", ("VAELoader", "vae_name"): "vae",
                ("FaceStudioPuLIDFluxLoader", "pulid_file"): "pulid",
                ("FaceStudioPuLIDFluxLoader", "eva_clip"): "clip_vision"}


def _model_sources():
    """The pack's startup/model_sources.py, loaded from its file (it needs neither the host nor the pack)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "facestudio_model_sources"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "startup" / "model_sources.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


def models_of(prompt: dict) -> dict[str, list[dict]]:
    """{node id: the `models` entries of the files that node loads} (name, url, directory)."""
    sources = _model_sources()
    out = {}
    for node_id, node in prompt.items():
        for (class_type, key), folder in MODEL_INPUTS.items():
            if node["class_type"] != class_type or not isinstance(node["inputs"].get(key), str):
                continue
            entry = sources.source(node["inputs"][key])
            if entry is None:
                raise ValueError(f"node {node_id} ({class_type}) loads {node['inputs'][key]!r}, which "
                                 "startup/model_sources.py has no source for: add it there")
            if entry.folder != folder:
                raise ValueError(f"{entry.name} goes in {entry.folder}, but {class_type}.{key} reads {folder}")
            if not entry.is_pack:
                out.setdefault(str(node_id), []).append(entry.metadata())
    return out


def add_model_metadata(graph: dict, prompt: dict) -> dict:
    """Puts each loader's files in its node's `properties.models` and all of them, once each, in the
    workflow's top-level `models` (ComfyUI's template format), in node order."""
    per_node = models_of(prompt)
    everything = []
    for node in graph["nodes"]:
        entries = per_node.get(str(node["id"]))
        if entries:
            node.setdefault("properties", {})["models"] = entries
            everything += [e for e in entries if e not in everything]
    graph["models"] = everything
    return graph


def api_view(prompt: dict) -> dict:
    """class_type and inputs of each node (the frontend adds `_meta` titles)."""
    return {str(i): {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in prompt.items()}


def prompt_differences(expected: dict, got: dict) -> list[str]:
    """Where two API prompts differ in class types or inputs (titles in `_meta` are ignored)."""
    expected, got = api_view(expected), api_view(got)
    out = [f"node {i} ({expected[i]['class_type']}) missing" for i in expected if i not in got]
    out += [f"node {i} ({got[i]['class_type']}) not in the definition" for i in got if i not in expected]
    for i in sorted(set(expected) & set(got), key=int):
        e, g = expected[i], got[i]
        if e["class_type"] != g["class_type"]:
            out.append(f"node {i}: {g['class_type']} instead of {e['class_type']}")
            continue
        for key in sorted(set(e["inputs"]) | set(g["inputs"])):
            if (e["class_type"], key) in DISPLAY_ONLY_WIDGETS:
                continue
            if e["inputs"].get(key, "<absent>") != g["inputs"].get(key, "<absent>"):
                out.append(f"node {i} ({e['class_type']}).{key}: frontend {g['inputs'].get(key, '<absent>')!r}, "
                           f"definition {e['inputs'].get(key, '<absent>')!r}")
    return out


# Sizes and steps the tests lower for speed on CPU (the only changes they make before running).
TEST_OVERRIDES = {"EmptyLatentImage": {"width": 64, "height": 64}, "EmptySD3LatentImage": {"width": 64, "height": 64},
                  "KSampler": {"steps": 2}, "FaceStudioPrepareDataset": {"resolution": 256},
                  "FaceStudioTrainAdapter": {"steps": 2, "batch_size": 2, "save_every": 0}}
# Nodes the tests replace: FLUX's T5-XXL cannot be made small (the host's T5 config is fixed at 4.7B
# parameters), so the FLUX text encoders' loader becomes the host's CLIP-L loader on the same clip_l file,
# whose states and pooled vector the tiny FLUX reads (CLIP Text Encode and everything after are unchanged).
TEST_SWAPS = {"DualCLIPLoader": lambda inputs: ("CLIPLoader", {"clip_name": inputs["clip_name2"],
                                                               "type": "stable_diffusion", "device": inputs["device"]})}


def with_test_overrides(prompt: dict) -> dict:
    """A copy of `prompt` with TEST_OVERRIDES and TEST_SWAPS applied (nothing else changes)."""
    out = {}
    for node_id, node in prompt.items():
        class_type, inputs = node["class_type"], {**node["inputs"], **TEST_OVERRIDES.get(node["class_type"], {})}
        if class_type in TEST_SWAPS:
            class_type, inputs = TEST_SWAPS[class_type](inputs)
        out[node_id] = {**node, "class_type": class_type, "inputs": inputs}
    return out
