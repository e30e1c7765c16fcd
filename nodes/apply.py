"""FaceStudio Person and FaceStudio Apply: who goes where, then the routed attention on a MODEL."""
from comfy_api.latest import io

from ..attention.controls import EMBEDS_SCALING, STYLE_BLOCKS
from ..attention.patch import add_person, apply_facestudio
from .types import FaceStudioAdapter, FaceStudioIdentity, FaceStudioPersons, FaceStudioStyle


def placement_inputs(persons_type) -> list:
    """When and where a person acts, and the list they join: the inputs every Person node shares (SD and
    PuLID-FLUX alike), `persons_type` being that node's person-list socket."""
    return [
        io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Share of the sampling steps after which the person starts acting."),
        io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Share of the sampling steps after which the person stops acting."),
        persons_type.Input("persons", optional=True, tooltip="Optional: the persons so far; this one is added after them."),
        io.Mask.Input("mask", optional=True, tooltip="Optional: where this person goes (white). Without it, the whole image."),
        io.Int.Input("mask_index", default=0, min=0, max=63, tooltip="Which mask of a mask batch belongs to this person."),
    ]


def pooled_prompt(conditioning):
    """The pooled text embedding [1, text] of a CONDITIONING's first entry, or None when none is connected."""
    if conditioning is None:
        return None
    if not conditioning or not isinstance(conditioning[0][1], dict) or conditioning[0][1].get("pooled_output") is None:
        raise ValueError("The 'prompt' CONDITIONING carries no pooled text embedding (some nodes drop it): connect "
                         "the output of CLIP Text Encode for the positive prompt.")
    return conditioning[0][1]["pooled_output"]


class FaceStudioPerson(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioPerson",
            display_name="FaceStudio Person",
            category="FaceStudio/apply",
            description="Adds one person (an identity, optionally confined to a mask) to a person list.",
            inputs=[
                FaceStudioIdentity.Input("identity", tooltip="The person's identity, from FaceStudio Encode Identity."),
                io.Float.Input("weight", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="How strongly the identity is applied. 0 leaves the image as without it."),
                *placement_inputs(FaceStudioPersons),
                FaceStudioIdentity.Input("negative_identity", optional=True,
                                         tooltip="Optional: an identity to steer this person away from (it replaces "
                                                 "the neutral identity in the negative/unconditional pass)."),
                io.Float.Input("faceid_v2_weight", default=1.0, min=-1.0, max=5.0, step=0.05, optional=True,
                               tooltip="Acts only with FaceID Plus v2 adapters (ignored by the others): the weight "
                                       "of the CLIP face-structure branch added to the ID tokens (the reference's "
                                       "s_scale, IPAdapter Plus's weight_faceidv2). Higher keeps more of the "
                                       "reference face's structure, lower leans on the identity embedding alone; "
                                       "1.0 is the reference default, -1 to 5 the usual range."),
            ],
            outputs=[FaceStudioPersons.Output(display_name="persons", tooltip="The person list with this person added.")],
        )

    @classmethod
    def execute(cls, identity, weight: float, start: float, end: float, persons=None, mask=None,
                mask_index: int = 0, negative_identity=None, faceid_v2_weight: float = 1.0) -> io.NodeOutput:
        return io.NodeOutput(add_person(persons, identity, mask, mask_index, weight, start, end, negative_identity,
                                        faceid_v2_weight))


class FaceStudioApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioApply",
            display_name="FaceStudio Apply",
            category="FaceStudio/apply",
            description="FaceStudio's multi-identity cross-attention: each person's identity acts in its own region, "
                        "the text everywhere, an optional style image on the whole picture.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (it is cloned; the input stays unchanged)."),
                FaceStudioAdapter.Input("adapter", tooltip="A FaceID (identity) adapter, or a FaceStudio-trained one, "
                                                   "from FaceStudio Load Adapter."),
                FaceStudioPersons.Input("persons", tooltip="The persons, from FaceStudio Person nodes."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Text vs style balance: below 0.5 the style fades, above 0.5 the text does."),
                FaceStudioAdapter.Input("style_adapter", optional=True,
                                        tooltip="Optional: an image-prompt (style) adapter for the style image."),
                FaceStudioStyle.Input("style", optional=True, tooltip="Optional: from FaceStudio Encode Style."),
                io.Float.Input("style_weight", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Strength of the style image."),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.01, optional=True,
                               tooltip="FaceID, FaceID Plus and Plus v2 adapters were trained with a LoRA: above 0 "
                                       "it is applied at this strength (1.0 as in the reference; IPAdapter Plus "
                                       "uses 0.6), from the adapter file or its paired "
                                       "'<adapter>_lora.safetensors' in models/loras; if neither has it the model "
                                       "runs without it and 'report' says where it looked. Once per model: a "
                                       "chained Apply does not add it again. Portrait adapters have none. Set 0 "
                                       "if you load that LoRA with a LoRA loader yourself."),
                FaceStudioStyle.Input("negative_style", optional=True,
                                      tooltip="Optional: a style to steer away from (replaces the neutral image in "
                                              "the negative/unconditional pass); needs 'style'."),
                io.Combo.Input("embeds_scaling", options=list(EMBEDS_SCALING), default="V only", optional=True,
                               tooltip="How weights act: 'V only' scales the adapter's output (IP-Adapter's own); "
                                       "'K+V' also sharpens its attention; the 'C penalty' modes weaken it in the "
                                       "wide, high-resolution layers that carry layout (less pose/composition "
                                       "copied from the references)."),
                io.Combo.Input("style_blocks", options=list(STYLE_BLOCKS), default="all", optional=True,
                               tooltip="Where the style image acts (InstantStyle): 'style only' keeps its look "
                                       "without its layout; 'composition only' the reverse."),
                io.String.Input("style_block_weights", default="", optional=True,
                                tooltip="Optional per-block style weights overriding style_blocks for the blocks "
                                        "named, e.g. 'input 8=0.5, output 1=1, middle=0'."),
                io.Boolean.Input("unfold_batch", default=False, optional=True,
                                 tooltip="With a batch of latents: latent i gets only person i (persons repeat when "
                                         "the batch is longer), instead of every person in every latent."),
                io.Float.Input("image_text_blend", default=0.5, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Acts only with FaceStudio adapters (trained with FaceStudio Train "
                                       "Adapter; the IP-Adapter kinds ignore it): FaceStudio's hybrid guidance "
                                       "a*e_i + (1-a)*e_p, each person's identity fused with the style image "
                                       "(e_i, weight a) and with the prompt (e_p). 1 guides through the style "
                                       "image alone, 0 through the prompt alone; without a style only the prompt "
                                       "path acts. Unlike 'alpha', it blends the identity tokens themselves."),
                io.Conditioning.Input("prompt", optional=True,
                                      tooltip="FaceStudio adapters only: the positive prompt's CONDITIONING (from "
                                              "CLIP Text Encode); its pooled text embedding is the text + identity "
                                              "path's input. Other adapters do not read it (the report says so)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched model."),
                     io.String.Output(display_name="report",
                                      tooltip="Empty when all went as set; else what was left out and why (e.g. a "
                                              "FaceID LoRA found neither in the adapter file nor in models/loras).")],
        )

    @classmethod
    def execute(cls, model, adapter, persons, alpha: float, style_weight: float = 1.0, style_adapter=None,
                style=None, negative_style=None, lora_strength: float = 1.0, embeds_scaling: str = "V only",
                style_blocks: str = "all", style_block_weights: str = "", unfold_batch: bool = False,
                image_text_blend: float = 0.5, prompt=None) -> io.NodeOutput:
        reports: list[str] = []
        patched = apply_facestudio(model, adapter, persons, alpha=alpha, style_adapter=style_adapter, style=style,
                                   style_weight=style_weight, negative_style=negative_style,
                                   lora_strength=lora_strength, embeds_scaling=embeds_scaling,
                                   style_blocks=style_blocks, style_block_weights=style_block_weights,
                                   unfold_batch=unfold_batch, blend=image_text_blend,
                                   prompt_embeds=pooled_prompt(prompt), reports=reports)
        return io.NodeOutput(patched, "\n".join(reports))
