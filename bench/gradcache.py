"""Gradient caching on CPU: a LoRA step at batch 512 (in-batch negatives) with loss.mini_batch_size 32,
against the plain step at batch 32, in one run. (The plain step at batch 512 does not fit a 24 GiB
machine at 128 tokens: the kernel's OOM killer ended it, so it is not run here.)

Each way runs in its own process (one CPU worker, no Ray: raykit's per-worker code, `training_step`),
all-MiniLM-L6-v2 on SciFact's training pairs at 128 tokens, fp32. The figures: the process's peak
resident memory above what it held once the model was loaded (ru_maxrss), and pairs/s over the
measured steps after one warm-up step.

    python bench/gradcache.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from common import ENV, REPO, SCIFACT, cpu_name, save

MiB = 2**20
WAYS = [  # (name, batch, loss.mini_batch_size, measured steps)
    ("plain, batch 32", 32, 0, 8),
    ("GradCache, batch 512, chunks of 32", 512, 32, 1),
]


def one_way(batch: int, chunk: int, steps: int) -> dict:
    """In this process: load, one warm-up step, then `steps` measured ones."""
    import numpy as np
    import torch

    from raykit.data import load_training_set
    from raykit.encoder import Encoder
    from raykit.jobfile import load_job
    from raykit.strategies import build_trainee
    from raykit.train.loop import training_step

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    job = load_job(REPO / "jobs" / "scifact_lora.yaml", [f"data.train={SCIFACT}", f"train.batch_size={batch}",
                                                         f"loss.mini_batch_size={chunk}", "model.max_seq_length=128",
                                                         "train.precision=fp32", "train.l2sp=0"])
    table = load_training_set(job.data, job.train.seed)
    torch.manual_seed(0)
    trainee = build_trainee(Encoder.load(job.model), job, steps + 1, torch.device("cpu"), False)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    order = np.random.default_rng(0).permutation(table.num_rows)
    times = []
    for step in range(steps + 1):
        rows = order[(step * batch) % (table.num_rows - batch):][:batch]
        batch_rows = table.take(rows).to_pydict()
        started = time.perf_counter()
        training_step(trainee, batch_rows, job, torch.device("cpu"))
        times.append(time.perf_counter() - started)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    measured = sum(times[1:])
    return {"batch": batch, "mini_batch_size": chunk, "steps": steps, "seconds": measured,
            "pairs_per_s": steps * batch / measured, "peak_mib_above_model": (peak_kib - base_kib) / 1024}


def main() -> None:
    if len(sys.argv) == 4:  # a child: one way
        print("RESULT " + json.dumps(one_way(*map(int, sys.argv[1:]))))
        return
    cpu = cpu_name()
    print(f"CPU: {cpu}", flush=True)
    results = []
    for name, batch, chunk, steps in WAYS:
        print(f"{name} ...", flush=True)
        done = subprocess.run([sys.executable, __file__, str(batch), str(chunk), str(steps)], env=ENV,
                              capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        result = {"way": name, **json.loads(line[len("RESULT "):])}
        print(f"  {result['pairs_per_s']:.1f} pairs/s, peak {result['peak_mib_above_model']:.0f} MiB above the model", flush=True)
        results.append(result)
    plain, cached = results
    rows = [f"| {r['way']} | {r['pairs_per_s']:.1f} | {r['peak_mib_above_model']:.0f} |" for r in results]
    summary = (f"GradCache at batch 512 trains at {cached['pairs_per_s'] / plain['pairs_per_s']:.2f}x the pairs/s of plain "
               f"batch 32 with {cached['peak_mib_above_model'] / plain['peak_mib_above_model']:.2f}x its memory: 16x the "
               "in-batch negatives for the memory of batch 32.")
    print(summary)
    markdown = "\n".join([
        f"LoRA, all-MiniLM-L6-v2, SciFact pairs, 128 tokens, fp32, one CPU worker ({cpu}):", "",
        "| way | pairs/s | peak memory above the model (MiB) |", "|---|---:|---:|", *rows, "", summary,
    ])
    save("gradcache", {"cpu": cpu, "results": results, "summary": summary}, markdown)


if __name__ == "__main__":
    main()
