"""`raykit train|tune|embed|search|synth|mine|score|plan|config|jobs ...` (and `python -m raykit`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raykit import __version__, log
from raykit.errors import Interrupted, RaykitError, RunFailed

EPILOG = ("exit codes: 0 done; 1 failed at run time (what was done is kept: rerun the same command to resume); "
          "2 bad input (one line on stderr: what, where, the fix; nothing written); 130 interrupted (rerun to resume)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Queries may come after --model (`raykit search OUT --model M "q1" "q2"`): argparse hands the
    # ones after an option back as extras.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "search" or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.queries += extra
    log.setup("DEBUG" if args.verbose else "WARNING" if args.quiet else args.log_level)
    try:
        from raykit import storage

        storage.retry_seconds()  # a malformed RAYKIT_STORAGE_RETRY is bad input, not a surprise mid-run
        COMMANDS[args.command](args)
        return 0
    except RaykitError as e:
        return _fail(f"error: {e}", 2)
    except Interrupted as e:
        return _fail(f"interrupted: {e}", 130)
    except RunFailed as e:
        return _fail(f"failed: {e}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume", 130)


def _fail(line: str, code: int) -> int:
    """Leave Ray first (nothing it forwards may follow), then one line, last on stderr."""
    from raykit.cluster import disconnect_ray

    disconnect_ray()
    print(f"raykit: {line}", file=sys.stderr)
    return code


# --- the commands -----------------------------------------------------------------------------------


def _train(args) -> None:
    from raykit.train.driver import run

    run(_job(args))


def _embed(args) -> None:
    from raykit.config import EmbedJob
    from raykit.embed.pipeline import run

    run(_job(args, EmbedJob))


def _mine(args) -> None:
    from raykit.train.mine import run

    run(_job(args))


def _synth(args) -> None:
    from raykit.train.synth import run

    run(_job(args))


def _score(args) -> None:
    from raykit.train.driver import prepare_data
    from raykit.train.score import run

    job = prepare_data(_job(args), score=False)  # mined first when the job mines
    run(job, job.data.train)


def _tune(args) -> None:
    from raykit.jobfile import load_job
    from raykit.tune.space import load_space
    from raykit.tune.sweep import run

    sweep_items = [o for o in args.overrides if o.startswith("tune.")]
    job = load_job(find_job(args.job), [o for o in args.overrides if not o.startswith("tune.")])
    run(job, load_space(find_job(args.space, "tune_spaces"), job, sweep_items))


def _plan(args) -> None:
    from raykit.plan import main as plan_main

    plan_main(args)


def _config(args) -> None:
    import yaml

    from raykit.config import EmbedJob

    job = _job(args, EmbedJob if args.embed else None)
    sys.stdout.write(yaml.safe_dump(job.to_dict(), sort_keys=False))


def _jobs(args) -> None:
    for kind in ("jobs", "tune_spaces"):
        folder = _packaged(kind)
        sys.stdout.write(f"{kind} ({folder}):\n")
        for path in sorted(folder.glob("*.yaml")) if folder else []:
            first = path.read_text().splitlines()[0].lstrip("# ").strip()
            sys.stdout.write(f"  {path.stem:<24}{first}\n")


def _search(args) -> None:
    from raykit import storage
    from raykit.embed import search

    output = storage.resolve(args.output)
    if args.beir:
        from raykit.data import load_beir

        metrics = search.evaluate_stored(output, args.model, load_beir(args.beir, args.split), args.trust_remote_code)
        print(f"{args.beir} ({args.split}) against {output}")
        for name, value in metrics.items():
            print(f"  {name:<11}{value:.4f}")
        return
    if not args.queries:
        raise RaykitError("search: no queries; pass query texts, or --beir FOLDER to score a BEIR split")
    if args.k <= 0:
        raise RaykitError(f"search: -k {args.k} must be above 0")
    for query, hits in zip(args.queries, search.search(output, args.model, args.queries, args.k, args.trust_remote_code)):
        print(f"query: {query}")
        for rank, (doc, score) in enumerate(hits, start=1):
            print(f"  {rank:>3}  {score:.4f}  {doc}")


COMMANDS = {"train": _train, "embed": _embed, "synth": _synth, "mine": _mine, "score": _score, "tune": _tune, "plan": _plan,
            "config": _config, "jobs": _jobs, "search": _search}


# --- job files by path or by name -----------------------------------------------------------------


def find_job(name: str, kind: str = "jobs") -> str:
    """A job (or search space) file: a path as given, else a packaged one by name (`quickstart`)."""
    if Path(name).exists() or "/" in name or name.endswith((".yaml", ".yml")):
        return name
    folder = _packaged(kind)
    if folder and (folder / f"{name}.yaml").is_file():
        return str(folder / f"{name}.yaml")
    known = sorted(p.stem for p in folder.glob("*.yaml")) if folder else []
    raise RaykitError(f"{name}: no such file, nor a packaged {kind[:-1].replace('_', ' ')} of that name; one of: {', '.join(known)}")


def _packaged(kind: str) -> Path | None:
    """raykit's own jobs/ or tune_spaces/: package data in an install, the repository's in a checkout."""
    import importlib.resources

    try:
        found = Path(str(importlib.resources.files(f"raykit.{kind}")))
        if found.is_dir():
            return found
    except (ModuleNotFoundError, TypeError):
        pass
    checkout = Path(__file__).resolve().parents[1] / kind  # an editable install or a source tree
    return checkout if checkout.is_dir() else None


def _job(args, cls=None):
    from raykit.jobfile import load_job

    return load_job(find_job(args.job), args.overrides, cls)


# --- the parser ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    out = common.add_argument_group("output")
    out.add_argument("--log-level", default="INFO", choices=log.LEVELS, help="raykit's progress lines and notices (default INFO)")
    out.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    out.add_argument("-v", "--verbose", action="store_true", help="DEBUG, and Ray's own INFO messages")

    parser = argparse.ArgumentParser(
        prog="raykit", description="Fine-tune embedding models on Ray and re-embed corpora with them.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"raykit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], epilog=f"example:\n  {example}\n\n{EPILOG}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def job_args(p, example_job: str, example_override: str) -> None:
        p.add_argument("job", help=f"job YAML, or a packaged job by name (`raykit jobs`), e.g. {example_job}")
        # default=[]: argparse otherwise counts a '*' positional as required and names it in its error
        p.add_argument("overrides", nargs="*", default=[], help=f"key=value, e.g. {example_override}")

    job_args(command("train", "fine-tune a model from a job YAML",
                     "raykit train jobs/quickstart.yaml train.lr=5e-4 output_dir=runs/qs"), "jobs/quickstart.yaml", "train.lr=1e-4")
    job_args(command("embed", "embed a corpus into Parquet shards + manifest (local or s3://)",
                     "raykit embed jobs/reembed_scifact.yaml model=runs/qs/model output=s3://bucket/emb"),
             "jobs/reembed_scifact.yaml", "model=runs/x/model output=s3://bucket/emb")
    job_args(command("synth", "cold start: make (query, positive) pairs from a corpus alone (model-free, an LM, or an endpoint)",
                     "raykit synth jobs/scifact_coldstart.yaml synth.generator=doc2query/msmarco-t5-base-v1"),
             "jobs/scifact_coldstart.yaml", "synth.queries_per_doc=3")
    job_args(command("mine", "mine hard negatives for a train job (writes triplets)",
                     "raykit mine jobs/lora_hardneg_mnr.yaml mine.top_k=100"), "jobs/lora_hardneg_mnr.yaml", "mine.top_k=100")
    job_args(command("score", "add a teacher's scores to a train job's triplets (for distillation)",
                     "raykit score jobs/full_matryoshka_distill.yaml teacher.batch_size=64"),
             "jobs/full_matryoshka_distill.yaml", "teacher.model=cross-encoder/ms-marco-MiniLM-L-6-v2")
    tune = command("tune", "sweep job fields (LoRA rank, alpha, lr, ...) with Ray Tune; ASHA stops weak trials",
                   "raykit tune jobs/scifact_lora.yaml tune_spaces/lora_rank_alpha_lr.yaml tune.num_samples=20")
    tune.add_argument("job", help="train job YAML (or name), e.g. jobs/scifact_lora.yaml")
    tune.add_argument("space", help="search space YAML (or name), e.g. tune_spaces/lora_rank_alpha_lr.yaml")
    tune.add_argument("overrides", nargs="*", default=[], help="key=value for the job (train.epochs=2) or the sweep (tune.num_samples=20)")
    config = command("config", "print the resolved job (defaults, file, overrides) as YAML; fails as train would",
                     "raykit config jobs/scifact_lora.yaml lora.rank=32")
    job_args(config, "jobs/scifact_lora.yaml", "lora.rank=32")
    config.add_argument("--embed", action="store_true", help="the job is an embed job (raykit embed)")
    command("jobs", "list the packaged job files and search spaces", "raykit jobs")

    from raykit.plan import add_arguments

    add_arguments(command("plan", "recommend a strategy for your constraints and write a starting job",
                          "raykit plan --model sentence-transformers/all-MiniLM-L6-v2 --pairs 5000 --out job.yaml"))

    search = command("search", "top-k documents for queries from stored embeddings",
                     'raykit search runs/emb --model runs/qs/model "do statins lower cholesterol?"')
    search.add_argument("output", help="what `raykit embed` wrote (folder or s3:// prefix with manifest.json)")
    search.add_argument("queries", nargs="*", default=[], help="query texts")
    search.add_argument("--model", required=True, help="the query model; must be the one that embedded the corpus")
    search.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    search.add_argument("--beir", help="instead of queries: score this BEIR folder's split against the stored embeddings")
    search.add_argument("--split", default="test", help="BEIR split for --beir (default test)")
    search.add_argument("--trust-remote-code", action="store_true", help="run Python code from the model's repository (review it first)")
    return parser
