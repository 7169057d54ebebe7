"""GPU check of raykit's per-worker code, without Ray (for a lent GPU machine, one short run).

    python bench/gpu_check.py --model DIR --data SCIFACT_DIR --out DIR [--scan-seconds 300]

1. bf16 on CUDA: LoRA (autocast) and full fine-tuning under DeepSpeed ZeRO-2 and ZeRO-3, a few steps
   each; the exported model, reloaded, must embed like the trained one. Peak GPU memory, pairs/s and
   MFU per strategy (raykit/flops.py, as the progress line counts them).
2. Embedding throughput of the encoder on the SciFact corpus, fp32 and bf16: docs/s and MFU.
3. A learning-rate x epochs scan on SciFact (fp32, as the CPU jobs run), to choose the jobs' defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from raykit.config import DataConfig
from raykit.data import load_beir, load_training_set
from raykit.encoder import Encoder
from raykit.evaluate import evaluate
from raykit.flops import ModelFlops, mfu, peak_flops
from raykit.jobfile import load_job
from raykit.strategies import build_trainee
from raykit.train.feed import Ahead
from raykit.train.loop import training_step

WARMUP_STEPS = 3  # left out of pairs/s and MFU: allocator and kernel warm-up


def train(job, table, device, bf16):
    """Train `job` in this process; returns (trainee, last loss, s/step, pairs/s, MFU) with MFU counted as
    raykit's progress line counts it (raykit/flops.py; None where the device's peak is unknown)."""
    steps_per_epoch = table.num_rows // job.train.batch_size
    total = job.train.max_steps or steps_per_epoch * job.train.epochs
    torch.manual_seed(job.train.seed)
    encoder = Encoder.load(job.model)
    model_flops = ModelFlops(encoder.model, encoder.model.config)
    trainee = build_trainee(encoder, job, total, device, bf16)
    rng = np.random.default_rng(job.train.seed)
    steps = [rows for _ in range(-(-total // steps_per_epoch)) for rows in
             rng.permutation(table.num_rows)[:steps_per_epoch * job.train.batch_size].reshape(steps_per_epoch, -1)][:total]
    step, started, flops = 0, time.perf_counter(), 0.0
    # as the training loop reads its input: taken, tokenized and pinned ahead on a thread (raykit/train/feed.py)
    with Ahead(trainee.encoder, table, steps, job.loss.mini_batch_size, device) as ahead:
        for prepared in ahead:
            loss, _, lengths = training_step(trainee, prepared, job, device)
            step += 1
            if step == WARMUP_STEPS:
                torch.cuda.synchronize()
                started, flops = time.perf_counter(), 0.0
            elif step > WARMUP_STEPS:
                flops += model_flops.training(lengths, frozen_base=job.train.strategy == "lora")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    timed = max(total - WARMUP_STEPS, 1)
    used = mfu(flops, seconds, peak_flops(device, bf16, job.scaling.peak_tflops))
    return trainee, float(loss), seconds / timed, timed * job.train.batch_size / seconds, used


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scan-seconds", type=float, default=300)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    args = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    cuda = torch.cuda.is_available()  # without one: a CPU dry run of this script, bf16 off
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if not cuda:
        torch.cuda.synchronize = torch.cuda.reset_peak_memory_stats = torch.cuda.empty_cache = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "checks": [], "throughput": {}, "scan": []}
    out_path = os.path.join(args.out, "gpu_check.json")

    def dump():
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)

    base = [f"model.name={args.model}", f"data.train={args.data}", f"model.max_seq_length={args.max_len}",
            f"train.batch_size={args.batch}"]
    table = load_training_set(DataConfig(train=args.data), seed=42)
    test = load_beir(args.data, "test")
    probe = list(test.corpus.values())[:64]

    # 1. bf16 strategies on CUDA, export round trip
    for extra in (["train.strategy=lora", "train.lr=2e-4"],
                  ["train.strategy=full", "deepspeed.zero_stage=2", "train.lr=3e-5"],
                  ["train.strategy=full", "deepspeed.zero_stage=3", "train.lr=3e-5"]):
        job = load_job(None, base + extra + [f"train.max_steps={args.steps}", f"train.precision={'bf16' if cuda else 'fp32'}"])
        torch.cuda.reset_peak_memory_stats()
        trainee, loss, step_s, pairs_s, used = train(job, table, device, bf16=cuda)
        peak = torch.cuda.max_memory_allocated() / 2**20
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            trained = trainee.encoder.encode(probe, 32, device, trainee.module, role="document")
        with tempfile.TemporaryDirectory() as tmp:
            trainee.export(os.path.join(tmp, "model"), rank=0)
            reloaded = Encoder.load(dataclasses.replace(job.model, name=os.path.join(tmp, "model"))).to(device)
            again = reloaded.encode(probe, 32, device, role="document")
            saved = safetensors.torch.load_file(os.path.join(tmp, "model", "model.safetensors"))
            dtype = str(next(iter(saved.values())).dtype)
        cos = F.cosine_similarity(trained, again).min().item()
        report["checks"].append({"job": " ".join(extra), "loss": loss, "ms_per_step": 1000 * step_s, "pairs_per_s": pairs_s,
                                 "mfu": used, "peak_mib": peak,
                                 "export_min_cosine": cos, "saved_dtype": dtype, "ok": bool(np.isfinite(loss) and cos > 0.99)})
        print(report["checks"][-1], flush=True)
        del trainee
        torch.cuda.empty_cache()
        dump()

    # 2. embedding throughput, docs/s and MFU (the corpus' real tokens, as raykit embed counts them)
    encoder = Encoder.load(load_job(None, base).model).to(device)
    docs = list(test.corpus.values())
    lengths = torch.tensor([len(t) for t in encoder.tokenizer(docs, truncation=True, max_length=encoder.max_seq_length)["input_ids"]])
    forward_flops = ModelFlops(encoder.model, encoder.model.config).forward(lengths)
    for name, ctx in (("fp32", torch.autocast("cuda", enabled=False)), ("bf16", torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda))):
        with ctx:
            encoder.encode(docs[:512], 256, device, role="document")
            torch.cuda.synchronize()
            t = time.perf_counter()
            encoder.encode(docs, 256, device, role="document")
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        report["throughput"][name] = {"docs_per_s": len(docs) / seconds,
                                      "mfu": mfu(forward_flops, seconds, peak_flops(device, name == "bf16"))}
    print(report["throughput"], flush=True)
    dump()

    # 3. lr x epochs scan (fp32, like the CPU jobs); base first
    full = encoder.dim
    DIMS = (64, full) if full > 64 else (full,)
    report["scan"].append({"config": "base", "ndcg@10": {d: m["ndcg@10"] for d, m in evaluate(encoder, test, DIMS, 256, device).items()}})
    print(report["scan"][-1], flush=True)
    started = time.time()
    grid = [("lora", lr, ep, []) for lr in (2e-4, 5e-4, 1e-3) for ep in (3, 6)]
    grid += [("full", lr, ep, ["deepspeed.zero_stage=2"]) for lr in (3e-5, 6e-5, 1e-4) for ep in (3, 6)]
    grid += [("lora", 5e-4, 6, ["lora.rank=64", "lora.alpha=128"]), ("lora", 1e-3, 10, [])]
    for strategy, lr, epochs, extra in grid:
        if time.time() - started > args.scan_seconds:
            break
        job = load_job(None, base + [f"train.strategy={strategy}", f"train.lr={lr}", f"train.epochs={epochs}",
                                     "train.precision=fp32", "lora.target_modules=[query,key,value,dense]", *extra])
        trainee, loss, step_s, _, _ = train(job, table, device, bf16=False)
        res = evaluate(trainee.encoder, test, DIMS, 256, device, trainee.module)
        report["scan"].append({"config": f"{strategy} lr={lr:g} epochs={epochs} {' '.join(extra)}".strip(),
                               "ndcg@10": {d: m["ndcg@10"] for d, m in res.items()}, "ms_per_step": 1000 * step_s})
        print(report["scan"][-1], flush=True)
        del trainee
        torch.cuda.empty_cache()
        dump()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
