"""`raykit train|tune|embed|search|mine|score|plan ...` (and `python -m raykit`)."""

from __future__ import annotations

import argparse
import sys

from raykit.errors import RaykitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raykit", description="Fine-tune embedding models on Ray and re-embed corpora with them.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune a model from a job YAML")
    train.add_argument("job", help="job YAML, e.g. jobs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=1e-4 output_dir=runs/x")

    embed = sub.add_parser("embed", help="embed a corpus into Parquet shards + manifest (local or s3://)")
    embed.add_argument("job", help="embed job YAML, e.g. jobs/reembed_scifact.yaml")
    embed.add_argument("overrides", nargs="*", help="key=value, e.g. model=runs/x/model output=s3://bucket/emb")

    mine = sub.add_parser("mine", help="mine hard negatives for a train job (writes triplets)")
    mine.add_argument("job", help="train job YAML with a mine: section, e.g. jobs/lora_hardneg_mnr.yaml")
    mine.add_argument("overrides", nargs="*", help="key=value, e.g. mine.top_k=100 mine.output=s3://bucket/triplets.jsonl")

    score = sub.add_parser("score", help="add a teacher's scores to a train job's triplets (for distillation)")
    score.add_argument("job", help="train job YAML with a teacher: section, e.g. jobs/full_matryoshka_distill.yaml")
    score.add_argument("overrides", nargs="*", help="key=value, e.g. teacher.model=cross-encoder/ms-marco-MiniLM-L-6-v2")

    tune = sub.add_parser("tune", help="sweep job fields (LoRA rank, alpha, lr, ...) with Ray Tune; ASHA stops weak trials")
    tune.add_argument("job", help="train job YAML, e.g. jobs/scifact_lora.yaml")
    tune.add_argument("space", help="search space YAML, e.g. tune_spaces/lora_rank_alpha_lr.yaml")
    tune.add_argument("overrides", nargs="*", help="key=value for the job (train.epochs=2) or the sweep (tune.num_samples=20)")

    plan = sub.add_parser("plan", help="recommend a strategy for your constraints and write a starting job")
    from raykit.plan import add_arguments

    add_arguments(plan)

    search = sub.add_parser("search", help="top-k documents for queries from stored embeddings")
    search.add_argument("output", help="what `raykit embed` wrote (folder or s3:// prefix with manifest.json)")
    search.add_argument("queries", nargs="*", help="query texts")
    search.add_argument("--model", required=True, help="the query model; must be the one that embedded the corpus")
    search.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    search.add_argument("--beir", help="instead of queries: score this BEIR folder's split against the stored embeddings")
    search.add_argument("--split", default="test", help="BEIR split for --beir (default test)")

    # Queries may come after --model (`raykit search OUT --model M "q1" "q2"`): argparse hands the
    # ones after an option back as extras.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "search" or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.queries += extra
    try:
        if args.command == "train":
            from raykit.jobfile import load_job
            from raykit.train.driver import run

            run(load_job(args.job, args.overrides))
        elif args.command == "embed":
            from raykit.config import EmbedJob
            from raykit.jobfile import load_job
            from raykit.embed.pipeline import run

            run(load_job(args.job, args.overrides, EmbedJob))
        elif args.command == "mine":
            from raykit.jobfile import load_job
            from raykit.train.mine import run

            run(load_job(args.job, args.overrides))
        elif args.command == "score":
            import dataclasses

            from raykit.jobfile import load_job
            from raykit.train.mine import run as mine
            from raykit.train.score import run

            job = load_job(args.job, args.overrides)
            triplets = mine(job) if job.mine.enabled else job.data.train
            run(dataclasses.replace(job, data=dataclasses.replace(job.data, train=triplets)), triplets)
        elif args.command == "tune":
            from raykit.jobfile import load_job
            from raykit.tune.space import load_space
            from raykit.tune.sweep import run

            sweep_items = [o for o in args.overrides if o.startswith("tune.")]
            job = load_job(args.job, [o for o in args.overrides if not o.startswith("tune.")])
            run(job, load_space(args.space, job, sweep_items))
        elif args.command == "plan":
            from raykit.plan import main as plan_main

            plan_main(args)
        elif args.command == "search":
            _search(args)
        return 0
    except RaykitError as e:
        from raykit.cluster import disconnect_ray

        disconnect_ray()
        print(f"raykit: error: {e}", file=sys.stderr)
        return 2


def _search(args) -> None:
    from raykit import storage
    from raykit.embed import search

    output = storage.resolve(args.output)
    if args.beir:
        from raykit.data import load_beir

        metrics = search.evaluate_stored(output, args.model, load_beir(args.beir, args.split))
        print(f"[raykit] {args.beir} ({args.split}) against {output}")
        for name, value in metrics.items():
            print(f"  {name:<11}{value:.4f}")
        return
    if not args.queries:
        raise RaykitError("search: no queries; pass query texts, or --beir FOLDER to score a BEIR split")
    if args.k <= 0:
        raise RaykitError(f"search: -k {args.k} must be above 0")
    for query, hits in zip(args.queries, search.search(output, args.model, args.queries, args.k)):
        print(f"query: {query}")
        for rank, (doc, score) in enumerate(hits, start=1):
            print(f"  {rank:>3}  {score:.4f}  {doc}")
