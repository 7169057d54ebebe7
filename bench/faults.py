"""What surviving a fault costs: a checkpoint's share of training time, and a SIGKILLed worker's price.

    python bench/faults.py [--steps 12]

all-MiniLM-L6-v2 (the packaged model) on SciFact's training pairs: 2 CPU workers x batch 16, max
length 128, no evaluation, LoRA and full fine-tuning under ZeRO-2, each run twice on one local Ray:
- checkpointing every 4 steps: each checkpoint's seconds against the training time between them,
  and what that is at the default cadence (train.checkpoint_every=10m: one checkpoint per 600 s);
- the same run with a worker's process SIGKILLed once the step-4 checkpoint is registered (the
  tests' fault, tests/helpers.py): Ray Train restarts the group from it by itself. The extra wall
  time over the first run is what the lost worker cost (a new worker group, the model loaded again,
  the steps since the checkpoint done again).
Both runs must end with the same per-rank batch digests: the resumed run trained on the same batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import REPO, SCIFACT, cpu_name, save

sys.path.insert(0, str(REPO / "tests"))
from helpers import kill_a_worker_after_checkpoint  # noqa: E402  (the tests' real fault)

DEFAULT_CADENCE_S = 600.0  # train.checkpoint_every's default, 10m
STRATEGIES = {"lora": ["train.strategy=lora"], "zero2": ["train.strategy=full", "deepspeed.zero_stage=2", "train.lr=2e-5"]}


def run(out: Path, steps: int, strategy: list[str], kill: bool) -> dict:
    from raykit.jobfile import load_job
    from raykit.train import driver

    job = load_job(str(REPO / "jobs" / "scifact_lora.yaml"), [
        f"output_dir={out}", f"data.train={SCIFACT}", "eval.data=", "eval.ood_data=", "data.val_queries=0",
        "model.max_seq_length=128", "train.batch_size=16", f"train.max_steps={steps}", "train.log_every=1",
        "train.checkpoint_every=4", "scaling.num_workers=2", "scaling.cpus_per_worker=1", *strategy])
    summary = driver.run(job, callbacks=[kill_a_worker_after_checkpoint(step=4)] if kill else [])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": summary["seconds"], "checkpoints": summary["checkpoints"], "resumed_from": summary["resumed_from"],
            "train_s": metrics[-1]["elapsed_s"], "batches_sha256": summary["batches_sha256"]}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    print(cpu_name(), flush=True)
    ray.init(num_cpus=4, log_to_driver=False)
    rows, results = [], {"cpu": cpu_name(), "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for name, strategy in STRATEGIES.items():
            plain = run(Path(tmp, name), args.steps, strategy, kill=False)
            killed = run(Path(tmp, f"{name}-killed"), args.steps, strategy, kill=True)
            assert killed["resumed_from"] == [4] and killed["batches_sha256"] == plain["batches_sha256"], (plain, killed)
            each = plain["checkpoints"]["seconds"] / plain["checkpoints"]["count"]
            step_s = (plain["train_s"] - plain["checkpoints"]["seconds"]) / args.steps
            share = 100 * each / (4 * step_s)
            at_default = 100 * each / DEFAULT_CADENCE_S
            cost = killed["seconds"] - plain["seconds"]
            results[name] = {"plain": plain, "killed": killed, "checkpoint_s": each, "step_s": step_s,
                             "share_every_4_steps_pct": share, "share_at_default_cadence_pct": at_default, "kill_cost_s": cost}
            rows.append(f"| {name} | {each:.2f} s | {step_s:.2f} s | {share:.0f}% | {at_default:.2f}% | "
                        f"{plain['seconds']:.0f} s | {killed['seconds']:.0f} s | +{cost:.0f} s |")
            print(rows[-1], flush=True)
    table = "\n".join([
        f"CPU: {results['cpu']}; {args.steps} steps, 2 workers x batch 16, max length 128, checkpoints every 4 steps",
        "",
        "| strategy | one checkpoint | one step | share, every 4 steps | share at the default 10m | run | run, a worker SIGKILLed after step 4 | lost worker's cost |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print("\n" + table)
    save("faults", results, table)


if __name__ == "__main__":
    main()
