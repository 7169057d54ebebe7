"""`raykit tune JOB SPACE`: Ray Tune over any job field, trials ranked on held-out training queries.

Each trial is one Ray Train run of the same training code as `raykit train` (the Train V2 pattern:
a Tune function per trial that builds and fits a TorchTrainer, Train's reports forwarded to Tune by
TuneReportCallback). The workers report `val_ndcg@10` every train.eval_every steps, so ASHA can stop
a weak trial at its first rungs instead of after its whole budget. The training data, the validation
split and the model check are prepared once on the driver and shared by every trial.

output_dir holds tune/ (Tune's experiment: rerunning the command restores it), trials/ (each
trial's Train run), and what `sweep_report` writes: results.csv/.md, rank_curve.png, lr_curve.png,
best_job.yaml.
"""

from __future__ import annotations

import logging
import os

from raykit import identity, storage
from raykit.cluster import connect_ray, require_shared_storage
from raykit.config import JobConfig
from raykit.errors import ConfigError, Interrupted
from raykit.train import tracking
from raykit.train.driver import make_trainer, prepare
from raykit.tune import report as sweep_report
from raykit.tune.space import Space, apply

log = logging.getLogger(__name__)

EXPERIMENT = "tune"


def trial_job(job: JobConfig, space: Space) -> JobConfig:
    """What every trial starts from: the job plus the space's fixed: values, test-set evaluation off.

    A sweep must never look at the test split: trials are ranked on data.val_queries alone.
    """
    trial = apply(job, space.fixed, f"{space.path}: fixed")
    if not trial.data.val_queries:
        raise ConfigError(
            f"data.val_queries: 0; a sweep ranks trials on training queries held out from training. "
            f"Set it in {space.path} (fixed: {{data.val_queries: 100}}) or on the command line (data.val_queries=100)"
        )
    # Trackers hear from Tune (one run per trial, its sampled values as parameters), not from the workers.
    return apply(trial, {"eval.data": "", "eval.ood_data": "", "eval.before": False, "train.report_to": []}, "sweep")


def run(job: JobConfig, space: Space) -> dict:
    """Run (or resume) the sweep; write the results table, plots and best job. Returns the report."""
    import ray
    from ray import tune

    settings = space.settings
    storage.check_output("output_dir", job.output_dir)
    output_dir = storage.resolve(job.output_dir)
    require_shared_storage("output_dir", output_dir)
    tracking.check(job, sweep=True)
    base, inputs = prepare(trial_job(job, space))
    total = inputs["total_steps"]
    if not base.train.eval_every:  # four validations per trial: ASHA's rungs need points to compare
        base = apply(base, {"train.eval_every": max(1, total // 4)}, "sweep")
    grace = settings.grace_period or base.train.eval_every

    connect_ray()
    concurrency = settings.max_concurrent_trials or _fits(ray.cluster_resources(), base)
    # Progress reports between validations carry loss, not val_ndcg@10; ASHA skips those (it needs
    # both the metric and `step`), so Tune must not insist that every result has the metric.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, space=space, inputs=inputs, trials_dir=storage.join(output_dir, "trials")),
        # The trial function only drives its TorchTrainer; Train's workers reserve the CPUs and GPUs.
        # Tune refuses an empty request and Tune's default (1 CPU) would starve a worker that wants
        # every core, so the trial asks for a token amount of memory: max_concurrent_trials paces it.
        {"memory": 1},
    )
    ours = identity.of({"job": job.to_dict(), "space": space.as_dict()}, ("job.output_dir", "job.new_run", "job.run"))
    experiment = storage.join(output_dir, EXPERIMENT)
    path, filesystem = storage.ray_storage(output_dir)  # an S3 client that outlasts an outage
    if tune.Tuner.can_restore(storage.ray_storage(experiment)[0], storage_filesystem=filesystem):
        diffs = identity.differences(identity.read(storage.join(output_dir, "sweep.json")) or {}, ours)
        if diffs:
            raise identity.refusal(output_dir, "a sweep", diffs, "use another output_dir, or delete this one to start over")
        log.info(f"resuming the sweep in {experiment}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(storage.ray_storage(experiment)[0], trainable, resume_unfinished=True,
                                   restart_errored=True, param_space=space.param_space(), storage_filesystem=filesystem)
    else:
        identity.record(storage.join(output_dir, "sweep.json"), ours)
        log.info(f"sweep: {space.num_trials} trials of {space.path}, {concurrency} at a time, "
              f"{total} steps each, validation every {base.train.eval_every} steps, scheduler {settings.scheduler}")
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=settings.metric,
                mode="max",
                num_samples=settings.num_samples,
                search_alg=_searcher(settings, concurrency),
                scheduler=_scheduler(settings, total, grace),
            ),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=path, storage_filesystem=filesystem, verbose=1,
                                      callbacks=_trackers(job.train.report_to, output_dir)),
        )
    before = _placement_groups()
    grid = tuner.fit()
    _reclaim(_placement_groups() - before)
    # A trial Tune stopped on Ctrl-C (or SIGUSR1) counts as terminated; only a finished or
    # ASHA-stopped trial's last result says done.
    finished = sum(1 for r in grid if r.error or (r.metrics or {}).get("done"))
    if finished < space.num_trials:  # interrupted: Tune saved its state and returned
        raise Interrupted(
            f"{finished} of {space.num_trials} trials done; the sweep's state is in {experiment}: "
            "rerun the same command to resume"
        )
    return sweep_report.write(grid, job, base, space, inputs["num_rows"], output_dir)


