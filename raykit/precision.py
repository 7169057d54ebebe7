"""One rule for bf16, shared by training, evaluation and embedding.

`auto` means bf16 where the hardware multiplies in bf16 natively, so that it is faster than fp32:
CUDA GPUs with bf16 (Ampere and newer) and CPUs with Intel AMX tiles (Sapphire Rapids and newer).
Elsewhere (older GPUs, CPUs without AMX) bf16 is emulated and slower than fp32, so `auto` is fp32.
"""

from __future__ import annotations

import torch

CHOICES = ("auto", "bf16", "fp32")


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return bool(amx())
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to run in bf16: asked for outright, or `auto` on hardware where it is fast."""
    if precision == "auto":
        return bf16_is_fast(device)
    return precision == "bf16"
