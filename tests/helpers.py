"""What several test modules share: paths, the quickstart train job's overrides, what every finished
training run must leave, S3 uploads, and real faults (a Ray Train worker killed with SIGKILL).
Fixtures live in conftest.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

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


# `raykit embed` of the quickstart corpus (~40 kB) as the tests run it: 7 shards (a fault lands with
# most still to write), max length 48, one encoder actor unless a test asks for more, fp32.
EMBED_MAX_LEN = 48
EMBED_SHARD_MB = 0.005


def embed_overrides(model: str, output, *extra: str) -> list[str]:
    return [f"model={model}", f"corpus={QUICKSTART}", f"output={output}", f"max_seq_length={EMBED_MAX_LEN}",
            f"embed.shard_mb={EMBED_SHARD_MB}", "embed.concurrency=1", "embed.precision=fp32", *extra]


def st_ndcg(model_dir: str, dim: int = 32) -> float:
    """nDCG@10 of an output model as sentence-transformers embeds it: independent of raykit's encoder."""
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    from raykit.data import load_beir
    from raykit.evaluate import score_rankings

    beir = load_beir(str(QUICKSTART), "test")
    st = SentenceTransformer(model_dir, device="cpu")
    docs = F.normalize(torch.tensor(st.encode_document(list(beir.corpus.values())))[:, :dim], dim=-1)
    queries = F.normalize(torch.tensor(st.encode_query(list(beir.queries.values())))[:, :dim], dim=-1)
    top = (queries @ docs.T).topk(100, dim=1).indices
    ids = list(beir.corpus)
    ranked = {q: [ids[j] for j in top[i].tolist()] for i, q in enumerate(beir.queries)}
    return score_rankings(ranked, beir.qrels)["ndcg@10"]


def uninterrupted_batches_sha256(summary: dict) -> list[str]:
    """The per-rank batch digests an uninterrupted run of this job leaves: its batches recomputed
    here, step by step, from raykit.train.batches' order (a killed and resumed run must match them)."""
    from raykit.config import DataConfig
    from raykit.data import load_training_set
    from raykit.jobfile import build
    from raykit.train.batches import BatchDigest, epoch_batches, row_lengths, take

    job = summary["config"]
    table = load_training_set(build(DataConfig, job["data"], "run.json", "data."), job["train"]["seed"])
    world, batch_size, seed = job["scaling"]["num_workers"], job["train"]["batch_size"], job["train"]["seed"]
    steps_per_epoch = table.num_rows // world // batch_size
    lengths = row_lengths(table) if job["train"].get("group_by_length") else None
    digests = []
    for rank in range(world):
        digest = BatchDigest()
        for step in range(summary["steps"]):
            epoch, i = divmod(step, steps_per_epoch)
            digest.update(take(table, epoch_batches(table.num_rows, world, rank, batch_size, seed, epoch, lengths)[i]))
        digests.append(digest.value)
    return digests


def check_outputs(out: Path) -> dict:
    """What every finished run leaves, interrupted or not: its evaluation, its metrics (each step once),
    the batches an uninterrupted run trains on, and a model that scores what the run reported."""
    summary = json.loads((out / "run.json").read_text())
    assert summary["batches_sha256"] == uninterrupted_batches_sha256(summary)
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation["before"]) == set(evaluation["after"]) == {"16", "32"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, summary["steps"] + 1))
    assert all(m["pairs_per_s"] > 0 and m["loss"] > 0 for m in metrics)
    # the exported model, loaded by sentence-transformers, scores what the run reported. A run in bf16
    # (this machine's CPU workers, train.precision=auto where it has AMX) evaluated in bf16, and a model
    # saved in bf16 computes in bf16 there: near-tied documents of the tiny model may swap places.
    import torch

    from raykit.precision import use_bf16

    bf16 = (use_bf16(summary["config"]["train"]["precision"], torch.device("cpu"))
            or json.loads((out / "model" / "config.json").read_text()).get("dtype") == "bfloat16")
    reported, scored = evaluation["after"]["32"]["ndcg@10"], st_ndcg(str(out / "model"))
    assert scored == pytest.approx(reported, abs=5e-3 if bf16 else 1e-3), (scored, reported)
    return summary


def check_run(out: Path, tiny_model: str, strategy: str, steps: int = 4) -> tuple[dict, list[dict]]:
    """What every finished run leaves: the summary, metrics, a model that changed, its card and plots."""
    summary = check_outputs(out)
    evaluation = summary["eval"]
    assert summary["steps"] == steps
    assert evaluation["after"]["32"]["ndcg@10"] != evaluation["before"]["32"]["ndcg@10"], "the model did not change"
    assert (out / "adapter").is_dir() == (strategy == "lora")
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n") and f"fine-tuned from `{tiny_model}`" in card
    after = evaluation["after"]["32"]["ndcg@10"]
    assert f"| 32 | {evaluation['before']['32']['ndcg@10']:.4f} | {after:.4f} |" in card
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    throughput = summary["throughput"]  # no accelerator peak known on a CPU: no MFU
    assert throughput["pairs_per_s"] > 0 and throughput["flops_per_pair"] > 0
    assert throughput["mfu"] is None or summary["config"]["scaling"]["peak_tflops"]
    return summary, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_trackers(out: Path, metrics: list[dict]) -> None:
    """The TensorBoard event files and the MLflow store hold what metrics.jsonl holds, read back by
    their own readers."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == [(m["step"], round(m["loss"], 5)) for m in metrics]
    assert [e.step for e in events.Scalars("ndcg@10/32")] == [2]

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as raykit's workers set it for its default store
    client = MlflowClient((out / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("raykit").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "run" and runs[0].data.params["lora.rank"] == "4"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [(h.step, round(h.value, 5)) for h in history] == [(m["step"], round(m["loss"], 5)) for m in metrics]
    assert [h.step for h in client.get_metric_history(runs[0].info.run_id, "ndcg_at_10.dim32")] == [2]
    assert runs[0].info.status == "FINISHED"


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


def kill_the_driver_after_checkpoint(driver_pid: int, step: int):
    """A Ray Train callback that SIGKILLs the driver once the checkpoint of `step` is registered, as a
    lost login node or an OOM-killed submitter ends a run. It then holds the controller until Ray
    reaps the run's processes (the driver's death ends them), so no later checkpoint is written."""
    import ray.train

    class KillTheDriver(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None and metrics and metrics[0].get("step") == step:
                import time

                os.kill(driver_pid, signal.SIGKILL)
                time.sleep(60)

    return KillTheDriver()


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


def custom_code_model(tiny_model, path):
    """The tiny BERT as a model whose repository brings its own code (config.json's auto_map)."""
    import json
    import shutil

    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="custom-bert", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                      "AutoModel": "modeling_custom.CustomModel"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_custom.py").write_text(
        "from transformers import BertConfig\n\n\nclass CustomConfig(BertConfig):\n    model_type = 'custom-bert'\n")
    (path / "modeling_custom.py").write_text(
        "from transformers import BertModel\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n")
    return str(path)
