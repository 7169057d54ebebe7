"""What the training loop says about its speed: pairs/s and model FLOPs utilisation (MFU) over the
steps between two progress reports, and over the whole attempt for run.json."""

from __future__ import annotations

import math
import time

import torch

from raykit.config import JobConfig
from raykit.encoder import Encoder
from raykit.flops import ModelFlops, mfu, peak_flops
from raykit.precision import use_bf16


class Throughput:
    """pairs/s and MFU over the steps since the last report: report time counts against them, evaluation
    time doesn't. MFU needs the device's peak (raykit/flops.py); without one it is left out."""

    def __init__(self, job: JobConfig, world: int, total_steps: int, encoder: Encoder, device):
        self.global_batch, self.total_steps, self.world = job.train.batch_size * world, total_steps, world
        self.model_flops = ModelFlops(encoder.model, encoder.model.config)
        self.frozen_base = job.train.strategy == "lora"  # no weight gradients but the adapters'
        self.peak = peak_flops(device, use_bf16(job.train.precision, device), job.scaling.peak_tflops)
        self.started = self.window_start = self.reported_at = time.perf_counter()
        self.steps = self.total = 0
        self.flops = self.total_flops = 0.0  # this rank's model FLOPs: in the window, in all
        self.evaluating = 0.0  # seconds of evaluation inside the run, left out of its rates
        self.pairs_per_s = 0.0

    def add_step(self, lengths: torch.Tensor) -> None:
        """One step done, on texts of these token counts."""
        flops = self.model_flops.training(lengths, self.frozen_base)
        self.steps += 1
        self.total += 1
        self.flops += flops
        self.total_flops += flops

    def rates(self, window_flops: float) -> dict[str, float]:
        """The window's rates; `window_flops`: every rank's FLOPs in it."""
        self.reported_at = time.perf_counter()
        seconds = self.reported_at - self.window_start
        self.pairs_per_s = self.steps * self.global_batch / seconds
        rates = {"pairs_per_s": self.pairs_per_s, "elapsed_s": self.reported_at - self.started}
        if (used := mfu(window_flops, seconds, self.peak, self.world)) is not None:
            rates["mfu"] = used
        return rates

    def summary(self, total_flops: float) -> dict:
        """This attempt's training as a whole (evaluation left out), for run.json; `total_flops`: every rank's."""
        seconds = max(self.elapsed() - self.evaluating, 1e-9)
        return {"pairs_per_s": round(self.total * self.global_batch / seconds, 2),
                "flops_per_pair": round(total_flops / max(self.total * self.global_batch, 1)),
                "peak_tflops_per_worker": self.peak / 1e12 if self.peak else None,
                "mfu": mfu(total_flops, seconds, self.peak, self.world)}

    def eta(self, step: int) -> float:
        return (self.total_steps - step) * self.global_batch / self.pairs_per_s if self.pairs_per_s else math.inf

    def restart(self, eval_s: float) -> None:
        """The next window starts at the report, moved past the evaluation that followed it."""
        self.window_start, self.steps, self.flops = self.reported_at + eval_s, 0, 0.0
        self.evaluating += eval_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
