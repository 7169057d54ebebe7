"""AdamW and the learning-rate schedule that both strategies share."""

from __future__ import annotations

import torch

from raykit.config import TrainConfig

# train.scheduler -> transformers' name; each ramps up linearly over warmup_ratio of the steps first.
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def adamw(params, cfg: TrainConfig, optimizer_cls=torch.optim.AdamW) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    # No weight decay on biases and LayerNorm weights (1-d tensors), as in BERT's recipe.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return optimizer_cls([g for g in groups if g["params"]], lr=cfg.lr)


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """transformers' schedule of the same name: what the HF and sentence-transformers trainers run."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[cfg.scheduler], optimizer, num_warmup_steps=int(total_steps * cfg.warmup_ratio),
                         num_training_steps=total_steps)
