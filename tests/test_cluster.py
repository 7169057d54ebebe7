"""`ray job submit` on a real multi-node Ray: a head with no CPUs and two 1-CPU worker nodes, token
authentication on, data and outputs on the real S3 server. What a user's first submission does.

S3 credentials reach the workers the way they do on a cluster: through the nodes' environment
(tests/raycluster.py starts every node with the AWS_* variables), never through the job.
`make cluster-test` runs this module alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import raycluster
from helpers import QUICKSTART, REPO, S3_ENV, upload_dir

UPLOAD_LIMIT = 2_000_000  # bytes: the repository without .git, .venv, runs and results is well under this


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    # Ray Data starts a pool's actors asynchronously and feeds whichever is up first: a few small shards
    # could all go to one encoder. Waiting for the whole pool makes "one encoder on each node" certain.
    env = {"HF_HUB_OFFLINE": "1", "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"}
    # Each worker node also offers Ray one GPU, a logical one (this machine has no device: what runs
    # there computes on its CPU), so that `embed.num_gpus=1` builds the pipeline of a GPU cluster.
    c = raycluster.start(tmp_path_factory.mktemp("cluster"), workers=2, cpus_per_worker=1, extra_env=env, gpus_per_worker=1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def bucket(s3_server, tiny_model) -> str:
    """A bucket holding the training data (a BEIR folder) and the base model, as a team's would."""
    name = s3_server()
    upload_dir(s3_server.client, QUICKSTART, name, "data/quickstart")
    upload_dir(s3_server.client, Path(tiny_model), name, "models/tiny-bert")
    return name


def submit(cluster, *entrypoint: str, submission_id: str) -> tuple[str, str, float]:
    """`ray job submit --working-dir .`, waiting for the end; returns (status, logs, seconds). The
    status and logs are read back from the Jobs API, as `ray job status` and `ray job logs` do. It
    first waits until the previous job's actors have given back every worker CPU."""
    cluster.wait_idle()
    started = time.perf_counter()
    submitted = cluster.ray("job", "submit", "--address", cluster.address, "--working-dir", str(REPO),
                            "--submission-id", submission_id, "--", *entrypoint)
    seconds = time.perf_counter() - started
    status = cluster.api(f"/api/jobs/{submission_id}")["status"]
    assert status in ("SUCCEEDED", "FAILED", "STOPPED"), f"{status}\n{submitted.stdout[-3000:]}{submitted.stderr[-3000:]}"
    assert (submitted.returncode == 0) == (status == "SUCCEEDED")  # the CLI's exit code says it too
    return status, cluster.api(f"/api/jobs/{submission_id}/logs")["logs"], seconds


def actor_nodes(cluster, class_part: str) -> list[str]:
    """The node addresses of every actor that ran (alive or dead) whose class name contains `class_part`,
    from the State API (what `ray list actors` reads)."""
    def listed(kind: str, **query) -> list[dict]:
        args = "&".join(f"{k}={v}" for k, v in {"limit": 10000, **query}.items())
        return cluster.api(f"/api/v0/{kind}?{args}")["data"]["result"]["result"]

    ips = {n["node_id"]: n["node_ip"] for n in listed("nodes")}
    return sorted(ips[a["node_id"]] for a in listed("actors", detail=1)
                  if a.get("node_id") and class_part in (a.get("class_name") or "") + (a.get("repr_name") or ""))


