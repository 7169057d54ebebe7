"""`raykit train` end to end on a local Ray: 2 CPU workers, a tiny BERT, the bundled quickstart data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import QUICKSTART, kill_a_worker_after_checkpoint, refused, upload_dir
from helpers import TRAIN_JOB as JOB
from helpers import train_overrides as overrides

from raykit.cli import main
from raykit.data import load_beir
from raykit.errors import RaykitError
from raykit.evaluate import score_rankings
from raykit.jobfile import load_job
from raykit.train import driver


def st_ndcg(model_dir: str, dim: int = 32) -> float:
    """nDCG@10 of an output model as sentence-transformers embeds it: independent of raykit's encoder."""
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    beir = load_beir(str(QUICKSTART), "test")
    st = SentenceTransformer(model_dir, device="cpu")
    docs = F.normalize(torch.tensor(st.encode(list(beir.corpus.values())))[:, :dim], dim=-1)
    queries = F.normalize(torch.tensor(st.encode(list(beir.queries.values())))[:, :dim], dim=-1)
    top = (queries @ docs.T).topk(100, dim=1).indices
    ids = list(beir.corpus)
    ranked = {q: [ids[j] for j in top[i].tolist()] for i, q in enumerate(beir.queries)}
    return score_rankings(ranked, beir.qrels)["ndcg@10"]


def check_outputs(out: Path) -> dict:
    summary = json.loads((out / "run.json").read_text())
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation["before"]) == set(evaluation["after"]) == {"16", "32"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["pairs_per_s"] > 0 and m["loss"] > 0 for m in metrics)
    # the exported model, loaded by sentence-transformers, scores what the run reported
    assert st_ndcg(str(out / "model")) == pytest.approx(evaluation["after"]["32"]["ndcg@10"], abs=1e-3)
    return summary


def check_run(out: Path, tiny_model: str, strategy: str) -> tuple[dict, list[dict]]:
    """What every finished run leaves: the summary, metrics, a model that changed, its card and plots."""
    summary = check_outputs(out)
    evaluation = summary["eval"]
    assert summary["steps"] == 4
    assert evaluation["after"]["32"]["ndcg@10"] != evaluation["before"]["32"]["ndcg@10"], "the model did not change"
    assert (out / "adapter").is_dir() == (strategy == "lora")
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n") and f"fine-tuned from `{tiny_model}`" in card
    after = evaluation["after"]["32"]["ndcg@10"]
    assert f"| 32 | {evaluation['before']['32']['ndcg@10']:.4f} | {after:.4f} |" in card
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    return summary, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_on_two_workers_reports_to_tensorboard_and_mlflow(ray_cluster, tiny_model, tmp_path):
    out = tmp_path / "run"
    extra = ["lora.rank=4", "train.lr=1e-2", "train.eval_every=2", "train.report_to=[tensorboard,mlflow]"]
    assert main(["train", JOB, *overrides(tiny_model, out, *extra)]) == 0
    summary, metrics = check_run(out, tiny_model, "lora")
    assert summary["resumed_from"] == []
    assert [m["step"] for m in metrics if "ndcg@10/32" in m] == [2]  # train.eval_every
    check_trackers(out, metrics)


def test_zero2_recovers_from_a_killed_worker(ray_cluster, tiny_model, tmp_path):
    """A worker SIGKILLed after the step-2 checkpoint: Ray Train restarts the group from it by itself."""
    out = tmp_path / "run"
    extra = ["train.strategy=full", "deepspeed.zero_stage=2", "train.lr=1e-3", "train.checkpoint_every=2", "run.max_failures=1"]
    driver.run(load_job(JOB, overrides(tiny_model, out, *extra)), callbacks=[kill_a_worker_after_checkpoint(step=2)])
    summary, _ = check_run(out, tiny_model, "full")
    assert summary["resumed_from"] == [2]


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


def test_rerun_resumes_then_is_a_no_op(ray_cluster, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output_dir, as users write it: the workers must write there too
    out = tmp_path / "run"
    args = overrides(tiny_model, "run", "train.checkpoint_every=2", "lora.rank=4")
    with pytest.raises(RaykitError, match="rerun the same command to resume"):  # run.max_failures=0
        driver.run(load_job(JOB, args), callbacks=[kill_a_worker_after_checkpoint(step=2)])
    assert not (out / "run.json").exists() and not (out / "model").exists()
    assert main(["train", JOB, *args]) == 0
    summary = check_outputs(out)
    assert summary["resumed_from"] == [2]
    assert main(["train", JOB, *args]) == 0
    assert "this run is complete" in capsys.readouterr().out


def test_zero3_with_data_and_output_in_s3(ray_cluster, tiny_model, s3_server, tmp_path):
    import boto3

    bucket = s3_server()
    data = upload_dir(s3_server.client, QUICKSTART, bucket, "data/quickstart")
    out = f"s3://{bucket}/runs/one"
    extra = ["train.strategy=full", "deepspeed.zero_stage=3", "train.lr=1e-3", "train.report_to=[tensorboard]"]
    assert main(["train", JOB, *overrides(tiny_model, out, f"data.train={data}", f"eval.data={data}", *extra)]) == 0
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/one/")["Contents"]}
    for name in ("run.json", "eval.json", "metrics.jsonl", "loss_curve.png", "model/model.safetensors",
                 "model/modules.json", "model/README.md"):
        assert f"runs/one/{name}" in keys, name
    assert any(k.startswith("runs/one/tensorboard/events.out.tfevents.") for k in keys)  # copied up from the worker
    assert any(k.startswith("runs/one/checkpoints/checkpoint_") for k in keys)
    run_json = s3_server.client.get_object(Bucket=bucket, Key="runs/one/run.json")["Body"].read().decode()
    assert json.loads(run_json)["steps"] == 4
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in run_json and os.environ["AWS_ACCESS_KEY_ID"] not in run_json
    metrics = s3_server.client.get_object(Bucket=bucket, Key="runs/one/metrics.jsonl")["Body"].read().decode()
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["lora.target_modules=[q_proj]"], "lora.target_modules: 'q_proj' matches no Linear layer"),
        (["data.train=/nonexistent/pairs.jsonl"], "data.train: /nonexistent/pairs.jsonl: no such file or folder"),
        (["eval.dims=[64]"], "eval.dims: 64 is larger than the model's 32 dimensions"),
        (["eval.data=/nonexistent/beir"], "eval.data: /nonexistent/beir: no such folder"),
        (["train.batch_size=4096"], "less than one batch per worker"),
        (["train.lrr=1"], "did you mean 'train.lr'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(tiny_model, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert message in refused(capsys, "train", JOB, *overrides(tiny_model, out, *extra))
    assert not out.exists()  # nothing half-written
