"""Training strategies: how a worker holds, steps, checkpoints and exports the model.

`lora`: peft adapters on a frozen base, data-parallel with DDP. `full`: every weight, under DeepSpeed
ZeRO. Both expose the same small surface to the training loop (`Trainee`), so the loop reads the same.
"""

from __future__ import annotations

from typing import Protocol

import torch

from raykit.config import JobConfig
from raykit.device import compiled
from raykit.encoder import Encoder


class Trainee(Protocol):
    encoder: Encoder  # the plain module, for evaluation and export
    module: torch.nn.Module  # what the forward pass runs through (DDP or a DeepSpeed engine)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def accumulating(self): ...  # backward passes inside add up; reduced across workers with the next outside
    def evaluating(self): ...  # a context the model is evaluated in (LoRA: adapters merged, restored after)
    def step(self, loss: torch.Tensor | None) -> float: ...  # None: the gradients are in place
    @property
    def lr(self) -> float: ...
    def save_state(self, path: str, rank: int) -> None: ...
    def load_state(self, path: str) -> None: ...
    def export(self, path: str, rank: int) -> None: ...
    def drift(self) -> torch.Tensor: ...  # L2-SP: sum ||w - w0||^2 over the trained weights


class Anchor:
    """L2-SP's reference point: the trained weights as they were before the first step.

    Costs one copy of the trained weights per worker (for LoRA, only the adapters).
    """

    def __init__(self, params):
        self.pairs = [(p, p.detach().clone()) for p in params if p.requires_grad]

    def drift(self) -> torch.Tensor:
        return sum(((p.float() - p0.float()) ** 2).sum() for p, p0 in self.pairs)


def build_trainee(encoder: Encoder, job: JobConfig, total_steps: int, device: torch.device, bf16: bool) -> Trainee:
    # Training mode from the first step (dropout on, as sentence-transformers trains): a loaded model is in
    # eval mode, and before this only a run that evaluated the base first trained in training mode.
    encoder.train()
    if job.train.gradient_checkpointing:
        # non-reentrant: exact gradients, with frozen inputs (LoRA) and under DeepSpeed alike
        encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if job.train.strategy == "lora":
        from raykit.strategies.lora import LoraTrainee

        trainee = LoraTrainee(encoder, job, total_steps, device, bf16)
    else:
        from raykit.strategies.full import DeepSpeedTrainee

        trainee = DeepSpeedTrainee(encoder, job, total_steps, device, bf16)
    if job.scaling.compile:
        # the whole encoder (peft's adapters, pooling and normalization with the transformer), inside
        # DDP or the DeepSpeed engine, whose gradient hooks run as they would without it
        compiled(trainee.encoder, "scaling.compile")
    return trainee