def _trial(params: dict, base: JobConfig, space: Space, inputs: dict, trials_dir: str) -> None:
    """One trial: the sampled values applied to the base job, trained by Ray Train, reported to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    # The trial's own folder, beside its checkpoints, for what the workers write (metrics.jsonl).
    values = {**space.values(params, base), "output_dir": storage.join(trials_dir, trial_id)}
    job = apply(base, values, f"trial {params}")
    # A fixed name per trial: a restored sweep resumes the trial's own Train run from its checkpoints.
    make_trainer(job, inputs, storage_path=trials_dir, name=trial_id, callbacks=[TuneReportCallback()]).fit()


def _placement_groups() -> set[str]:
    """This job's placement groups that still hold resources (never another job's: a placement
    group's id ends with its job's id, Ray's ID layout)."""
    import ray
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    return {pg for pg, row in placement_group_table().items() if pg.endswith(job) and row["state"] != "REMOVED"}


def _reclaim(left: set[str]) -> None:
    """Remove the placement groups the sweep's trials left behind once every trial has ended.

    A Train run's workers sit in a placement group that belongs to the Tune driver's job, not to the
    trial. When Tune stops a trial (ASHA, Ctrl-C), Ray Train's cleaner actor removes it once it sees
    the trial's controller dead; on a loaded 2-core machine it once had not after a minute (a CI run),
    and the group's CPU stayed reserved for as long as the driver lived. Nothing runs in a group the
    sweep created after fit() returns, so removing it is safe.
    """
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg in left:
        log.debug(f"removing placement group {pg}: a trial of this sweep left it behind")
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg)))


def _trackers(names: tuple[str, ...], output_dir: str) -> list:
    """Ray Tune's own logger callbacks for train.report_to: one tracker run per trial."""
    callbacks = []
    if "tensorboard" in names:  # event files in each trial's folder under <output_dir>/tune
        from ray.tune.logger.tensorboardx import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if "mlflow" in names:
        from ray.tune.logger.mlflow import MLflowLoggerCallback

        class MLflowTrials(MLflowLoggerCallback):
            def log_trial_result(self, iteration, trial, result):  # metric names MLflow accepts
                super().log_trial_result(iteration, trial, {tracking.mlflow_name(k): v for k, v in result.items()})

        callbacks.append(MLflowTrials(tracking_uri=tracking.mlflow_uri(output_dir),
                                      experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME") or tracking.EXPERIMENT))
    if "wandb" in names:
        from ray.tune.logger.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT") or tracking.EXPERIMENT))
    return callbacks


def _fits(resources: dict, job: JobConfig) -> int:
    if job.scaling.use_gpu:
        return max(1, int(resources.get("GPU", 0) // job.scaling.num_workers))
    return max(1, int(resources.get("CPU", 1) // (job.scaling.num_workers * (job.scaling.cpus_per_worker + job.scaling.feed_actors))))


def _searcher(settings, concurrency: int):
    """The searcher, limited to `concurrency` live trials (Tune ignores max_concurrent_trials for a
    BasicVariantGenerator it did not build itself)."""
    if settings.searcher == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("tune.searcher: optuna is not installed; pip install optuna, or use tune.searcher=random") from None
        return ConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=concurrency)


def _scheduler(settings, total_steps: int, grace: int):
    if settings.scheduler == "none":
        return None  # FIFO: every trial trains to the end
    from ray.tune.schedulers import ASHAScheduler

    # `step` (optimizer steps), not Tune's training_iteration (one per report), so the rungs mean
    # the same thing whatever train.log_every is.
    return ASHAScheduler(time_attr="step", max_t=total_steps, grace_period=min(grace, total_steps),
                         reduction_factor=settings.reduction_factor)
