"""`raykit tune`: a real Ray Tune sweep of real Ray Train runs (tiny BERT, quickstart data, 2 CPUs).

The sweep runs once per module; the tests read what it wrote. Then: a sweep into S3 interrupted with
Ctrl-C resumes instead of starting over, and bad spaces fail with one line before any trial starts.
(tests/test_cluster.py submits the other commands with `ray job submit`; a sweep's S3 output is here.)
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import QUICKSTART, REPO, refused, train_overrides

from raykit.cli import main

JOB = str(REPO / "jobs" / "quickstart.yaml")


def job_overrides(tiny_model, out, *extra):
    # test_train's run (tiny BERT, quickstart data), on one worker with a 16-step budget
    return train_overrides(tiny_model, out, "eval.dims=[32]", "train.batch_size=16", "train.max_steps=16",
                           "train.log_every=4", "scaling.num_workers=1", *extra)


def write_space(path: Path, space: dict, **tune) -> str:
    doc = {
        "space": space,
        "fixed": {"data.val_queries": 40, "data.val_corpus": 200, "train.eval_every": 4},
        "tune": {"num_samples": 1, "seed": 0, "grace_period": 4, "reduction_factor": 2, "max_concurrent_trials": 1, **tune},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


# Two trials, learning rates far apart and in this order (a grid): the trial at 1e-6 learns nothing in
# 16 steps, and ASHA stops it at a rung where the trial at 5e-2 already recorded a better figure.
SPACE = {"lora.rank": {"choice": [2, 4, 8]}, "lora.alpha": {"per_rank": [1, 2]}, "train.lr": {"grid": [5.0e-2, 1.0e-6]}}


TRACKERS = ["train.report_to=[tensorboard,mlflow]"]


@pytest.fixture(scope="module")
def sweep(ray_cluster, tiny_model, tmp_path_factory):
    import ray

    out = tmp_path_factory.mktemp("sweep") / "out"
    space = write_space(out.parent / "space.yaml", SPACE)
    free = ray.available_resources().get("CPU", 0)  # what earlier tests' runs left free on this shared Ray
    with pytest.MonkeyPatch.context() as env:
        # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI to this process; set here, it is undone
        # after the sweep instead of leaking into later tests' runs.
        env.setenv("MLFLOW_TRACKING_URI", (out / "mlruns").as_uri())
        assert main(["tune", JOB, space, *job_overrides(tiny_model, out, *TRACKERS)]) == 0
    # Trials ASHA stopped gave their workers' CPUs back (Ray Train's placement-group cleaner, and
    # sweep._reclaim after the last trial): a leak would starve the next trial on a small cluster.
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < free and time.time() < deadline:
        time.sleep(1)
    # (at least: an earlier test's leftover may also have gone meanwhile)
    assert ray.available_resources().get("CPU", 0) >= free, _holding_cpus()
    return out


def _holding_cpus() -> list:
    """What holds CPUs on this session's Ray: live actors and placement groups (for a failure's message)."""
    import ray
    from ray.util.state import list_actors

    actors = [(a.class_name, a.pid, a.required_resources) for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)]
    groups = [row["bundles"] for row in ray.util.placement_group_table().values() if row["state"] != "REMOVED"]
    return actors + groups


def test_sweep_table_and_early_stopping(sweep):
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert len(rows) == 2
    # ASHA stopped the trial that learned nothing at a rung, before its 16-step budget
    assert {float(r["train.lr"]): r["status"] for r in rows} == {5.0e-2: "complete", 1.0e-6: "stopped early"}
    stopped = next(r for r in rows if r["status"] == "stopped early")
    assert int(stopped["steps"]) in (4, 8) and int(stopped["budget"]) == 16
    assert any(int(r["steps"]) == 16 for r in rows)
    for r in rows:  # alpha is sampled as a multiple of rank
        assert float(r["lora.alpha"]) / int(r["lora.rank"]) in (1.0, 2.0)
    assert 0 <= float(rows[0]["val_ndcg@10"]) <= 1
    result = json.loads((sweep / "sweep_result.json").read_text())
    assert result["steps_run"] == sum(int(r["steps"]) for r in rows) < result["steps_budget"] == 32
    assert result["knee"] in {2, 4, 8}
    md = (sweep / "results.md").read_text()
    assert "| trial | lora.rank | lora.alpha | train.lr |" in md and "knee at rank" in md
    for plot in ("rank_curve.png", "lr_curve.png"):
        assert (sweep / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trials_reach_the_trackers_through_tune(sweep):
    """One MLflow run and one TensorBoard event file per trial (Ray Tune's own loggers), and each
    trial's metrics.jsonl in its own folder; the workers themselves report to no tracker."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client = MlflowClient((sweep / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("raykit").experiment_id])
    rows = {r["trial"]: r for r in csv.DictReader((sweep / "results.csv").open())}
    assert len(runs) == len(rows) == 2
    for run in runs:
        assert {"lora.rank", "train.lr"} <= set(run.data.params)
        assert "val_ndcg_at_10" in run.data.metrics
    events = sorted((sweep / "tune").glob("*/events.out.tfevents.*"))
    assert len(events) == 2
    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert "ray/tune/val_ndcg_10" in tags, tags  # tensorboardX drops the @
    metrics = sorted((sweep / "trials").glob("*/metrics.jsonl"))
    assert len(metrics) == 2 and not (sweep / "metrics.jsonl").exists()
    assert not list((sweep / "trials").glob("*/tensorboard"))


def test_trials_never_see_the_test_split(sweep):
    # trials run with evaluation off: no test-set figure in any trial's results
    for result in (sweep / "tune").glob("*/result.json"):
        for line in result.read_text().splitlines():
            keys = json.loads(line)
            assert not any(k.startswith("ndcg@10") for k in keys), keys


def test_best_job_is_the_job_with_the_best_trials_values(sweep, tiny_model):
    """best_job.yaml is what `raykit train` would run: the job's own settings (budget, evaluation, not
    the sweep's fixed: ones) with the best trial's values, and an output_dir of its own."""
    from raykit.jobfile import load_job

    rows = list(csv.DictReader((sweep / "results.csv").open()))
    best = {"lora.rank": int(rows[0]["lora.rank"]), "lora.alpha": float(rows[0]["lora.alpha"]), "train.lr": float(rows[0]["train.lr"])}
    expected = load_job(JOB, [*job_overrides(tiny_model, sweep / "best", *TRACKERS), *(f"{k}={v}" for k, v in best.items())])
    assert load_job(sweep / "best_job.yaml") == expected
    assert expected.train.max_steps == 16 and expected.data.val_queries == 0 and expected.eval.data == str(QUICKSTART)


def test_placement_groups_a_sweep_leaves_behind_are_removed_and_no_others(ray_cluster):
    """What sweep._reclaim does after fit(): a trial's worker group whose cleaner never came (made
    here by hand) is removed; a group that was there before the sweep is not."""
    import ray

    from raykit.tune.sweep import _placement_groups, _reclaim

    theirs = ray.util.placement_group([{"CPU": 1}])
    before = _placement_groups()
    leaked = ray.util.placement_group([{"CPU": 1}])
    ray.get([theirs.ready(), leaked.ready()])
    _reclaim(_placement_groups() - before)
    table = ray.util.placement_group_table()
    assert table[leaked.id.hex()]["state"] == "REMOVED" and table[theirs.id.hex()]["state"] == "CREATED"
    ray.util.remove_placement_group(theirs)


def test_an_interrupted_sweep_into_s3_resumes(ray_cluster, s3_server, tiny_model, tmp_path):
    """A sweep started as on a laptop, writing to S3: `raykit tune` with no RAY_ADDRESS starts a local
    Ray, here beside this session's (raykit gives it a State API of its own, cluster.own_state_api: Ray
    Train's placement-group cleaner used to find both Rays and die). Ctrl-C as its first trial ends:
    one line, exit 130. The same command, run again on this session's Ray, resumes the sweep from S3
    instead of starting over, and writes its results there."""
    client, bucket = s3_server.client, s3_server()
    space = write_space(tmp_path / "space.yaml", {"lora.rank": {"choice": [2, 4]}}, scheduler="none", num_samples=2)
    args = [*job_overrides(tiny_model, f"s3://{bucket}/sweep"), "train.max_steps=4"]  # one validation per trial: enough here
    cmd = [str(Path(sys.executable).parent / "raykit"), "tune", JOB, space, *args]
    env = {**os.environ, "HOME": str(tmp_path)}  # its own ~/.ray (auth token)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(240, proc.kill)  # a sweep that never reports a trial done fails, not hangs
    watchdog.start()
    shown = []
    for line in proc.stdout:  # Ctrl-C as Tune says the first trial is done: the second has barely started
        shown.append(line)
        if " completed after " in line:
            break
    watchdog.cancel()
    assert shown and " completed after " in shown[-1], "".join(shown)[-3000:]  # not killed, nor ended first
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    log = "".join(shown) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, log[-3000:]
    assert log.strip().splitlines()[-1].startswith("raykit: interrupted: 1 of 2 trials done"), log[-3000:]
    assert "rerun the same command to resume" in log
    assert "Found multiple active Ray instances" not in log and "PlacementGroupCleaner" not in log, log[-3000:]
    first = _finished_trials(client, bucket)
    assert len(first) == 1

    assert main(["tune", JOB, space, *args]) == 0
    results = client.get_object(Bucket=bucket, Key="sweep/results.csv")["Body"].read().decode()
    rows = list(csv.DictReader(results.splitlines()))
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows)
    for trial in first:  # finished trials were not trained again
        assert _finished_trials(client, bucket)[trial] == first[trial]
    client.head_object(Bucket=bucket, Key="sweep/best_job.yaml")


