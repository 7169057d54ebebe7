"""Model FLOPs utilisation (MFU): the FLOPs a model's forward (and backward) passes need for the tokens
they were given, against what the accelerator could do in that time. One count for training and
embedding.

FLOPs of one sequence of s real tokens (padding is not useful work, so it shows as lost utilisation):
    forward = 2 * W * s + 4 * L * A * s**2
W: weights of the matrix multiplies (every Linear of the transformer, LoRA adapters included; not the
embedding lookups, nor a BERT pooler that runs once per sequence); L layers; A the attention width
(heads x head size). The second term is attention's QK^T and AV. Training counts 3x the forward for
full fine-tuning (the backward computes gradients of activations and of weights); for LoRA the weights'
term counts 2x (the frozen base needs no weight gradients) and attention's still 3x (it has no
weights: its backward is all activation gradients). Re-computed forwards (gradient checkpointing, gradient
caching) are not model FLOPs, so they lower MFU, as they cost time: this is MFU, not hardware FLOPs
utilisation.

The peak is the accelerator's dense tensor rate at the precision that runs, from the table below, or
the job's `peak_tflops` where raykit does not know the device (CPUs among them): MFU is then None.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense (no sparsity) peak TFLOPS per device: (bf16 tensor cores, fp32 without TF32: torch's default
# for matmuls). Matched against torch.cuda.get_device_name(), first match wins.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("B200", 2250.0, 80.0),
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
)


def peak_flops(device: torch.device, bf16: bool, peak_tflops: float = 0.0) -> float | None:
    """FLOP/s one device can do at the precision in use: the job's figure if it gives one, else the
    table's for a GPU it names; None where neither knows (MFU is then not reported)."""
    if peak_tflops:
        return peak_tflops * 1e12
    return table_peak(torch.cuda.get_device_name(device), bf16) if device.type == "cuda" else None


def table_peak(device_name: str, bf16: bool) -> float | None:
    """The table's FLOP/s for a device of this name (as CUDA reports it), or None."""
    for key, bf16_tflops, fp32_tflops in PEAK_TFLOPS:
        if key in device_name:
            return (bf16_tflops if bf16 else fp32_tflops) * 1e12
    return None


class ModelFlops:
    """FLOPs of a model's passes over sequences of given lengths (see the module's docstring)."""

    def __init__(self, model: nn.Module, config):
        # ds_numel: a weight ZeRO-3 has partitioned holds none of its elements locally
        self.weights = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for name, m in model.named_modules()
                           if isinstance(m, nn.Linear) and "pooler" not in name.split("."))
        heads = getattr(config, "num_attention_heads", 0) or 0
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
        self.layers = getattr(config, "num_hidden_layers", 0) or 0
        self.attention_width = heads * head_dim

    def forward(self, lengths: torch.Tensor) -> float:
        """Forward FLOPs over sequences of these real token counts (one per sequence)."""
        return sum(self._terms(lengths))

    def training(self, lengths: torch.Tensor, frozen_base: bool) -> float:
        """Forward and backward FLOPs; `frozen_base`: LoRA, no gradients for the base's weights."""
        weights, attention = self._terms(lengths)
        return (2 if frozen_base else 3) * weights + 3 * attention

    def _terms(self, lengths: torch.Tensor) -> tuple[float, float]:
        s = lengths.double()
        return float(2 * self.weights * s.sum()), float(4 * self.layers * self.attention_width * (s * s).sum())


def mfu(flops: float, seconds: float, peak: float | None, devices: int = 1) -> float | None:
    """The share of `devices` accelerators' peak that `flops` in `seconds` used; None without a peak."""
    if not peak or seconds <= 0:
        return None
    return flops / (seconds * peak * devices)
