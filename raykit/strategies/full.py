"""Full fine-tuning under DeepSpeed ZeRO (stages 1-3, optional CPU offload).

The DeepSpeed config is derived from the job's train and deepspeed sections; no value is written
twice. Our own AdamW and warmup-cosine schedule go in as client objects, so both strategies train
with the same optimizer and schedule.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from raykit.config import DeepSpeedConfig, JobConfig, TrainConfig
from raykit.encoder import Encoder
from raykit.optim import adamw, lr_schedule
from raykit.strategies import Anchor

CHECKPOINT_TAG = "zero"


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, bf16: bool) -> dict:
    """The DeepSpeed config dict for this job (micro batch, clipping, precision, ZeRO stage, offload)."""
    pin = torch.cuda.is_available()  # pinned host memory speeds GPU<->CPU copies; there is none without a GPU
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW, which ZeRO shards like any other
        "steps_per_print": 2**31 - 1,  # our loop prints progress; keep DeepSpeed's own quiet
    }


def _deepspeed_checkpoint_types() -> list:
    """The only non-tensor types DeepSpeed's ZeRO checkpoints hold: plain data classes and an enum."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only(checkpoint_engine):
    """DeepSpeed loads its files with `weights_only=False`: whoever can write the checkpoint folder could
    run code on every worker. Its engine's load reads them with `weights_only=True` instead, allowing
    only the types it saves."""
    load = checkpoint_engine.load

    def safe_load(path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = safe_load
    try:
        yield
    finally:
        checkpoint_engine.load = load


def _skip_shared_memory_allreduce_build() -> None:
    """On CPU workers, DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce op
    (`deepspeed_shm_comm`) as it starts: one to two minutes of a core, on every fresh machine or pod.
    Only DeepSpeed's inference all-reduce (tensor-parallel serving) uses that op; ZeRO training
    communicates through torch.distributed (gloo). Marked unavailable, it is not built. DeepSpeed keeps
    one probed dict of compatible ops for the process, and edits to it persist (deepspeed/ops/__init__.py)."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


class DeepSpeedTrainee:
    def __init__(self, encoder: Encoder, job: JobConfig, total_steps: int, device: torch.device, bf16: bool):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.encoder = encoder.to(device)
        self.stage = job.deepspeed.zero_stage
        optimizer_cls = torch.optim.AdamW
        if job.deepspeed.offload_optimizer:
            # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed's vectorized CPU Adam is the fast one.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer_cls = DeepSpeedCPUAdam
        optimizer = adamw(encoder.parameters(), job.train, optimizer_cls)
        scheduler = lr_schedule(optimizer, job.train, total_steps)
        if device.type == "cpu":
            _skip_shared_memory_allreduce_build()
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=encoder,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(job.train, job.deepspeed, bf16),
        )
        # After initialize: the anchor must hold the live parameters (cast to bf16 under bf16).
        self.anchor = Anchor(self.module.module.parameters()) if job.train.l2sp else None

    def drift(self) -> torch.Tensor:
        return self.anchor.drift()

    def __call__(self, batch):
        return self.module(**batch)

    @contextlib.contextmanager
    def accumulating(self):
        """Backward passes whose gradients add up before the boundary's (DeepSpeed's manual gradient
        accumulation: ZeRO-2/3 partition gradients as they come, so DeepSpeed's no_sync is not theirs)."""
        self.module.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.module.set_gradient_accumulation_boundary(True)

    def evaluating(self):
        return contextlib.nullcontext()  # every weight is the model's own: nothing to merge

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)

    def step(self, loss: torch.Tensor | None) -> torch.Tensor | float:
        """Back-propagate `loss` (None: the gradients are in place) and update the weights. Returns
        the gradient norm as DeepSpeed keeps it, read (float()) only at a report, as LoRA's."""
        if loss is not None:
            self.backward(loss)
        self.module.step()  # clips, steps the optimizer and the schedule, zeroes grads
        norm = self.module.get_global_grad_norm()
        return norm if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_state(self, path: str, rank: int) -> None:
        # Collective: every rank writes its own optimizer shard into its local folder; Ray Train
        # uploads all of them into one checkpoint directory.
        self.module.save_checkpoint(path, tag=CHECKPOINT_TAG)

    def load_state(self, path: str) -> None:
        with _weights_only(self.module.checkpoint_engine):
            self.module.load_checkpoint(path, tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)

    def export(self, path: str, rank: int) -> None:
        """Save the whole model from rank 0; under ZeRO-3 the shards are gathered first (collective)."""
        import deepspeed

        params = list(self.encoder.model.parameters())
        gather = deepspeed.zero.GatheredParameters(params) if self.stage == 3 else contextlib.nullcontext()
        with gather:
            # Saved in the dtype they trained in (16-bit under bf16): sentence-transformers then computes
            # as the run's own evaluation did.
            state = {k: v.detach().cpu().clone() for k, v in self.encoder.model.state_dict().items()} if rank == 0 else None
        if rank == 0:
            self.encoder.save(path, state_dict=state)

