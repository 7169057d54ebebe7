"""The real `raykit` command in a subprocess: what a user's terminal (or `ray job logs`) shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO


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


def test_version_and_usage(capsys):
    import pytest

    from raykit import __version__
    from raykit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"raykit {__version__}\n"
    with pytest.raises(SystemExit) as done:
        main(["train"])
    assert done.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == "raykit train: error: the following arguments are required: job"


def test_config_prints_the_resolved_job_that_loads_back_and_fails_as_train_would(tmp_path, capsys):
    import yaml

    from raykit.cli import main
    from raykit.jobfile import load_job

    assert main(["config", "quickstart", "lora.rank=8", "train.lr=5e-4"]) == 0  # a packaged job by name
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    again = load_job(tmp_path / "resolved.yaml")
    assert again == load_job(REPO / "jobs" / "quickstart.yaml", ["lora.rank=8", "train.lr=5e-4"])
    assert yaml.safe_load(printed)["lora"]["rank"] == 8

    assert main(["config", "quickstart", "train.lrr=1"]) == 2
    assert capsys.readouterr().err == (f"raykit: error: {REPO / 'jobs' / 'quickstart.yaml'}: unknown key 'train.lrr' "
                                       "(did you mean 'train.lr'?)\n")
    assert main(["train", "no_such_job"]) == 2
    assert "no_such_job: no such file, nor a packaged job of that name; one of: full_matryoshka_distill," in capsys.readouterr().err


def test_jobs_lists_every_packaged_job_and_space(capsys):
    from raykit.cli import main

    assert main(["jobs"]) == 0
    listed = capsys.readouterr().out
    for path in [*(REPO / "jobs").glob("*.yaml"), *(REPO / "tune_spaces").glob("*.yaml")]:
        assert f"  {path.stem} " in listed


def test_quiet_shows_warnings_only_and_verbose_opens_rays_loggers(capsys):
    import logging

    from raykit.cli import main

    assert main(["plan", "-q", "--gpu-mem", "0", "--pairs", "5000"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["plan", "-v", "--gpu-mem", "0", "--pairs", "5000"]) == 0
    assert "[raykit] plan: " in capsys.readouterr().out and logging.getLogger("ray").level == logging.DEBUG
    assert main(["plan", "--gpu-mem", "0", "--pairs", "5000"]) == 0
    assert logging.getLogger("raykit").level == logging.INFO and logging.getLogger("ray").level == logging.WARNING


def test_each_way_a_command_ends_has_its_exit_code_and_one_last_line(monkeypatch, capsys):
    """The CLI's mapping, with a command replaced (the real failures are tested where they happen:
    test_embed's failed write exits 1, test_sweep's Ctrl-C exits 130)."""
    from raykit import cli
    from raykit.errors import ConfigError, Interrupted, RunFailed

    def ends_with(exc):
        def command(args):
            raise exc

        return command

    cases = [
        (ConfigError("jobs/x.yaml: bad"), 2, "raykit: error: jobs/x.yaml: bad"),
        (RunFailed("training stopped (a worker died); rerun the same command"), 1,
         "raykit: failed: training stopped (a worker died); rerun the same command"),
        (Interrupted("1 of 4 trials done; rerun the same command"), 130, "raykit: interrupted: 1 of 4 trials done; rerun the same command"),
        (KeyboardInterrupt(), 130, "raykit: interrupted; rerun the same command to resume"),
    ]
    for exc, code, line in cases:
        monkeypatch.setitem(cli.COMMANDS, "plan", ends_with(exc))
        capsys.readouterr()
        assert cli.main(["plan", "--gpu-mem", "0", "--pairs", "5000"]) == code
        assert capsys.readouterr().err.splitlines()[-1] == line
    assert "130 interrupted" in cli._parser().format_help()
