"""AdamW with linear warmup then cosine decay to zero: the schedule both strategies share."""

from __future__ import annotations

import math

import torch

from raykit.config import TrainConfig


def adamw(params, cfg: TrainConfig, optimizer_cls=torch.optim.AdamW) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    # No weight decay on biases and LayerNorm weights (1-d tensors), as in BERT's recipe.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return optimizer_cls([g for g in groups if g["params"]], lr=cfg.lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
