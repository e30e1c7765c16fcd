"""FaceStudio Train Adapter and FaceStudio Save Adapter: training/run.py on a prepared dataset, in the graph."""
from comfy_api.latest import io

from ..training.adapter_file import save_weights
from ..training.run import Licences, adapter_path_for, train_adapter
from ..training.trainer import OPTIMIZERS, TrainingSettings
from .types import FaceStudioAdapter, FaceStudioDataset

LossMap = io.Custom("LOSS_MAP")  # the host's LossGraphNode input: {"loss": [one value per step]}

_LICENCE_TIP = ("Recorded in the adapter file, for whoever uses it. A trained file inherits the terms of its "
                "data and of the face models that made the embeddings: FFHQ is CC BY-NC-SA 4.0, insightface's "
                "model packs (buffalo_l, antelopev2) are for non-commercial research only.")


class FaceStudioTrainAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioTrainAdapter",
            display_name="FaceStudio Train Adapter",
            category="FaceStudio/training",
            description="Trains a FaceStudio adapter (the paper's fused image/text + identity tokens in decoupled "
                        "cross-attention) on a prepared face dataset, with the model frozen. Writes the adapter "
                        "to models/ipadapter/<adapter_name>.safetensors and its resumable state beside it.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.5 or SDXL); it stays unchanged."),
                FaceStudioDataset.Input("dataset", tooltip="From FaceStudio Prepare Dataset, with this model's CLIP."),
                io.String.Input("adapter_name", default="facestudio/my_adapter",
                                tooltip="File name in models/ipadapter (sub-folders allowed); '.safetensors' is "
                                        "added. Written every save_every steps and at the end, with "
                                        "'<name>.state.pt' beside it for resuming."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000,
                             tooltip="Total optimizer steps of the run (a resumed run continues to this count)."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Examples per step."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="The optimizer's learning rate."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW",
                               tooltip="AdamW (weight decay 0.01, as IP-Adapter was trained), Adam, or SGD with "
                                       "momentum 0.9."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seeds the adapter's initial weights and every draw of the run (examples, "
                                     "noise levels, noise, dropout): the same seed repeats the run exactly."),
                io.Int.Input("save_every", default=250, min=0, max=1_000_000,
                             tooltip="Write the adapter and its state every this many steps (0: at the end only)."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue the run saved under adapter_name from its last save, exactly "
                                         "(the same settings; only 'steps' may grow)."),
                io.Float.Input("style_dropout", default=0.64, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of examples trained on the text + identity path instead of the image + "
                                       "identity one (the paper's 0.64)."),
                io.Float.Input("face_dropout", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of examples trained without their face (the paper's 0.1), so "
                                       "guidance also works with the prompt or image alone."),
                io.Int.Input("num_tokens", default=4, min=1, max=64,
                             tooltip="Context tokens per person (a new run only; a resumed one keeps its own)."),
                io.String.Input("dataset_licence", default="", tooltip="The dataset's licence. " + _LICENCE_TIP),
                io.String.Input("face_models_licence", default="",
                                tooltip="The face models' licence. " + _LICENCE_TIP),
            ],
            outputs=[FaceStudioAdapter.Output(display_name="adapter",
                                              tooltip="The trained adapter, for FaceStudio Apply straight away."),
                     LossMap.Output(display_name="loss_map", tooltip="The loss of every step, for Plot Loss Graph."),
                     io.Int.Output(display_name="steps", tooltip="Steps trained in all.")],
        )

    @classmethod
    def execute(cls, model, dataset, adapter_name: str, steps: int, batch_size: int, learning_rate: float,
                optimizer: str, seed: int, save_every: int, resume: bool, style_dropout: float, face_dropout: float,
                num_tokens: int, dataset_licence: str = "", face_models_licence: str = "") -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        settings = TrainingSettings(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                    optimizer=optimizer, seed=seed, style_dropout=style_dropout,
                                    face_dropout=face_dropout)
        bar = comfy.utils.ProgressBar(steps)

        def on_step(step: int, loss: float) -> None:
            bar.update_absolute(step, steps)
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel stops at the next step

        result = train_adapter(model, dataset, settings, adapter_path_for(adapter_name), resume=resume,
                               save_every=save_every, num_tokens=num_tokens,
                               licences=Licences(dataset_licence.strip(), face_models_licence.strip()), on_step=on_step)
        return io.NodeOutput(result.adapter, result.loss_map, result.state.step)


class FaceStudioSaveAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceStudioSaveAdapter",
            display_name="FaceStudio Save Adapter",
            category="FaceStudio/training",
            description="Saves a FaceStudio-trained adapter to models/ipadapter under a name of your choice, with "
                        "its header (recognizer, encoders, training settings, licences).",
            inputs=[
                FaceStudioAdapter.Input("adapter", tooltip="From FaceStudio Train Adapter (or Load Adapter)."),
                io.String.Input("adapter_name", default="facestudio/my_adapter_final",
                                tooltip="File name in models/ipadapter (sub-folders allowed); '.safetensors' is added."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of that name; off, an existing file is kept and the node "
                                         "says so."),
            ],
            outputs=[io.String.Output(display_name="file", tooltip="The file written, inside models/ipadapter.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, adapter, adapter_name: str, overwrite: bool) -> io.NodeOutput:
        path = adapter_path_for(adapter_name)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists already: choose another adapter_name, or turn 'overwrite' on to "
                                  "replace it.")
        save_weights(adapter, path)
        return io.NodeOutput(str(path), ui={"text": [f"Saved {path.name}"]})
