"""The device a raykit process computes on, and the process-wide CUDA settings it runs with.

cuDNN's fused attention, one of PyTorch's scaled-dot-product-attention backends and the one torch 2.11
takes on an H200 for padded batches, builds an execution plan for every new input shape: ~18 ms of
host time for each layer's forward, as much for its backward. Text batches come in a new shape
almost every batch (the longest text sets the width), so until every shape has been seen it is the
slow path. On the H200 check
(`bench/gpu_check.py --parts sdpa`) an encoder actor's first pass over a shard ran at 984 docs/s with
it and 18,125 without, and LoRA trained at 254 pairs/s against 537; once every shape had been seen it
was no faster (24,325 docs/s against 25,687). Without it PyTorch takes flash or memory-efficient
attention, which need no plan.
"""

from __future__ import annotations

import torch


def configure(device: torch.device | str) -> torch.device:
    """Set this process up to compute on `device` (a Ray Train worker's, say); returns it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def local_device() -> torch.device:
    """This process's GPU where it has one (a Ray actor sees only the GPUs it was given), else the CPU;
    set up by configure()."""
    return configure("cuda" if torch.cuda.is_available() else "cpu")
