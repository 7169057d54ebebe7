"""Driver memory while the training set of a run is read: 100k and 1M synthetic pairs, in files of
100k (.jsonl, one hard negative each).

Two ways, in one run: raykit's (`data.training_set`: one Ray task reads and validates each file, the
driver keeps references and counts) and the plain alternative it replaced (`data.load_training_set`:
every row read into this process). The figure is the driver's peak resident memory above what it
held before the call, sampled every 5 ms.

    python bench/driver_memory.py
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import cpu_name, save

ROWS_PER_FILE = 100_000
MiB = 2**20


def write_pairs(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True)
    for f in range(0, rows, ROWS_PER_FILE):
        with open(folder / f"part-{f // ROWS_PER_FILE:03d}.jsonl", "w") as out:
            for i in range(f, min(f + ROWS_PER_FILE, rows)):
                out.write(json.dumps({"query": f"what does valve {i} do when pump {i % 977} trips?",
                                      "positive": f"Valve {i} closes within two seconds when pump {i % 977} trips, "
                                                  "isolating the loop until an operator resets it.",
                                      "negative": f"Pump {i % 977} is inspected every {i % 31 + 1} weeks."}) + "\n")


def peak_above_baseline(fn) -> tuple[float, float, object]:
    """(peak MiB above the baseline, seconds, fn's result) for fn() in this process."""
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return (max(peak, process.memory_info().rss) - baseline) / MiB, seconds, result


def main() -> None:
    import ray

    from raykit.config import DataConfig
    from raykit.data import load_training_set, training_set

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (100_000, 1_000_000):
            folder = Path(tmp) / f"pairs-{rows}"
            write_pairs(folder, rows)
            cfg = DataConfig(train=str(folder))
            ours, ours_s, training = peak_above_baseline(lambda: training_set(cfg, seed=0))
            assert training.num_rows == rows
            del training
            plain, plain_s, table = peak_above_baseline(lambda: load_training_set(cfg, seed=0))
            assert table.num_rows == rows
            del table
            rows_out.append({"pairs": rows, "files": -(-rows // ROWS_PER_FILE), "raykit_mib": round(ours, 1),
                             "raykit_s": round(ours_s, 1), "in_driver_mib": round(plain, 1), "in_driver_s": round(plain_s, 1)})
            print(f"{rows:>9,} pairs: driver +{ours:7.1f} MiB ({ours_s:5.1f} s) with Ray tasks | "
                  f"+{plain:7.1f} MiB ({plain_s:5.1f} s) read in the driver")
    ray.shutdown()
    cpu = cpu_name()
    lines = [f"Driver memory while reading the training set ({cpu}; `python bench/driver_memory.py`)", "",
             "| pairs | files | raykit (Ray tasks): driver peak | read in the driver: peak |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['pairs']:,} | {r['files']} | +{r['raykit_mib']:.0f} MiB ({r['raykit_s']:.0f} s) | "
              f"+{r['in_driver_mib']:.0f} MiB ({r['in_driver_s']:.0f} s) |" for r in rows_out]
    print("\n" + "\n".join(lines))
    save("driver_memory", {"cpu": cpu, "rows": rows_out}, "\n".join(lines))


if __name__ == "__main__":
    main()
