"""`raykit train` on a local Ray (a tiny BERT, the bundled quickstart data): the driver killed and its
run resumed by the rerun past a damaged checkpoint, and bad input refused before anything starts. (A
worker lost mid-run, which Ray Train recovers by itself, is test_cluster's lost node.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TRAIN_JOB as JOB
from helpers import check_run, refused
from helpers import train_overrides as overrides

from raykit.cli import main

KILLED = """
import os, sys
sys.path.insert(0, {tests!r})
from helpers import kill_the_driver_after_checkpoint
from raykit.jobfile import load_job
from raykit.train import driver
driver.run(load_job({job!r}, {args!r}), callbacks=[kill_the_driver_after_checkpoint(os.getpid(), step=4)])
"""


def test_a_killed_drivers_run_resumes_past_a_damaged_checkpoint(ray_cluster, tiny_model, tmp_path, capsys, monkeypatch):
    """ZeRO-2 on 2 workers, in a driver of its own. The driver is SIGKILLed after the step-4
    checkpoint, whose largest file is then cut short. The same command again warns in one line,
    resumes from step 2, and trains on exactly the batches an uninterrupted run does (check_run
    compares the per-rank digests of the batches' query ids; length-grouped here). The killed run
    read ahead on its workers' threads; the rerun, on a tokenizer actor per worker, streams from
    the checkpoint's step on (scaling.feed_actors, which a rerun may change). Once complete, it
    is a no-op, and another job there is refused.

    The output_dir held another job's complete run, which the first command's new_run=true replaces:
    its files go, a user's file stays. (A LoRA run's resume is the storage outage's in
    test_storage_faults; a lost node under ZeRO-3 is test_cluster's.)"""
    import ray

    from raykit import identity

    monkeypatch.chdir(tmp_path)  # a relative output_dir, as users write it: the workers must write there too
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint_00000009").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_00000009" / "state.json").write_text("{}")
    (out / "run.json").write_text('{"steps": 9}')
    (out / "notes.txt").write_text("mine")
    identity.record(str(out / "job.json"), {"train.lr": 9.0})
    # fp32: check_run compares the exported model's score with the run's at 1e-3; a bf16 run's own
    # evaluation and a bf16 model in sentence-transformers rank the tiny model's near-ties differently
    args = overrides(tiny_model, "run", "train.strategy=full", "deepspeed.zero_stage=2", "train.lr=1e-3", "train.max_steps=6",
                     "train.checkpoint_every=2", "train.group_by_length=true", "train.precision=fp32")
    script = KILLED.format(tests=str(Path(__file__).parent), job=JOB, args=[*args, "new_run=true"])
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    killed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "run.json").exists() and not (out / "model").exists()
    assert not (out / "checkpoints" / "checkpoint_00000009").exists() and (out / "notes.txt").read_text() == "mine"
    [step4] = (out / "checkpoints").glob("checkpoint_00000004*")
    damaged = max((f for f in step4.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert main(["train", JOB, *args, "scaling.feed_actors=1"]) == 0
    summary, _ = check_run(out, tiny_model, "full", steps=6)
    assert summary["resumed_from"] == [2]
    assert summary["throughput"]["read_ahead_by"] == "1 tokenizer actor(s) per worker"
    assert summary["damaged_checkpoints"] == [f"{step4.name}: {damaged.relative_to(step4)} has 100 bytes, {size} were written"]
    assert (out / "model" / "model.safetensors").exists()
    assert main(["train", JOB, *args]) == 0
    assert "this run is complete" in capsys.readouterr().out

    # Another job into the same output_dir: refused, naming what differs, and nothing changes.
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
        (["scaling.num_workers=32", "scaling.feed_actors=1"],
         "scaling: 32 worker(s) x (1 CPU(s) + 1 feed actor(s)) need 64 CPUs, and the local Ray here has"),
        (["train.strategy=full", "deepspeed.zero_stage=3", "scaling.compile=true"],
         "scaling.compile: ZeRO-3 gathers each layer's weights in hooks that break torch.compile's graph"),
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


def test_a_run_ray_train_gave_up_on_ends_in_its_workers_error_line():
    """The last line names what the workers raised, not Ray's "Training failed due to worker errors:":
    a worker's raykit error as itself (exit 2: e.g. the compiler its node lacks), any other by its
    exception line with how to resume (exit 1). Ray Train's own WorkerGroupError, as its controller
    builds one from a worker's traceback."""
    from ray.train import WorkerGroupError

    from raykit.errors import RaykitError, RunFailed
    from raykit.train.driver import _stopped

    def failed(raised: str) -> WorkerGroupError:
        snippet = ("[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n"
                   '  File "/raykit/train/loop.py", line 56, in train_fn_per_worker\n' + raised + "\n")
        return WorkerGroupError(snippet, {0: RuntimeError(raised)})

    ours = _stopped(failed("raykit.errors.RaykitError: scaling.compile: torch.compile needs a C++ compiler"), "/runs/x/checkpoints")
    assert type(ours) is RaykitError and str(ours) == "scaling.compile: torch.compile needs a C++ compiler"
    theirs = _stopped(failed("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"), "/runs/x/checkpoints")
    assert type(theirs) is RunFailed and str(theirs) == (
        "training stopped (torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB); the traceback is above. "
        "Checkpoints are in /runs/x/checkpoints: rerun the same command to resume from the latest.")


def _fails_with(attempts_dir: str, raised: str):
    """A Ray Train function that counts its attempts (a file each) and raises `raised`."""
    def train_fn(config: dict) -> None:
        import uuid
        from pathlib import Path

        from raykit.errors import RaykitError

        (Path(attempts_dir) / uuid.uuid4().hex).touch()
        if raised == "raykit":
            raise RaykitError("scaling.compile: torch.compile needs a C++ compiler, and node-7 has none")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    return train_fn


@pytest.mark.parametrize("raised", ["raykit", "other"])
def test_a_workers_bad_input_ends_the_run_at_once_and_other_errors_are_retried(ray_cluster, tmp_path, raised):
    """run.max_failures restarts a failed worker group: right for a lost node or a transient fault,
    wasted on a worker's raykit error (bad input), which every attempt would meet again. On Ray Train's
    controller (make_trainer adds the callback), such an error ends the run after its one attempt,
    and the driver's line is the error's own; any other error is retried as before."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raykit.errors import RaykitError, RunFailed
    from raykit.train.bad_input import EndOnBadInput
    from raykit.train.driver import _stopped

    attempts = tmp_path / "attempts"
    attempts.mkdir()
    trainer = TorchTrainer(
        _fails_with(str(attempts), raised),
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="run", storage_path=str(tmp_path / "storage"), callbacks=[EndOnBadInput()],
                                       failure_config=ray.train.FailureConfig(max_failures=1)))
    with pytest.raises(ray.train.TrainingFailedError) as failed:
        trainer.fit()
    line = _stopped(failed.value, "/runs/x/checkpoints")
    if raised == "raykit":
        assert len(list(attempts.iterdir())) == 1
        assert type(line) is RaykitError and str(line) == "scaling.compile: torch.compile needs a C++ compiler, and node-7 has none"
    else:
        assert len(list(attempts.iterdir())) == 2  # the first attempt and its one restart
        assert type(line) is RunFailed and "RuntimeError: CUDA error: an illegal memory access" in str(line)
