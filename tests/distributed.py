"""Run a function in 2 real processes joined by a gloo process group (no Ray: just torch.distributed)."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_two(fn, *args) -> None:
    """fn(rank, *args) in two processes; fn must live at module level (spawn pickles it by name)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(fn, port, args), nprocs=2, join=True)
