"""A run's metrics while it trains: metrics.jsonl in output_dir, and the experiment trackers that
`train.report_to` names (tensorboard, mlflow, wandb). Rank 0 writes; the other ranks keep the history.

Trackers read their settings from their own environment variables, as they do everywhere:
MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT, WANDB_ENTITY and WANDB_MODE. raykit
forwards those to the workers (`worker_env`) and never a credential: WANDB_API_KEY or
MLFLOW_TRACKING_TOKEN belong in the nodes' environment, where Ray does not show them. A resumed run
continues the same MLflow or W&B run: its id travels in the checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from raykit import storage
from raykit.config import JobConfig
from raykit.errors import ConfigError

# report_to name -> the package that training (rank 0) and a sweep (Ray Tune's logger) need for it
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
SETTINGS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE")
EXPERIMENT = "raykit"  # the MLflow experiment / W&B project when the environment names none
WRITE_EVERY_S = 10.0  # metrics.jsonl (rewritten whole) and the trackers flushed at most this often, and at the end


def check(job: JobConfig, sweep: bool = False) -> None:
    """Refuse, on the driver, a tracker whose package is missing or that has nowhere to write."""
    for name in job.train.report_to:
        package = PACKAGES[name][sweep]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.report_to: {name} needs the {package} package on every node; "
                              f"pip install {package} (or raykit-embed[tracking])")
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI") and storage.is_uri(job.output_dir):
            raise ConfigError("train.report_to: mlflow with an s3:// output_dir needs a tracking server; "
                              "set MLFLOW_TRACKING_URI (e.g. http://mlflow:5000) where you submit the job")


def worker_env() -> dict[str, str]:
    """The trackers' settings from the submitting shell, for the workers' runtime environment."""
    return {k: os.environ[k] for k in SETTINGS if os.environ.get(k)}


def mlflow_uri(output_dir: str) -> str:
    """MLFLOW_TRACKING_URI, else a file store beside the run: <output_dir>/mlruns (`mlflow ui
    --backend-store-uri <output_dir>/mlruns` shows it)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or Path(output_dir, "mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses a file store unless asked: it is the one store that needs no server or database.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def mlflow_name(key: str) -> str:
    """A metric name MLflow takes: no `@`, and no `/` (its file store makes `a/b` a folder, which
    clashes with a metric `a`): ndcg@10/32 becomes ndcg_at_10.dim32."""
    name, _, dim = key.partition("/")
    return name.replace("@", "_at_") + (f".dim{dim}" if dim else "")


def params(job: JobConfig) -> dict[str, str]:
    """The job as flat key.path -> value strings: what trackers show as a run's parameters."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = str(value)

    walk("", job.to_dict())
    return flat


class RunLog:
    """What one worker does with each report's metrics: every rank keeps the history (it goes into
    checkpoints); rank 0 also writes metrics.jsonl and feeds the trackers."""

    def __init__(self, job: JobConfig, state: dict, rank: int):
        self.history: list[dict] = state["history"]
        self.path = storage.join(storage.resolve(job.output_dir), "metrics.jsonl")
        self.writes = rank == 0
        self.written_at = 0.0
        ids = state.setdefault("trackers", {})
        self.trackers = [_open(name, job, ids) for name in job.train.report_to] if self.writes else []

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        if not self.writes:
            return
        for tracker in self.trackers:
            tracker.log(metrics)
        if time.monotonic() - self.written_at >= WRITE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if not self.writes:
            return
        storage.put_text(self.path, "".join(json.dumps(m) + "\n" for m in self.history))
        for tracker in self.trackers:
            tracker.flush()
        self.written_at = time.monotonic()

    def close(self) -> None:
        self.flush()
        for tracker in self.trackers:
            tracker.close()


def _open(name: str, job: JobConfig, ids: dict):
    return {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}[name](job, ids)


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k not in ("step", "epoch", "done") and isinstance(v, (int, float))}


class _TensorBoard:
    """Event files in <output_dir>/tensorboard (`tensorboard --logdir <output_dir>`); for an s3://
    output_dir they are written locally and copied up at each flush."""

    def __init__(self, job: JobConfig, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.target = storage.join(storage.resolve(job.output_dir), "tensorboard")
        self.local = tempfile.mkdtemp(prefix="raykit-tb-") if storage.is_uri(self.target) else self.target
        self.writer = SummaryWriter(self.local)

    def log(self, metrics: dict) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, metrics["step"])

    def flush(self) -> None:
        self.writer.flush()
        if self.local != self.target:
            for f in Path(self.local).iterdir():
                storage.put(storage.join(self.target, f.name), f.read_bytes())

    def close(self) -> None:
        self.flush()
        self.writer.close()


class _MLflow:
    def __init__(self, job: JobConfig, ids: dict):
        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its "creating experiment" notes
        self.mlflow = mlflow
        mlflow.set_tracking_uri(mlflow_uri(storage.resolve(job.output_dir)))
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
        resumed = "mlflow" in ids
        run = mlflow.start_run(run_id=ids.get("mlflow"), run_name=_run_name(job))
        ids["mlflow"] = run.info.run_id
        if not resumed:
            mlflow.log_params(params(job))

    def log(self, metrics: dict) -> None:
        self.mlflow.log_metrics({mlflow_name(k): v for k, v in _scalars(metrics).items()}, step=metrics["step"])

    def flush(self) -> None:
        pass  # every log_metrics call is already stored

    def close(self) -> None:
        self.mlflow.end_run()


class _WandB:
    def __init__(self, job: JobConfig, ids: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or EXPERIMENT, name=_run_name(job),
                              id=ids.get("wandb"), resume="allow", config=params(job))
        ids["wandb"] = self.run.id

    def log(self, metrics: dict) -> None:
        self.run.log(_scalars(metrics), step=metrics["step"])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def _run_name(job: JobConfig) -> str:
    return storage.resolve(job.output_dir).rstrip("/").rsplit("/", 1)[-1]
