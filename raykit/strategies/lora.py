"""LoRA through peft: adapters on a frozen base, trained data-parallel with DDP.

The exported model has the adapters merged into the weights (it loads without peft, with zero serving
overhead); the adapter is also saved on its own, for swapping onto the base model.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import peft
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raykit.config import JobConfig, LoraConfig
from raykit.encoder import Encoder
from raykit.errors import ConfigError
from raykit.optim import adamw, lr_schedule
from raykit.strategies import Anchor

POOLER = r".*pooler.*"


def apply_lora(encoder: Encoder, cfg: LoraConfig) -> None:
    """Replace `encoder.model` with a peft model whose only trainable weights are the adapters."""
    check_target_modules(encoder.model, cfg.target_modules)
    lora = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        exclude_modules=POOLER,  # its output is unused (see Encoder.load): an adapter there never trains
        bias="none",
    )
    # transformers' model.add_adapter insists on a newer peft; get_peft_model is the stable entry point.
    encoder.model = peft.get_peft_model(encoder.model, lora)


def check_target_modules(model: nn.Module, targets) -> None:
    """Fail on a target that matches no Linear layer, listing the names that would."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not re.fullmatch(POOLER, n)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in names} | {".".join(n.rsplit(".", 2)[-2:]) for n in names})
            raise ConfigError(
                f"lora.target_modules: '{target}' matches no Linear layer of this model; "
                f"valid names: {', '.join(suffixes)}"
            )


def export_lora(encoder: Encoder, path: str) -> None:
    """Write `path` (merged model, sentence-transformers layout) and `path`/../adapter (peft)."""
    encoder.model.save_pretrained(Path(path).parent / "adapter")
    merged = encoder.model.merge_and_unload()
    out = Encoder(merged, encoder.tokenizer, encoder.pooling, encoder.normalize, encoder.max_seq_length, encoder.prompts)
    out.base_config = encoder.base_config
    out.save(path)


class LoraTrainee:
    def __init__(self, encoder: Encoder, job: JobConfig, total_steps: int, device: torch.device, bf16: bool):
        apply_lora(encoder, job.lora)
        self.encoder = encoder.to(device)
        self.device = device
        self.bf16 = bf16
        self.max_grad_norm = job.train.max_grad_norm
        self.params = [p for p in encoder.parameters() if p.requires_grad]
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.module = (
            DistributedDataParallel(encoder, device_ids=[device] if device.type == "cuda" else None)
            if distributed
            else encoder
        )
        self.optimizer = adamw(self.params, job.train)
        self.scheduler = lr_schedule(self.optimizer, job.train, total_steps)
        self.anchor = Anchor(self.params) if job.train.l2sp else None

    def drift(self) -> torch.Tensor:
        return self.anchor.drift()

    def __call__(self, batch):
        # bf16 autocast on GPUs, and on CPUs with AMX when train.precision=bf16 asks for it
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            return self.module(**batch)

    def accumulating(self):
        """Backward passes whose gradients add up, reduced across workers with the next one outside."""
        return self.module.no_sync() if self.module is not self.encoder else contextlib.nullcontext()

    @contextlib.contextmanager
    def evaluating(self):
        """The adapters merged into the base weights: a plain model's forward, without the adapters'
        extra multiplies and dropout. The base weights are restored bit for bit after (peft's unmerge
        subtracts the update again, which rounds, and would move the frozen base at every evaluation)."""
        layers = [m for m in self.encoder.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        saved = [(m.get_base_layer().weight, m.get_base_layer().weight.detach().clone()) for m in layers]
        with torch.no_grad():
            self.encoder.model.merge_adapter()
        try:
            yield
        finally:
            self.encoder.model.unmerge_adapter()
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss: torch.Tensor | None) -> torch.Tensor:
        """Back-propagate `loss` (None: the gradients are in place) and update the weights. Returns
        the gradient norm before clipping, on the device: read at a report, since reading it
        (float()) makes the host wait for the GPU's queued work."""
        if loss is not None:
            self.backward(loss)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, path: str, rank: int) -> None:
        if rank != 0:  # DDP keeps every replica identical: one copy is the whole state
            return
        trainable = {n: p.detach().cpu() for n, p in self.encoder.named_parameters() if p.requires_grad}
        state = {"trainable": trainable, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        torch.save(state, Path(path) / "lora_state.pt")

    def load_state(self, path: str) -> None:
        # weights_only: tensors and plain containers, never pickled code (whoever can write the
        # checkpoint folder must not get to run code on the workers).
        state = torch.load(Path(path) / "lora_state.pt", map_location=self.device, weights_only=True)
        missing = self.encoder.load_state_dict(state["trainable"], strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export(self, path: str, rank: int) -> None:
        if rank == 0:
            export_lora(self.encoder, path)