def _finished_trials(client, bucket: str) -> dict[str, int]:
    """trial folder -> reports in its result.json, for trials whose last report says done."""
    done = {}
    for o in client.list_objects_v2(Bucket=bucket, Prefix="sweep/tune/").get("Contents", []):
        if o["Key"].endswith("/result.json"):
            lines = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read().decode().splitlines()
            if lines and json.loads(lines[-1]).get("done"):
                done[o["Key"].split("/")[-2]] = len(lines)
    return done


@pytest.mark.parametrize(
    "space, fixed, message",
    [
        ({"lora.rnk": {"choice": [4, 8]}}, None, "unknown key 'lora.rnk' (did you mean 'lora.rank'?)"),
        ({"lora.rank": {"choice": []}}, None, "space.lora.rank: choice needs a non-empty list"),
        ({"train.lr": {"loguniform": [1.0e-3, 1.0e-4]}}, None, "low 0.001 is above high 0.0001"),
        ({"train.lr": {"loguniform": [0, 1.0e-3]}}, None, "loguniform needs low > 0"),
        ({"lora.rank": {"choice": ["big"]}}, None, "'lora.rank' must be int, got str 'big'"),
        ({"data.max_examples": {"choice": [10]}}, None, "data is read once for the whole sweep"),
        ({"train.batch_size": {"range": [8]}}, None, "expected one of {choice: ...}"),
        ({"lora.rank": {"choice": [4]}}, {"data.val_queries": 0}, "data.val_queries: 0; a sweep ranks trials"),
        ({"lora.rank": {"choice": [4]}}, {"data.val_queries": 10000}, "leaves none to train on"),
    ],
)
def test_bad_space_is_one_line_before_any_trial(tiny_model, tmp_path, capsys, space, fixed, message):
    out = tmp_path / "out"
    doc = {"space": space, "fixed": fixed if fixed is not None else {"data.val_queries": 20}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(doc))
    assert message in refused(capsys, "tune", JOB, str(tmp_path / "space.yaml"), *job_overrides(tiny_model, out))
    assert not out.exists()


