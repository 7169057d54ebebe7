"""`raykit train JOB.yaml key=value ...` (and `python -m raykit`)."""

from __future__ import annotations

import argparse
import sys

from raykit.errors import RaykitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raykit", description="Fine-tune embedding models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model from a job YAML")
    train.add_argument("job", help="job YAML, e.g. jobs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=1e-4 output_dir=runs/x")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from raykit.config import load_job

            job = load_job(args.job, args.overrides)
            from raykit.train import run

            run(job)
        return 0
    except RaykitError as e:
        print(f"raykit: error: {e}", file=sys.stderr)
        return 2

