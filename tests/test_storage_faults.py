"""Storage faults, real ones: the SeaweedFS server frozen (SIGSTOP), killed and restarted under a
running `raykit embed` and a training run's checkpoint uploads; a proxy (tests/s3proxy.py) that
throttles, loses the reply to the commit, or ignores conditional writes; two embeds racing on one
output. Each output must then be exactly what an undisturbed run writes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import seaweed
from helpers import REPO, TRAIN_JOB, check_outputs, embed_overrides, refused, train_overrides
from s3proxy import S3Proxy

from raykit.cli import main
from raykit.config import EmbedJob
from raykit.embed import manifest
from raykit.embed.pipeline import run
from raykit.errors import RaykitError, RunFailed
from raykit.jobfile import load_job

EMBED_JOB = str(REPO / "jobs" / "reembed_scifact.yaml")


def embed(model: str, output: str, *extra: str) -> dict:
    return run(load_job(None, embed_overrides(model, output, *extra), EmbedJob))


@pytest.fixture
def reference(quickstart_embedded) -> dict:
    """The manifest of an undisturbed run (conftest.py): every faulted run below must write these very bytes."""
    return quickstart_embedded[1]


def digests(committed: dict) -> list[tuple[int, str]]:
    return [(s["rows"], s["sha256"]) for s in committed["shards"]]


def verify(output: str, committed: dict) -> None:
    """What a reader does: the manifest there is this one, and every shard it names checks out."""
    assert manifest.read_manifest(output) == committed
    for shard in committed["shards"]:
        manifest.read_shard(output, shard, committed["embedding"]["dim"])


def keys(client, bucket: str, prefix: str) -> dict[str, str]:
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for o in listing.get("Contents", [])}


def once_written(s3_server, bucket: str, prefix: str, fault) -> threading.Thread:
    """Run `fault` in a thread as soon as a shard record under `prefix` is new or rewritten."""
    before = keys(s3_server.client, bucket, f"{prefix}/_shards/")

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            now = keys(s3_server.client, bucket, f"{prefix}/_shards/")
            if any(before.get(k) != etag for k, etag in now.items()):
                return fault()
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# Past pyarrow's 10 s request timeout (training's checkpoint uploads), so a call stalls and times out.
FREEZE_S = 12.0


def freeze_then_restart(s3_server, seconds: float = FREEZE_S):
    def fault():
        os.kill(s3_server.server.pid, signal.SIGSTOP)
        fault.frozen = time.time()
        time.sleep(seconds)
        s3_server.server = seaweed.restart(s3_server.server)  # killed while frozen, then started again

    return fault


def test_a_longer_outage_ends_in_one_line_and_reruns_outlast_a_freeze_throttling_and_a_lost_reply_while_readers_keep_the_old(
        ray_cluster, s3_server, tiny_model, reference, monkeypatch, capsys):
    """A new run (new_run=true) over committed 16-dim embeddings and a user's files; the store freezes
    past RAYKIT_STORAGE_RETRY. Readers keep the old embeddings whole throughout; one shard the failed
    run wrote is then damaged. The rerun writes it again, outlasts a 12 s freeze and a restart of the
    store within the default budget, and commits the undisturbed run's bytes. A third run goes
    back to 16 dims through a proxy that answers every third request of the driver's (it reads
    records, probes the store, commits, retires files) with 503 SlowDown and loses the reply to the
    commit after the store wrote it: the retry gets 412, the read back finds this run's manifest,
    and it succeeds. The replaced generation's files stay one commit longer, then go; nothing raykit
    did not write goes. (One test for these runs: each costs a pipeline's start-up.)"""
    from conftest import S3_PORT

    client = s3_server.client
    bucket = s3_server()
    output = f"s3://{bucket}/emb"
    first = embed(tiny_model, output, "embed.dim=16")
    for name in ("part-000000.parquet", "notes.txt"):  # a user's files, one named as shards once were
        client.put_object(Bucket=bucket, Key=f"emb/{name}", Body=b"mine")

    monkeypatch.setenv("RAYKIT_STORAGE_RETRY", "2s")
    fault = once_written(s3_server, bucket, "emb", lambda: os.kill(s3_server.server.pid, signal.SIGSTOP))
    capsys.readouterr()
    try:
        assert main(["embed", EMBED_JOB, *embed_overrides(tiny_model, output, "new_run=true")]) == 1
    finally:
        fault.join()
        os.kill(s3_server.server.pid, signal.SIGCONT)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("raykit: failed: ") and "storage did not answer for " in last, last
    assert "rerun the same command to resume" in last and "RAYKIT_STORAGE_RETRY" in last
    verify(output, first)
    monkeypatch.delenv("RAYKIT_STORAGE_RETRY")

    records = [json.loads(client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys(client, bucket, "emb/_shards/")]
    damaged = next(r for r in records if r["dim"] == 32)
    client.put_object(Bucket=bucket, Key=f"emb/{damaged['path']}", Body=b"not a shard")
    fault = once_written(s3_server, bucket, "emb", freeze_then_restart(s3_server))
    second = embed(tiny_model, output, "new_run=true")
    fault.join()
    assert second["seconds"] > FREEZE_S  # the run did wait through the outage
    assert f"writing {damaged['name']} again" in capsys.readouterr().out
    assert digests(second) == digests(reference)
    verify(output, second)
    first_files = sorted(s["path"] for s in first["shards"])
    assert second["previous"] == first_files and all(f"emb/{p}" in keys(client, bucket, "emb/") for p in first_files)

    capsys.readouterr()
    with S3Proxy(S3_PORT, slow_down_every=3, lose_reply_to="/emb/manifest.json") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the driver's calls; workers write directly
        third = embed(tiny_model, output, "embed.dim=16", "new_run=true")  # retires the first generation's files
    monkeypatch.undo()
    assert proxy.lost == 1 and proxy.slowed >= 3
    assert "the store's reply to the commit was lost; read back, it is this run's" in capsys.readouterr().out
    assert digests(third) == digests(first)
    verify(output, third)
    stored = keys(client, bucket, "emb/")
    assert not any(f"emb/{p}" in stored for p in first_files)
    assert all(f"emb/{s['path']}" in stored for s in second["shards"])
    assert "emb/part-000000.parquet" in stored and "emb/notes.txt" in stored


def test_a_store_that_ignores_conditional_writes_is_refused_before_anything_is_written(s3_server, tiny_model, monkeypatch, capsys):
    from conftest import S3_PORT

    bucket = s3_server()
    with S3Proxy(S3_PORT, ignore_conditions=True) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        err = refused(capsys, "embed", EMBED_JOB, *embed_overrides(tiny_model, f"s3://{bucket}/emb"))
    assert err == (f"raykit: error: {proxy.url}: this S3 store ignores If-None-Match on PUT, so two jobs writing one "
                   "output could both commit; use a store with conditional writes (AWS S3, MinIO, SeaweedFS)")
    assert keys(s3_server.client, bucket, "") == {}


def test_two_embeds_into_one_output_at_once_commit_at_most_one(ray_cluster, s3_server, tiny_model):
    bucket = s3_server()
    output = f"s3://{bucket}/emb"
    results: dict[int, object] = {}

    def embed_at(dim: int) -> None:
        try:
            results[dim] = embed(tiny_model, output, f"embed.dim={dim}")
        except (RunFailed, RaykitError) as e:
            results[dim] = e

    threads = [threading.Thread(target=embed_at, args=(dim,)) for dim in (32, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results.values() if isinstance(r, dict)]
    lost = [r for r in results.values() if not isinstance(r, dict)]
    assert len(won) == 1 and len(lost) == 1, results
    assert "another job committed this output" in str(lost[0]) or "already committed with" in str(lost[0])
    verify(output, won[0])
    shards = {k for k in keys(s3_server.client, bucket, "emb/part-")}
    assert shards == {f"emb/{s['path']}" for s in won[0]["shards"]}  # the loser took its files away


def test_training_past_the_storage_budget_ends_in_one_line_and_the_rerun_outlasts_a_freeze_and_resumes_exactly(
        ray_cluster, s3_server, tiny_model, tmp_path, monkeypatch, capsys):
    """LoRA checkpoints every step into S3. The store goes away (killed) as step 2's checkpoint reaches
    it, and stays away past the budget (RAYKIT_STORAGE_RETRY=3s, forwarded to the workers): the run
    ends in one line, exit 1, naming the outage and the rerun. With the store back, the same command
    resumes from a kept checkpoint; once its first checkpoint is there the store freezes for 12 s, then
    restarts, and Ray Train's uploads wait it out within the default budget (run.max_failures=0: no
    worker restarts). The run trains on exactly the uninterrupted run's batches and leaves a model
    that scores what it reported. (One run for both faults: each costs a Ray Train start-up.)"""
    client = s3_server.client
    bucket = s3_server()
    monkeypatch.setenv("RAYKIT_STORAGE_RETRY", "3s")

    def after_checkpoint(part: str, fault) -> threading.Thread:  # a checkpoint, not Ray Train's storage marker
        def watch():
            deadline = time.time() + 180
            while time.time() < deadline and not any(part in k for k in keys(client, bucket, "run/checkpoints/checkpoint_")):
                time.sleep(0.05)
            fault()

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    def kill():
        s3_server.server.kill()
        s3_server.server.wait()

    fault = after_checkpoint("checkpoint_00000002", kill)
    # run.max_failures=0: each restart of the worker group would meet the same outage and wait out the
    # budget again before the line (README: Storage faults)
    # one worker: the faults are the store's (test_mine's LoRA run is the one on two)
    args = train_overrides(tiny_model, f"s3://{bucket}/run", "lora.rank=4", "train.checkpoint_every=1", "train.max_steps=6",
                           "run.max_failures=0", "scaling.num_workers=1")
    capsys.readouterr()
    try:
        assert main(["train", TRAIN_JOB, *args]) == 1
    finally:
        fault.join()
        s3_server.server = seaweed.restart(s3_server.server)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("raykit: failed: training stopped: storage did not answer"), last
    assert last.endswith("rerun the same command to resume from the latest (set RAYKIT_STORAGE_RETRY to wait longer)"), last

    monkeypatch.delenv("RAYKIT_STORAGE_RETRY")
    outage = freeze_then_restart(s3_server)
    fault = after_checkpoint("-r1/", outage)  # the rerun's first checkpoint (a resumed attempt's names)
    started = time.time()
    assert main(["train", TRAIN_JOB, *args]) == 0
    fault.join()
    assert time.time() - started > FREEZE_S
    # the last checkpoint was uploaded after the outage: it waited through it
    last = max((k for k in keys(client, bucket, "run/checkpoints/") if k.endswith("/state.json")))
    assert client.head_object(Bucket=bucket, Key=last)["LastModified"].timestamp() > outage.frozen + FREEZE_S - 1
    local = tmp_path / "run"
    stored = keys(client, bucket, "run/")
    for key in stored:  # the run's files, not its checkpoints nor pyarrow's folder markers
        if "/checkpoints/" not in key and not key.endswith("/") and not any(k.startswith(key + "/") for k in stored):
            target = local / key[len("run/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
    summary = check_outputs(local)  # the batches an uninterrupted run trains on, and a model that scores as reported
    assert summary["steps"] == 6 and len(summary["resumed_from"]) == 1
    assert Path(local / "adapter").is_dir()


def test_a_store_that_stays_away_ends_the_commit_as_a_run_failure_and_a_bad_budget_is_bad_input(monkeypatch, capsys):
    """Exit 1 (resumable) when nothing answers, not exit 2 (the input was fine); a malformed
    RAYKIT_STORAGE_RETRY is refused before any command starts."""
    from raykit.errors import StorageUnavailable

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{seaweed.free_port_pair()}")  # nothing listens
    monkeypatch.setenv("RAYKIT_STORAGE_RETRY", "1s")
    with pytest.raises(StorageUnavailable, match=r"manifest.json: storage did not answer for .*rerun the same command"):
        manifest.commit("s3://nowhere/emb", {"format": manifest.FORMAT})
    monkeypatch.setenv("RAYKIT_STORAGE_RETRY", "soon")
    assert refused(capsys, "config", "quickstart") == (
        "raykit: error: RAYKIT_STORAGE_RETRY: 'soon' is not a duration; use e.g. 2m, 90s or 10m")


def test_a_call_on_a_frozen_store_waits_no_longer_than_a_short_budget(s3_server, monkeypatch):
    """With RAYKIT_STORAGE_RETRY=1s, a read from a frozen store times out at the 5 s floor: pyarrow's
    client tries twice, so 10 s, where its 10 s request timeout made it 20 s."""
    from raykit import storage
    from raykit.errors import StorageUnavailable

    bucket = s3_server()
    storage.put(f"s3://{bucket}/x", b"x")
    monkeypatch.setenv("RAYKIT_STORAGE_RETRY", "1s")
    os.kill(s3_server.server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="storage did not answer"):
            storage.read_bytes(f"s3://{bucket}/x")
        assert time.monotonic() - started < 15
    finally:
        os.kill(s3_server.server.pid, signal.SIGCONT)


def test_ray_trains_s3_client_keeps_its_patience_when_ray_ships_it(monkeypatch):
    """Ray pickles RunConfig.storage_filesystem to the Train controller and workers; pyarrow's own
    pickling drops the retry strategy. Against a port where nothing listens, the shipped client must
    still back off for the budget (1 s here), where the SDK's default gives up in 0.15 s."""
    import pickle

    from raykit import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{seaweed.free_port_pair()}")
    monkeypatch.setenv("RAYKIT_STORAGE_RETRY", "1s")
    path, filesystem = storage.ray_storage("s3://nowhere/run")
    shipped = pickle.loads(pickle.dumps(filesystem))
    started = time.monotonic()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        shipped.get_file_info(path)
    assert time.monotonic() - started >= 1.0