def test_optuna_searcher_needs_its_library(monkeypatch):
    from raykit.config import SweepConfig
    from raykit.errors import ConfigError
    from raykit.tune.sweep import _searcher

    monkeypatch.setitem(sys.modules, "optuna", None)  # as on a machine without it
    with pytest.raises(ConfigError, match="tune.searcher: optuna is not installed; pip install optuna"):
        _searcher(SweepConfig(searcher="optuna"), 1)
    assert _searcher(SweepConfig(), 2).max_concurrent == 2  # random search, paced


def test_shipped_spaces_load_against_their_job():
    from raykit.jobfile import load_job
    from raykit.tune.space import load_space

    job = load_job(str(REPO / "jobs" / "scifact_lora.yaml"))
    sweep = load_space(str(REPO / "tune_spaces" / "lora_rank_alpha_lr.yaml"), job, ["tune.num_samples=20"])
    assert sweep.num_trials == 20 and sweep.settings.scheduler == "asha"
    assert sweep.values({"lora.rank": 8, "lora.alpha_per_rank": 4, "train.lr": 1e-3}, job) == {
        "lora.rank": 8, "lora.alpha": 32.0, "train.lr": 1e-3}
    curve = load_space(str(REPO / "tune_spaces" / "lora_rank_curve.yaml"), job)
    assert curve.num_trials == 5 and curve.settings.scheduler == "none"  # a grid: each rank once
    assert curve.values({"lora.rank": 64, "lora.alpha_per_rank": 2}, job)["lora.alpha"] == 128.0
