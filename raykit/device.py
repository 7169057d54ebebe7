"""The device a raykit process computes on, the process-wide CUDA settings it runs with, and how a
model is compiled for it (scaling.compile, embed.compile).

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

import os
import shutil
import socket

import torch
from torch import nn

from raykit.errors import RaykitError


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


def check_compiler(key: str, device: torch.device | str) -> None:
    """torch.compile builds its kernels with this machine's compilers: Inductor's CPU kernels with a C++
    one (g++, or $CXX), Triton's GPU kernels' launchers with a C one ($CC, cc, gcc or clang). Without
    one, one line naming `key` (scaling.compile, embed.compile), not the compiler's traceback at the
    first step of every worker."""
    if torch.device(device).type == "cuda":
        if os.environ.get("CC") or any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
            return
        missing = "a C compiler (cc, gcc or clang; or $CC), which Triton builds its GPU kernels' launchers with"
    else:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
            return
        except InvalidCxxCompiler:
            missing = "a C++ compiler (g++, or $CXX), which Inductor builds its CPU kernels with"
    raise RaykitError(f"{key}: torch.compile needs {missing}, and {socket.gethostname()} has none; "
                      f"install one there (e.g. apt-get install g++), or set {key}=false")


def compiled(model: nn.Module, key: str) -> nn.Module:
    """`model` with its forward compiled by torch.compile (TorchInductor), in place: its state_dict,
    checkpoints and exports keep their names (torch.compile(model) would return a wrapper whose keys
    all start with `_orig_mod.`). Returns `model`.

    What it buys: one fused kernel for runs of elementwise work (layer norms, GELU, dropout, residual
    adds, autocast's casts) that eager PyTorch launches one by one, each reading and writing the whole
    activation; on a GPU with a small model that traffic and the launches are most of a step. Shapes
    are dynamic from the first graph: text batches change width almost every batch, and a static first
    graph would be compiled again at the second. Each mode compiles at its first call (training, a
    gradient cache's pass without gradients, evaluation with LoRA merged), so the first steps and the
    first evaluation take the compiler's time (all-MiniLM-L6-v2 on 2 CPU cores: 1.5 to 2.5 minutes for
    its training graphs, half a minute for embedding's; bench/compile.py), kept in Inductor's disk cache
    (TORCHINDUCTOR_CACHE_DIR) for the next process on the machine with the same graph and thread count.
    `key`: the setting that asked for it, named if this machine cannot compile (check_compiler)."""
    check_compiler(key, next(model.parameters()).device)
    model.compile(dynamic=True)
    return model
