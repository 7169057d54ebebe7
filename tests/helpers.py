"""What several test modules share: paths, the quickstart train job's overrides, S3 uploads, and
real faults (a Ray Train worker killed with SIGKILL). Fixtures live in conftest.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "data" / "quickstart"
TRAIN_JOB = str(REPO / "jobs" / "quickstart.yaml")

# Test credentials for the throwaway S3 server (conftest.py sets them before Ray starts).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "raykit-test-key",
    "AWS_SECRET_ACCESS_KEY": "raykit-test-secret-do-not-log",
    "AWS_REGION": "us-east-1",
}


def train_overrides(tiny_model, out, *extra: str) -> list[str]:
    """The quickstart job on the tiny BERT: 2 CPU workers x batch 8, 4 steps, evaluated at 16 and 32 dims."""
    return [
        f"output_dir={out}",
        f"model.name={tiny_model}",
        "model.max_seq_length=32",
        f"data.train={QUICKSTART}",
        f"eval.data={QUICKSTART}",
        "eval.dims=[16,32]",
        "train.batch_size=8",
        "train.max_steps=4",
        "train.log_every=1",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=1",
        *extra,
    ]


def upload_dir(client, local: Path, bucket: str, prefix: str) -> str:
    for f in Path(local).rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local)}")
    return f"s3://{bucket}/{prefix}"


def kill_a_worker_after_checkpoint(step: int):
    """A Ray Train callback that SIGKILLs one training worker's process once the checkpoint of `step`
    is registered: a real worker loss, the way a node's OOM killer or a lost node ends one.

    It runs on the Ray Train controller, a sibling of the workers under the node's raylet. Workers
    block in `ray.train.report` until the controller takes each report, so at most a step or two
    runs between the checkpoint and the kill. Built in a function so that Ray pickles the class by
    value (the controller cannot import this module).
    """
    import ray.train

    class KillAWorker(ray.train.UserCallback):
        def __init__(self):
            self.killed: int | None = None

        def after_report(self, run_context, metrics, checkpoint):
            if self.killed is None and checkpoint is not None and metrics and metrics[0].get("step") == step:
                import psutil

                raylet = psutil.Process(os.getppid())
                workers = [p for p in raylet.children() if "RayTrainWorker" in " ".join(p.cmdline())]
                assert workers, "no Ray Train worker process found beside the controller"
                self.killed = workers[-1].pid
                os.kill(self.killed, signal.SIGKILL)

    return KillAWorker()


def refused(capsys, *argv: str) -> str:
    """Run raykit's CLI in this process on input it must refuse: exit 2, no traceback, and one
    `raykit: error:` line last on stderr, which is returned. (tests/test_cli.py checks the same of
    the real command in a subprocess.)"""
    from raykit.cli import main

    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("raykit: error: "), err[-2000:]
    return last
