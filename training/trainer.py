"""The training loop: batches from an encoded dataset, one optimizer step per batch, and a state that
resumes exactly.

Everything random comes from one torch.Generator seeded by `seed` (the batches' examples, then
objective.training_loss's draws), so the state after step k is (adapter weights, optimizer state,
generator state, step, loss history): `TrainingState`, kept in a file of its own beside the adapter
(the host's LoRA resume keeps only weights and a step count, which cannot continue a run exactly).
Resuming from it gives the same loss curve as the uninterrupted run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .objective import Dropout, NO_DROPOUT, TrainingBatch, training_loss
from .trainable_adapter import TrainableAdapter

__all__ = ["TrainingSettings", "TrainingState", "train", "evaluate", "OPTIMIZERS", "save_state", "load_state"]

OPTIMIZERS = ("AdamW", "Adam", "SGD")
STATE_FORMAT = "facestudio-training-state"


@dataclass(frozen=True)
class TrainingSettings:
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-4
    optimizer: str = "AdamW"
    weight_decay: float = 0.01
    seed: int = 0
    style_dropout: float = 0.64
    face_dropout: float = 0.1

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer '{self.optimizer}': choose one of {', '.join(OPTIMIZERS)}.")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"'{name}' must be at least 1, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"'learning_rate' must be above 0, got {self.learning_rate}.")
        for name in ("style_dropout", "face_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"'{name}' is a probability (0..1), got {getattr(self, name)}.")

    @property
    def dropout(self) -> Dropout:
        return Dropout(self.style_dropout, self.face_dropout)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingState:
    step: int
    optimizer: dict
    generator: torch.Tensor
    losses: dict[int, float] = field(default_factory=dict)  # step -> that step's batch loss


def _optimizer(settings: TrainingSettings, params) -> torch.optim.Optimizer:
    if settings.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if settings.optimizer == "Adam":
        return torch.optim.Adam(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.learning_rate, weight_decay=settings.weight_decay, momentum=0.9)


def train(model, adapter: TrainableAdapter, data: TrainingBatch, settings: TrainingSettings,
          resume: TrainingState | None = None, until: int | None = None,
          on_step: Callable[[int, float], None] | None = None, device: torch.device | None = None) -> TrainingState:
    """Train `adapter` in place on `data` with `model` frozen, from step 0 (or `resume`'s step) to
    `until` (default settings.steps); returns the state after the last step."""
    if len(data) == 0:
        raise ValueError("The dataset holds no examples.")
    adapter.train().requires_grad_(True)
    optimizer = _optimizer(settings, adapter.parameters())
    generator = torch.Generator().manual_seed(settings.seed)
    state = TrainingState(0, {}, generator.get_state(), {})
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.generator)
        state = TrainingState(resume.step, {}, resume.generator, dict(resume.losses))
    end = settings.steps if until is None else min(until, settings.steps)
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(state.step, end):
            index = torch.randint(len(data), (min(settings.batch_size, len(data)),), generator=generator)
            loss = training_loss(model, adapter, data.map(lambda t: t[index]), generator, settings.dropout, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.losses[step + 1] = float(loss.detach())
            if on_step is not None:
                on_step(step + 1, state.losses[step + 1])
            state.step = step + 1
    adapter.eval().requires_grad_(False)
    state.optimizer, state.generator = optimizer.state_dict(), generator.get_state()
    return state


@torch.no_grad()
def evaluate(model, adapter: TrainableAdapter, data: TrainingBatch, seed: int = 1234, repeats: int = 4,
             device: torch.device | None = None) -> float:
    """The mean loss over `data` (each example `repeats` times, at noise levels and noise drawn from
    `seed`), without dropout, half of the repeats on each path (image + identity, text + identity)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for r in range(repeats):
        # Each repeat draws its own noise; the path is chosen by the repeat, not drawn.
        dropout = NO_DROPOUT if r % 2 == 0 else Dropout(style=1.0, face=0.0)
        total += float(training_loss(model, adapter, data, generator, dropout, device))
    return total / repeats


def save_state(state: TrainingState, settings: TrainingSettings, path: str | Path) -> None:
    """The state beside the adapter file (`<adapter>.state.pt`), written whole or not at all."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"format": STATE_FORMAT, "step": state.step, "optimizer": state.optimizer,
                "generator": state.generator, "losses": state.losses, "settings": settings.as_dict()}, tmp)
    tmp.replace(path)


def load_state(path: str | Path, settings: TrainingSettings) -> TrainingState:
    """A state saved by save_state; ValueError when it is not one, or was made with other settings
    (a resumed run with other settings would not continue the same run)."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable for any reason: the same advice
        raise ValueError(f"{path} is not a FaceStudio training state ({type(e).__name__}: {str(e)[:200]}).") from None
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a FaceStudio training state (saved next to an adapter as <name>.state.pt).")
    saved = raw.get("settings", {})
    changed = {k: (saved.get(k), v) for k, v in settings.as_dict().items() if k != "steps" and saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items())
        raise ValueError(f"{path} was saved by a run with other settings ({listed}): resume with the same "
                         "settings (only 'steps' may grow), or start a new run.")
    return TrainingState(int(raw["step"]), raw["optimizer"], raw["generator"],
                         {int(k): float(v) for k, v in raw["losses"].items()})
