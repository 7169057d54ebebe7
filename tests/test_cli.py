"""The real `raykit` command in a subprocess: what a user's terminal (or `ray job logs`) shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_a_bad_run_ends_with_the_one_line_error_last_and_exit_2(ray_cluster, tiny_model, tmp_path):
    """Joined to a running Ray as under `ray job submit`, with Ray's log forwarding on (as raykit runs):
    whatever Ray forwards from workers and its own processes, raykit's error is the last line."""
    import ray

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "raykit"), "embed", str(REPO / "jobs" / "reembed_scifact.yaml"),
         f"model={tiny_model}", f"corpus={corpus}", f"output={out}", "max_seq_length=32"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == f"raykit: error: {corpus}:2: 'text' is missing or not a string; every line needs id and text"
    assert not (out / "manifest.json").exists()