def test_zero3_training_spreads_over_both_nodes_survives_losing_one_and_writes_a_loadable_model_to_s3(
        cluster, bucket, s3_server, record_property):
    """Data, base model and every output in S3; ZeRO-3 gathers the sharded weights for the export.
    One worker node is lost for good once step 2's checkpoint is in S3 (its Ray processes SIGKILLed)
    and a fresh node takes its place, as an autoscaler would bring one: the run resumes from its
    latest checkpoint by itself and trains on exactly the batches of an uninterrupted run.

    Meanwhile a second submission, a job with a local output_dir, is refused on the head node in one
    line before any worker starts (its entrypoint takes no CPU), as a user's first try often is."""
    from helpers import uninterrupted_batches_sha256

    output = f"s3://{bucket}/runs/zero3"
    client = s3_server.client
    local = cluster.ray("job", "submit", "--address", cluster.address, "--working-dir", str(REPO), "--submission-id",
                        "local-output", "--no-wait", "--", "raykit", "train", "jobs/quickstart.yaml",
                        f"model.name=s3://{bucket}/models/tiny-bert", f"data.train=s3://{bucket}/data/quickstart", "output_dir=runs/local")
    assert local.returncode == 0, local.stderr[-3000:]

    def lose_a_node_after_step_2():
        deadline = time.time() + 600
        while time.time() < deadline:
            listed = client.list_objects_v2(Bucket=bucket, Prefix="runs/zero3/checkpoints/checkpoint_00000002")
            if listed.get("KeyCount"):
                return cluster.replace_node("127.0.0.4")
            time.sleep(0.2)

    loss = threading.Thread(target=lose_a_node_after_step_2, daemon=True)
    loss.start()
    status, logs, seconds = submit(
        cluster, "raykit", "train", "jobs/quickstart.yaml", f"model.name=s3://{bucket}/models/tiny-bert",
        f"data.train=s3://{bucket}/data/quickstart", f"eval.data=s3://{bucket}/data/quickstart", f"output_dir={output}",
        "train.strategy=full", "deepspeed.zero_stage=3", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        "train.batch_size=8", "train.max_steps=4", "train.log_every=2", "model.max_seq_length=32", "eval.dims=[32]",
        "train.report_to=[tensorboard]", "train.checkpoint_every=1",
        # fp32 on every CPU: the exact embedding check below compares fp32 with fp32 (under auto, an AMX
        # CPU trains and saves bf16, which sentence-transformers then runs in bf16)
        "train.precision=fp32",
        submission_id="zero3",
    )
    loss.join()
    assert status == "SUCCEEDED", logs[-4000:]
    assert "step 4/4 (100%)" in logs and f"model: {output}/model" in logs
    for secret in S3_ENV.values():  # the job's logs never carry a credential
        assert secret == "us-east-1" or secret not in logs

    # Ray Train workers on both worker nodes (the head has no CPUs), each with 1 CPU: the first group's
    # two, and after the loss the second group's two, one of them on the new node.
    assert actor_nodes(cluster, "RayTrainWorker") == ["127.0.0.3", "127.0.0.3", "127.0.0.4", "127.0.0.4"]

    # Everything a run writes, in S3; the event files copied up from the worker that wrote them.
    client = s3_server.client
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/zero3/")["Contents"]}
    for name in ("run.json", "eval.json", "metrics.jsonl", "loss_curve.png", "model/model.safetensors",
                 "model/modules.json", "model/README.md"):
        assert f"runs/zero3/{name}" in keys, name
    assert any(k.startswith("runs/zero3/tensorboard/events.out.tfevents.") for k in keys)
    assert any(k.startswith("runs/zero3/checkpoints/checkpoint_") for k in keys)
    run_json = client.get_object(Bucket=bucket, Key="runs/zero3/run.json")["Body"].read().decode()
    run = json.loads(run_json)
    assert run["steps"] == 4 and run["config"]["train"]["strategy"] == "full" and run["eval"]["after"]["32"]
    assert len(run["resumed_from"]) == 1 and run["resumed_from"][0] >= 2  # the node loss, resumed once
    assert run["batches_sha256"] == uninterrupted_batches_sha256(run)
    for secret in S3_ENV.values():  # nor does what it stores
        assert secret == "us-east-1" or secret not in run_json
    metrics = client.get_object(Bucket=bucket, Key="runs/zero3/metrics.jsonl")["Body"].read().decode()
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [2, 4]

    # The model in S3 loads with sentence-transformers, and embeds as raykit does.
    from sentence_transformers import SentenceTransformer

    from raykit import cache
    from raykit.encoder import Encoder

    local = cache.local_copy(f"{output}/model")
    text = ["the pump seal leaks", "restart the chiller"]
    st = SentenceTransformer(local, device="cpu").encode(text, convert_to_numpy=True)
    np.testing.assert_allclose(st, Encoder.from_pretrained(local).encode(text, role="document").numpy(), atol=1e-5)

    # The upload: the repository without history, environments or results.
    unpacked = Path(cluster.temp_dirs[0]).glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
    (package,) = [p for p in unpacked if p.is_dir()]
    files = [f for f in package.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    names = {str(f.relative_to(package)).split("/")[0] for f in files}
    assert {"raykit", "jobs", "tune_spaces", "data", "pyproject.toml"} <= names
    assert not names & {".git", ".venv", "runs", "tests", "k8s"} and not any("bench/results" in str(f) for f in files)
    assert size < UPLOAD_LIMIT
    # The submission with a local output_dir, long done: failed, raykit's line last in its logs.
    assert cluster.api("/api/jobs/local-output")["status"] == "FAILED"
    last = cluster.api("/api/jobs/local-output/logs")["logs"].strip().splitlines()[-1]
    assert last.startswith("raykit: error: output_dir: ") and "is a local path, but this Ray cluster spans 3 hosts" in last
    assert last.endswith("output_dir=s3://bucket/prefix")
    record_property("figure", f"[cluster] ray job submit -> SUCCEEDED, 2-node ZeRO-3 training (4 steps, a node lost at step 2 "
                              f"and replaced): {seconds:.1f} s; upload {size / 1e3:.0f} kB in {len(files)} files")


def test_embed_runs_an_encoder_actor_on_each_node_and_commits_exact_embeddings(cluster, bucket, s3_server):
    """`embed.num_gpus=1`: the pipeline a GPU cluster runs, one encoder actor per GPU fed by tokenizer
    actors and followed by writer actors (the nodes' GPUs are logical: the encoders compute on CPU)."""
    from raykit import cache
    from raykit.data import load_beir
    from raykit.encoder import Encoder

    model = f"s3://{bucket}/models/tiny-bert"
    output = f"s3://{bucket}/emb/v1"
    status, logs, _ = submit(
        cluster, "raykit", "embed", "jobs/reembed_scifact.yaml", f"model={model}",
        f"corpus=s3://{bucket}/data/quickstart", f"output={output}", "max_seq_length=32",
        "embed.num_gpus=1", "embed.cpus_per_actor=1", "embed.shard_mb=0.01", "embed.precision=fp32",
        submission_id="embed",
    )
    assert status == "SUCCEEDED", logs[-4000:]
    assert actor_nodes(cluster, "EncodeShards") == ["127.0.0.3", "127.0.0.4"]
    assert actor_nodes(cluster, "TokenizeShards") and actor_nodes(cluster, "WriteShards")

    client = s3_server.client
    committed = json.loads(client.get_object(Bucket=bucket, Key="emb/v1/manifest.json")["Body"].read())
    corpus = load_beir(str(QUICKSTART), "test").corpus
    assert committed["rows"] == len(corpus) and len(committed["shards"]) > 2
    encoder = Encoder.from_pretrained(cache.local_copy(model), 32)
    for shard in committed["shards"]:
        body = client.get_object(Bucket=bucket, Key=f"emb/v1/{shard['path']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == shard["sha256"]
        table = pq.read_table(io.BytesIO(body))
        stored = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
        expected = encoder.encode([corpus[i] for i in table["id"].to_pylist()], role="document").numpy()
        np.testing.assert_allclose(stored, expected, atol=1e-5)


def test_a_submission_with_the_wrong_token_is_refused(cluster):
    env = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    done = cluster.ray("job", "submit", "--address", cluster.address, "--", "echo", "hello", env=env)
    assert done.returncode != 0 and "Invalid authentication token" in done.stderr
    listed = cluster.ray("job", "list", "--address", cluster.address).stdout
    assert "echo hello" not in listed
