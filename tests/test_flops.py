"""MFU's FLOP count (raykit/flops.py) against PyTorch's own FLOP counter, which counts every matrix
multiply that actually runs: forward, full fine-tuning's backward, and LoRA's (no weight gradients)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from raykit.config import LoraConfig, ModelConfig
from raykit.encoder import Encoder
from raykit.flops import ModelFlops, mfu, peak_flops, table_peak
from raykit.strategies.lora import apply_lora

TEXTS = ["a short query", "a document that is a good deal longer than the query before it, " * 3]


def counted(encoder: Encoder, backward: bool) -> tuple[float, torch.Tensor]:
    """PyTorch's count of one pass over TEXTS (each text alone: no padding), and their lengths."""
    lengths, total = [], 0.0
    for text in TEXTS:
        tokens = encoder.tokenize([text], role="document")
        lengths.append(int(tokens["attention_mask"].sum()))
        with FlopCounterMode(display=False) as counter:
            out = encoder(**tokens)
            if backward:
                out.sum().backward()
        total += counter.get_total_flops()
    return total, torch.tensor(lengths)


def test_forward_and_training_flops_match_what_pytorch_counts(tiny_model):
    encoder = Encoder.load(ModelConfig(name=tiny_model))
    # eager attention: PyTorch's counter does not see the CPU kernel of SDPA, which does the same multiplies
    encoder.model.set_attn_implementation("eager")
    flops = ModelFlops(encoder.model, encoder.model.config)
    assert flops.weights == 2 * (4 * 32 * 32 + 2 * 32 * 64)  # 2 layers: Q, K, V, O and the two FFN matrices
    # the BERT pooler's one d x d multiply per sequence is left out: within 1%
    forward, lengths = counted(encoder, backward=False)
    assert flops.forward(lengths) == pytest.approx(forward, rel=0.01)
    full, _ = counted(encoder, backward=True)
    assert flops.training(lengths, frozen_base=False) == pytest.approx(full, rel=0.02)

    apply_lora(encoder, LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=("query", "key", "value", "dense")))
    lora = ModelFlops(encoder.model, encoder.model.config)
    frozen, _ = counted(encoder, backward=True)
    assert lora.training(lengths, frozen_base=True) == pytest.approx(frozen, rel=0.05)  # adapters: a few % more


def test_mfu_needs_a_peak_from_the_table_or_the_job():
    cpu = torch.device("cpu")
    assert peak_flops(cpu, bf16=True) is None and mfu(1e12, 1.0, None) is None
    assert peak_flops(cpu, bf16=True, peak_tflops=2.0) == 2e12
    assert mfu(1e12, 1.0, 2e12, devices=2) == pytest.approx(0.25)


@pytest.mark.parametrize("name, bf16, tflops", [("NVIDIA H100 80GB HBM3", True, 989.0), ("NVIDIA H100 PCIe", True, 756.0),
                                                ("NVIDIA A100-SXM4-80GB", False, 19.5), ("NVIDIA L40", True, 181.0),
                                                ("NVIDIA L40S", True, 362.0), ("NVIDIA L4", True, 121.0), ("Tesla T4", True, None)])
def test_the_peak_table_tells_apart_devices_whose_names_contain_each_other(name, bf16, tflops):
    assert table_peak(name, bf16) == (tflops * 1e12 if tflops else None)
