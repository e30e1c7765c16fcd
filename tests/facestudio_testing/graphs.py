"""API-format graphs (what POST /prompt and the in-process host take) for the tests.

`txt2img` builds CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler ->
VAEDecode -> SaveImage (or -> SaveLatent). Later tests splice their nodes in between the loader
and the sampler with `insert_model_node`, which rewires the sampler to the new node's MODEL.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

Link = list  # [node id, output index], the API format's edge


@dataclass
class Graph:
    prompt: dict[str, dict] = field(default_factory=dict)
    # Named node ids, e.g. "checkpoint", "sampler", "save".
    nodes: dict[str, str] = field(default_factory=dict)

    def add(self, class_type: str, inputs: dict, name: str | None = None) -> str:
        node_id = str(max((int(i) for i in self.prompt if i.isdigit()), default=0) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        if name is not None:
            self.nodes[name] = node_id
        return node_id

    def __getitem__(self, name: str) -> str:
        return self.nodes[name]

    def link(self, name: str, output: int = 0) -> Link:
        return [self.nodes[name], output]

    # --- the text-to-image graph's wires ------------------------------------------------------
    @property
    def model(self) -> Link:
        """The MODEL the sampler uses now (the loader's, or the last inserted node's)."""
        return list(self.prompt[self.nodes["sampler"]]["inputs"]["model"])

    @property
    def clip(self) -> Link:
        return self.link("checkpoint", 1)

    @property
    def vae(self) -> Link:
        return self.link("checkpoint", 2)

    def insert_model_node(self, class_type: str, inputs: dict | None = None, model_input: str = "model",
                          model_output: int = 0, name: str | None = None) -> str:
        """Adds a node that takes the sampler's current MODEL on `model_input` and feeds its
        output `model_output` to the sampler instead; returns its id. Calls chain in order."""
        node_id = self.add(class_type, {**(inputs or {}), model_input: self.model}, name)
        self.prompt[self.nodes["sampler"]]["inputs"]["model"] = [node_id, model_output]
        return node_id

    def copy(self) -> "Graph":
        return copy.deepcopy(self)

    def set(self, name: str, **inputs) -> "Graph":
        """Sets widget inputs of a named node, e.g. g.set("sampler", seed=3); returns self."""
        self.prompt[self.nodes[name]]["inputs"].update(inputs)
        return self


def txt2img(checkpoint: str, *, width: int = 64, height: int = 64, steps: int = 2, seed: int = 0,
            cfg: float = 7.0, sampler_name: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
            positive: str = "a photo of a person", negative: str = "blurry", batch_size: int = 1,
            output: str = "image", filename_prefix: str = "facestudio_test") -> Graph:
    """The host's default text-to-image graph. `output`: "image" (VAEDecode -> SaveImage),
    "latent" (SaveLatent: the sampler's latent, no decoding) or "none" (add your own output node)."""
    g = Graph()
    g.add("CheckpointLoaderSimple", {"ckpt_name": checkpoint}, "checkpoint")
    g.add("CLIPTextEncode", {"text": positive, "clip": g.clip}, "positive")
    g.add("CLIPTextEncode", {"text": negative, "clip": g.clip}, "negative")
    g.add("EmptyLatentImage", {"width": width, "height": height, "batch_size": batch_size}, "latent")
    g.add("KSampler", {
        "model": g.link("checkpoint", 0), "positive": g.link("positive"), "negative": g.link("negative"),
        "latent_image": g.link("latent"), "seed": seed, "steps": steps, "cfg": cfg,
        "sampler_name": sampler_name, "scheduler": scheduler, "denoise": denoise,
    }, "sampler")
    if output == "image":
        g.add("VAEDecode", {"samples": g.link("sampler"), "vae": g.vae}, "decode")
        g.add("SaveImage", {"images": g.link("decode"), "filename_prefix": filename_prefix}, "save")
    elif output == "latent":
        g.add("SaveLatent", {"samples": g.link("sampler"), "filename_prefix": filename_prefix}, "save")
    elif output != "none":
        raise ValueError(f"output must be 'image', 'latent' or 'none', not {output!r}")
    return g
