"""`raykit train` end to end on a local Ray: 2 CPU workers, a tiny BERT, the bundled quickstart data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICKSTART, REPO, upload_dir

from raykit.cli import main
from raykit.data import load_beir
from raykit.evaluate import score_rankings

JOB = str(REPO / "jobs" / "quickstart.yaml")


def overrides(tiny_model, out, *extra):
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


@pytest.mark.parametrize(
    "strategy",
    [
        ["train.strategy=lora", "lora.rank=4", "train.lr=1e-2", "train.eval_every=2"],
        ["train.strategy=full", "deepspeed.zero_stage=2", "train.lr=1e-3"],
        ["train.strategy=full", "deepspeed.zero_stage=3", "train.lr=1e-3"],
    ],
    ids=["lora", "zero2", "zero3"],
)
def test_train_two_workers(ray_cluster, tiny_model, tmp_path, strategy):
    out = tmp_path / "run"
    assert main(["train", JOB, *overrides(tiny_model, out, *strategy)]) == 0
    summary = check_outputs(out)
    assert summary["steps"] == 4 and summary["resumed_from"] == []
    evaluation = summary["eval"]
    assert evaluation["after"]["32"]["ndcg@10"] != evaluation["before"]["32"]["ndcg@10"], "the model did not change"
    assert (out / "adapter").is_dir() == (strategy[0] == "train.strategy=lora")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    periodic = [m["step"] for m in metrics if "ndcg@10/32" in m]
    assert periodic == ([2] if "train.eval_every=2" in strategy else [])


def test_failed_worker_group_restarts_from_checkpoint(ray_cluster, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYKIT_FAIL_AT_STEP", "3")
    out = tmp_path / "run"
    args = overrides(tiny_model, out, "train.checkpoint_every=2", "run.max_failures=1", "lora.rank=4")
    assert main(["train", JOB, *args]) == 0
    summary = check_outputs(out)
    assert summary["resumed_from"] == [2]


def test_rerun_resumes_then_is_a_no_op(ray_cluster, tiny_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = overrides(tiny_model, out, "train.checkpoint_every=2", "lora.rank=4")
    monkeypatch.setenv("RAYKIT_FAIL_AT_STEP", "3")
    assert main(["train", JOB, *args]) == 2
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not (out / "run.json").exists() and not (out / "model").exists()
    monkeypatch.delenv("RAYKIT_FAIL_AT_STEP")
    assert main(["train", JOB, *args]) == 0
    summary = check_outputs(out)
    assert summary["resumed_from"] == [2]
    assert main(["train", JOB, *args]) == 0
    assert "this run is complete" in capsys.readouterr().out


def test_s3_data_and_output(ray_cluster, tiny_model, s3_server, tmp_path):
    import boto3

    bucket = s3_server()
    data = upload_dir(s3_server.client, QUICKSTART, bucket, "data/quickstart")
    out = f"s3://{bucket}/runs/one"
    args = overrides(tiny_model, out, f"data.train={data}", f"eval.data={data}", "scaling.num_workers=1", "lora.rank=4")
    assert main(["train", JOB, *args]) == 0
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="runs/one/")["Contents"]}
    for name in ("run.json", "eval.json", "metrics.jsonl", "model/model.safetensors", "model/modules.json",
                 "adapter/adapter_config.json"):
        assert f"runs/one/{name}" in keys, name
    assert any(k.startswith("runs/one/checkpoints/checkpoint_") for k in keys)
    run_json = s3_server.client.get_object(Bucket=bucket, Key="runs/one/run.json")["Body"].read().decode()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in run_json and os.environ["AWS_ACCESS_KEY_ID"] not in run_json


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
def test_bad_input_is_one_line_and_exit_2_before_ray(tiny_model, tmp_path, extra, message):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "raykit", "train", JOB, *overrides(tiny_model, out, *extra)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("raykit: error: ") and message in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing half-written
