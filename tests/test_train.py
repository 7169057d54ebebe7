"""`raykit train` on a local Ray (a tiny BERT, the bundled quickstart data): a worker killed and recovered, a
killed run resumed by its rerun, and bad input refused before anything starts."""

from __future__ import annotations

import pytest
from helpers import TRAIN_JOB as JOB
from helpers import check_outputs, check_run, kill_a_worker_after_checkpoint, refused
from helpers import train_overrides as overrides

from raykit.cli import main
from raykit.errors import RunFailed
from raykit.jobfile import load_job
from raykit.train import driver


def test_zero2_recovers_from_a_killed_worker(ray_cluster, tiny_model, tmp_path):
    """A worker SIGKILLed after the step-2 checkpoint: Ray Train restarts the group from it by itself."""
    out = tmp_path / "run"
    extra = ["train.strategy=full", "deepspeed.zero_stage=2", "train.lr=1e-3", "train.checkpoint_every=2", "run.max_failures=1"]
    driver.run(load_job(JOB, overrides(tiny_model, out, *extra)), callbacks=[kill_a_worker_after_checkpoint(step=2)])
    summary, _ = check_run(out, tiny_model, "full")
    assert summary["resumed_from"] == [2]


def test_rerun_resumes_then_is_a_no_op(ray_cluster, tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output_dir, as users write it: the workers must write there too
    out = tmp_path / "run"
    # one worker: resuming is the point here (test_zero2_recovers_from_a_killed_worker has two)
    args = overrides(tiny_model, "run", "train.checkpoint_every=2", "lora.rank=4", "scaling.num_workers=1")
    with pytest.raises(RunFailed, match="rerun the same command to resume"):  # run.max_failures=0
        driver.run(load_job(JOB, args), callbacks=[kill_a_worker_after_checkpoint(step=2)])
    assert not (out / "run.json").exists() and not (out / "model").exists()
    assert main(["train", JOB, *args]) == 0
    summary = check_outputs(out)
    assert summary["resumed_from"] == [2]
    assert main(["train", JOB, *args]) == 0
    assert "this run is complete" in capsys.readouterr().out


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
