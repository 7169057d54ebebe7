"""`raykit train` on a local Ray (a tiny BERT, the bundled quickstart data): a worker killed and recovered, a
killed driver's run resumed by its rerun past a damaged checkpoint, and bad input refused before anything
starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TRAIN_JOB as JOB
from helpers import check_outputs, check_run, kill_a_worker_after_checkpoint, refused
from helpers import train_overrides as overrides

from raykit.cli import main
from raykit.jobfile import load_job
from raykit.train import driver


def test_a_killed_worker_is_recovered_by_default_with_no_batch_skipped_or_repeated(ray_cluster, tiny_model, tmp_path):
    """A ZeRO-2 worker SIGKILLed after the step-2 checkpoint: Ray Train restarts the group from it by
    itself (run.max_failures is on by default), and the run trains on exactly the batches an
    uninterrupted run does (check_run compares the per-rank digests of the batches' query ids). The
    output_dir held another job's complete run, which new_run=true replaces: its files go, a user's
    file stays. (A LoRA run's resume is the killed driver's below and the storage outage's in
    test_storage_faults; a lost node under ZeRO-3 is test_cluster's.)"""
    from raykit import identity

    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint_00000009").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_00000009" / "state.json").write_text("{}")
    (out / "run.json").write_text('{"steps": 9}')
    (out / "notes.txt").write_text("mine")
    identity.record(str(out / "job.json"), {"train.lr": 9.0})
    # fp32: check_run compares the exported model's score with the run's at 1e-3; a bf16 run's own
    # evaluation and a bf16 model in sentence-transformers rank the tiny model's near-ties differently
    args = overrides(tiny_model, out, "train.strategy=full", "deepspeed.zero_stage=2", "train.lr=1e-3", "train.checkpoint_every=2",
                     "new_run=true", "train.precision=fp32")
    driver.run(load_job(JOB, args), callbacks=[kill_a_worker_after_checkpoint(step=2)])
    summary, _ = check_run(out, tiny_model, "full")
    assert summary["resumed_from"] == [2]
    assert not (out / "checkpoints" / "checkpoint_00000009").exists() and (out / "notes.txt").read_text() == "mine"


KILLED_DRIVER = """
import os, sys
sys.path.insert(0, {tests!r})
from helpers import kill_the_driver_after_checkpoint
from raykit.jobfile import load_job
from raykit.train import driver
driver.run(load_job({job!r}, {args!r}), callbacks=[kill_the_driver_after_checkpoint(os.getpid(), step=4)])
"""


def test_a_killed_driver_resumes_from_the_latest_sound_checkpoint_and_another_job_is_refused(ray_cluster, tiny_model, tmp_path, capsys, monkeypatch):
    """The driver SIGKILLed after the step-4 checkpoint, whose adapter file is then cut short: the same
    command again warns in one line, resumes from step 2, and trains on the uninterrupted run's batches
    (length-grouped here).
    Once complete, it is a no-op, and another job there is refused."""
    import ray

    monkeypatch.chdir(tmp_path)  # a relative output_dir, as users write it: the workers must write there too
    out = tmp_path / "run"
    # length-grouped batches (train.group_by_length): they resume exactly too (check_outputs' digests)
    args = overrides(tiny_model, "run", "train.max_steps=6", "train.checkpoint_every=2", "lora.rank=4", "scaling.num_workers=1",
                     "train.group_by_length=true")
    script = KILLED_DRIVER.format(tests=str(Path(__file__).parent), job=JOB, args=args)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    killed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "run.json").exists() and not (out / "model").exists()

    damaged = out / "checkpoints" / "checkpoint_00000004" / "lora_state.pt"
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[:100])
    assert main(["train", JOB, *args]) == 0
    summary = check_outputs(out)
    assert summary["resumed_from"] == [2]
    assert summary["damaged_checkpoints"] == [f"checkpoint_00000004: lora_state.pt has 100 bytes, {len(whole)} were written"]
    assert main(["train", JOB, *args]) == 0
    assert "this run is complete" in capsys.readouterr().out

    # Another job into the same output_dir: refused, naming what differs, and nothing changes
    # (test_a_killed_worker_is_recovered_... replaces one with new_run=true).
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    error = refused(capsys, "train", JOB, *args, "train.lr=0.5", "train.max_steps=2")
    assert error.endswith("holds a run of another job (train.lr: 0.001 there, 0.5 here; train.max_steps: 6 there, 2 here); "
                          "use another output_dir, or new_run=true to replace that run"), error
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["lora.target_modules=[q_proj]"], "lora.target_modules: 'q_proj' matches no Linear layer"),
        (["data.train=/nonexistent/pairs.jsonl"], "data.train: /nonexistent/pairs.jsonl: no such file or folder"),
        (["eval.dims=[64]"], "eval.dims: 64 is larger than the model's 32 dimensions"),
        (["eval.data=/nonexistent/beir"], "eval.data: /nonexistent/beir: no such folder"),
        (["train.batch_size=4096"], "less than one batch per worker"),
        (["train.lrr=1"], "did you mean 'train.lr'"),
        (["output_dir=s3://"], "output_dir: s3://: no bucket named; use s3://bucket/prefix"),
        (["model.name=/nonexistent/model"], "model.name: /nonexistent/model: no such folder; point it at a model folder"),
        (["model.max_seq_length=512"], "model.max_seq_length: 512 is past the 128 positions"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(tiny_model, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert message in refused(capsys, "train", JOB, *overrides(tiny_model, out, *extra))
    assert not out.exists()  # nothing half-written


def test_an_output_dir_that_is_a_file_is_refused(tiny_model, tmp_path, capsys):
    (tmp_path / "run").write_text("mine")
    err = refused(capsys, "train", JOB, *overrides(tiny_model, tmp_path / "run"))
    assert err == f"raykit: error: output_dir: {tmp_path / 'run'} is a file; give the path of a folder to write"
    err = refused(capsys, "train", JOB, *overrides(tiny_model, tmp_path / "run" / "sub"))
    assert err.startswith(f"raykit: error: output_dir: {tmp_path / 'run'} is a file, so nothing can be written under it")
    assert (tmp_path / "run").read_text() == "mine"
