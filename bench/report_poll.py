"""Training steps faster than Ray Train's controller poll: do they wait on it?

    python bench/report_poll.py [--steps 60]

`ray.train.report` hands a result to Ray Train's controller through a queue of one, and the
controller takes it when it polls its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default);
a report while the last one waits blocks every worker until then. raykit reports progress every
`train.log_every` steps, so on fast hardware it would train at the controller's pace, not the
device's. Here steps are made fast on a CPU (all-MiniLM-L6-v2, LoRA, batch 8, max length 32, one
worker) and each step is a progress report (log_every=1): the same run under Ray's default poll and
under a poll ten times as frequent (0.2 s). Equal pairs/s means training never waits on the poll.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import ENV, cpu_name, raykit_train, save

BATCH = 8  # pairs a step: with max length 32, steps of about half a second on 2 CPU cores


def pairs_per_s(poll: str | None, steps: int, work: Path) -> dict:
    env = {k: v for k, v in ENV.items() if k != "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}
    if poll:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = poll
    summary = raykit_train("jobs/quickstart.yaml", work / f"poll-{poll or 'default'}", "model.max_seq_length=32",
                           f"train.batch_size={BATCH}", f"train.max_steps={steps}", "train.log_every=1", "scaling.num_workers=1",
                           env=env)  # `raykit train` starts its own local Ray, with this environment
    return {"poll_s": float(poll) if poll else 2.0, "pairs_per_s": summary["throughput"]["pairs_per_s"],
            "step_s": round(BATCH / summary["throughput"]["pairs_per_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raykit-report-poll-"))
    machine = cpu_name()
    print(f"machine: {machine}", flush=True)
    default, fast = pairs_per_s(None, args.steps, work), pairs_per_s("0.2", args.steps, work)
    ratio = round(default["pairs_per_s"] / fast["pairs_per_s"], 2)
    result = {"machine": machine, "steps": args.steps, "default_poll": default, "fast_poll": fast, "ratio": ratio}
    print(f"pairs/s under Ray's default 2 s poll / under a 0.2 s poll: {ratio:.2f}x "
          f"({default['pairs_per_s']} vs {fast['pairs_per_s']}; a step takes {fast['step_s']} s)")
    save("report_poll", result, "\n".join([
        f"# Training steps faster than Ray Train's controller poll ({machine})",
        "",
        f"all-MiniLM-L6-v2, LoRA, 1 worker, batch {BATCH}, max length 32, {args.steps} steps, a progress report every step.",
        "",
        "| controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) | pairs/s | seconds per step |",
        "|---|---:|---:|",
        f"| 2 s (Ray's default) | {default['pairs_per_s']:.1f} | {default['step_s']:.3f} |",
        f"| 0.2 s | {fast['pairs_per_s']:.1f} | {fast['step_s']:.3f} |",
        f"| ratio | **{ratio:.2f}x** | |",
    ]))


if __name__ == "__main__":
    main()
