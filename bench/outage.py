"""The longest S3 outage each of raykit's storage paths outlasts: how long a write keeps trying before
it gives up, against a real S3 server (SeaweedFS on loopback) that is down (killed: connections
refused) or frozen (SIGSTOP: connections accepted, never answered).

Two paths: raykit's own calls (`storage.retrying` around every read and write: shards, records,
run.json, the manifest) and the S3 client Ray Train and Tune upload checkpoints with (its backoff
sized by `storage.sdk_attempts`). Measured at RAYKIT_STORAGE_RETRY=20s to keep the run short; the
table also gives what the default (2m) makes of each.

    python bench/outage.py
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, cpu_name, save

sys.path.insert(0, str(REPO / "tests"))
import seaweed  # noqa: E402  (the tests' real server)
from helpers import S3_ENV  # noqa: E402

BUDGET = "20s"


def give_up_after(write, fault: str, server) -> tuple[float, str, object]:
    """Seconds from the outage's start until `write` gives up, and its error's first words."""
    os.kill(server.pid, signal.SIGSTOP if fault == "frozen" else signal.SIGKILL)
    started = time.monotonic()
    try:
        write()
        error = "none (it succeeded)"
    except Exception as e:  # noqa: BLE001 - what each path raises is the point
        error = f"{type(e).__name__}: {str(e)[:90]}"
    seconds = time.monotonic() - started
    return seconds, error, seaweed.restart(server)


def main() -> None:
    os.environ.update(S3_ENV)
    os.environ["RAYKIT_STORAGE_RETRY"] = BUDGET
    port = seaweed.free_port_pair()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    from raykit import storage

    server = seaweed.start(Path(tempfile.mkdtemp(prefix="raykit-outage-")), port)
    import boto3

    bucket = seaweed.make_bucket(boto3.client("s3"), "raykit-outage")
    uri = f"s3://{bucket}/x/file.bin"
    data = os.urandom(1 << 20)

    def ours():
        storage.put(uri, data)

    def ray_train():
        path, fs = storage.ray_storage(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)

    print(f"CPU: {cpu_name()} | RAYKIT_STORAGE_RETRY={BUDGET}", flush=True)
    rows = []
    try:
        for name, write in (("raykit's calls", ours), ("Ray Train's uploads", ray_train)):
            for fault in ("down", "frozen"):
                seconds, error, server = give_up_after(write, fault, server)
                rows.append({"path": name, "fault": fault, "gives_up_after_s": round(seconds, 1), "error": error})
                print(f"{name:20s} {fault:7s} gives up after {seconds:6.1f} s  ({error})", flush=True)
    finally:
        seaweed.stop(server)

    budget = storage.retry_seconds()
    attempts_default = storage.sdk_attempts(120.0)
    sdk_default = 0.025 * (2 ** attempts_default - 2)
    md = [f"Longest S3 outage outlasted, measured at RAYKIT_STORAGE_RETRY={BUDGET} ({cpu_name()}):", "",
          "| path | store | gives up after | at the default 2m |", "|---|---|---|---|"]
    for r in rows:
        if r["path"].startswith("raykit"):
            default = "2m (+ at most one 10 s request timeout)"
        else:
            default = f"{sdk_default:.0f} s" + (f" + {attempts_default} x 10 s timeouts" if r["fault"] == "frozen" else "")
        md.append(f"| {r['path']} | {r['fault']} | {r['gives_up_after_s']} s | {default} |")
    print("\n" + "\n".join(md))
    save("outage", {"cpu": cpu_name(), "budget_s": budget, "rows": rows, "ray_train_attempts_at_2m": attempts_default}, "\n".join(md))


if __name__ == "__main__":
    main()
