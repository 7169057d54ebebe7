"""Training, the driver's side: check the job, prepare its data, start the workers, lay out output_dir.

`run` validates everything it can on the driver (a bad job fails before a worker starts), runs the
TorchTrainer over `raykit.train.loop.train_fn_per_worker`, and writes what the run produced (model,
evaluation, plots, run.json). `prepare` and `make_trainer` are shared with `raykit tune`'s trials.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

import raykit.log
from raykit import identity, storage
from raykit.cluster import check_local_compiler, check_local_cpus, connect_ray, require_shared_storage, worker_error
from raykit.config import Columns, JobConfig
from raykit.data import load_beir, load_validation_set, training_set
from raykit.encoder import check_length, model_config
from raykit.errors import RaykitError, RunFailed, StorageUnavailable
from raykit.train import report, tracking
from raykit.train.batches import steps_per_epoch
from raykit.train.card import model_card
from raykit.train.checkpoints import STATE_FILE
from raykit.train.loop import train_fn_per_worker

log = logging.getLogger(__name__)

# What a training run writes into output_dir: new_run=true removes these, and nothing else there.
OUTPUTS = ("job.json", "checkpoints", "synth", "mined", "scored", "model", "adapter", "metrics.jsonl", "tensorboard", "mlruns",
           "eval.json", "loss_curve.png", "ndcg_by_dim.png", "forgetting.png", "run.json")
# Settings that change how a run goes, not what it produces: a rerun may change them and resume.
OPERATIONAL = ("output_dir", "new_run", "run", "train.log_every", "train.checkpoint_every", "train.report_to",
               "scaling.cpus_per_worker", "scaling.feed_actors", "scaling.peak_tflops", "scaling.compile", "eval.batch_size", "synth.output", "synth.concurrency", "synth.num_gpus",
               "synth.batch_size", "synth.embed.concurrency", "synth.embed.cpus_per_actor", "synth.embed.num_gpus", "synth.embed.peak_tflops", "synth.embed.compile", "mine.output", "mine.embed.concurrency", "mine.embed.cpus_per_actor",
               "mine.embed.num_gpus", "mine.embed.peak_tflops", "mine.embed.compile", "teacher.output", "teacher.concurrency", "teacher.num_gpus")


def run(job: JobConfig, callbacks=()) -> dict:
    """Validate, train on Ray, and write output_dir. Returns the run summary (also run.json).

    `callbacks`: Ray Train `UserCallback`s, run on the controller after every report.
    """
    import ray.train

    output_dir = storage.resolve(job.output_dir)
    # Workers run in a folder of Ray's: what they write into output_dir needs its absolute path.
    job = dataclasses.replace(job, output_dir=output_dir)
    require_shared_storage("output_dir", output_dir)
    check(job)
    diffs = _another_job(output_dir, job)  # refused here unless new_run=true
    summary_path = storage.join(output_dir, "run.json")
    if not diffs and storage.exists(summary_path):
        log.info(f"{summary_path} exists: this run is complete. Use another output_dir to train again.")
        return json.loads(storage.read_bytes(summary_path))

    job, inputs = prepare(job, checked=True, claim=lambda: _claim(output_dir, job, diffs))
    connect_ray()
    trainer = make_trainer(job, inputs, storage_path=output_dir, name="checkpoints", callbacks=callbacks)
    started = time.time()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _stopped(e, storage.join(output_dir, "checkpoints")) from None
    summary = _write_outputs(result.checkpoint, job, inputs, output_dir, started)
    for block in report.text(summary["eval"], job.eval):
        log.info(block)
    log.info(f"model: {summary['model']}  ({summary['seconds']}s)")
    return summary


def _stopped(e: Exception, checkpoints: str) -> RaykitError | RunFailed:
    """The one line for a run Ray Train gave up on, the workers' tracebacks logged before it. Storage
    that stayed away past RAYKIT_STORAGE_RETRY (a checkpoint upload, the controller's own records) is
    named as such: the rerun will resume. A worker's own raykit error (what its node lacks, e.g. the
    compiler scaling.compile needs) is that error's line alone; any other, the worker's exception line
    (cluster.worker_error), not Ray's "Training failed due to worker errors:"."""
    resume = f"checkpoints are in {checkpoints}: rerun the same command to resume from the latest"
    if cause := storage.outage(e):
        log.error(str(e))
        return StorageUnavailable(f"training stopped: storage did not answer ({cause}); {resume} "
                                  f"(set {storage.RETRY_ENV} to wait longer)")
    return worker_error(e, "training stopped", f"the traceback is above. {resume[0].upper()}{resume[1:]}.")


def _another_job(output_dir: str, job: JobConfig) -> list[str]:
    """How the job recorded in output_dir (job.json) differs from this one; [] if it is this one or
    none is. A different job's run is refused there, unless this job asks for a new run."""
    recorded = identity.read(storage.join(output_dir, "job.json"))
    diffs = identity.differences(recorded, identity.of(job.to_dict(), OPERATIONAL)) if recorded is not None else []
    if diffs and not job.new_run:
        raise identity.refusal(output_dir, "a run", diffs, "use another output_dir, or new_run=true to replace that run")
    return diffs


def _claim(output_dir: str, job: JobConfig, diffs: list[str]) -> None:
    """Make output_dir this job's, just before the run first writes there (the input is checked by
    then: bad input leaves nothing behind). new_run=true removes another job's run: only what a run writes."""
    if diffs:
        log.info(f"new_run=true: removing the previous run from {output_dir} ({len(diffs)} setting(s) differ)")
        for name in OUTPUTS:
            storage.remove(storage.join(output_dir, name))
    identity.record(storage.join(output_dir, "job.json"), identity.of(job.to_dict(), OPERATIONAL))


def _write_outputs(checkpoint, job: JobConfig, inputs: dict, output_dir: str, started: float) -> dict:
    """output_dir from the final checkpoint: the model, eval.json, the plots, the model card, and
    run.json last (it marks the run complete)."""
    with checkpoint.as_directory() as path:
        for name in ("model", "adapter"):
            if Path(path, name).is_dir():
                storage.copy_dir(str(Path(path, name)), storage.join(output_dir, name))
        evaluation = json.loads(Path(path, "eval.json").read_text()) if Path(path, "eval.json").is_file() else {}
        state = json.loads(Path(path, STATE_FILE).read_text())
    if evaluation:
        evaluation["flags"] = report.flags(evaluation, job.eval)
        storage.put_text(storage.join(output_dir, "eval.json"), json.dumps(evaluation, indent=2))
        report.write_plots(evaluation, job.eval, output_dir)
    report.write_loss_curve(state["history"], output_dir)
    summary = {
        "output_dir": output_dir,
        "model": storage.join(output_dir, "model"),
        "steps": inputs["total_steps"],
        "train_pairs": inputs["num_rows"],
        "seconds": round(time.time() - started, 1),
        "resumed_from": state.get("resumed_from", []),
        "damaged_checkpoints": state.get("damaged_checkpoints", []),  # passed over on resume
        # per rank: a running sha256 of the (query, positive) ids trained on, in order (raykit/train/batches.py)
        "batches_sha256": state["batches_sha256"],
        "checkpoints": state["checkpoint_totals"],
        "throughput": state.get("throughput"),  # the last attempt's pairs/s and MFU (raykit/flops.py)
        "eval": evaluation,
        "config": job.to_dict(),
    }
    storage.put_text(storage.join(summary["model"], "README.md"), model_card(job, evaluation, summary))
    storage.put_text(storage.join(output_dir, "run.json"), json.dumps(summary, indent=2))
    return summary


def check(job: JobConfig) -> None:
    """What can be checked before anything is written: the model against the job, the trackers, what mining needs."""
    storage.check_output("output_dir", job.output_dir)
    scaling = job.scaling
    check_local_cpus(scaling.num_workers * (scaling.cpus_per_worker + scaling.feed_actors),
                     f"scaling: {scaling.num_workers} worker(s) x ({scaling.cpus_per_worker} CPU(s) + {scaling.feed_actors} feed actor(s))",
                     "lower scaling.num_workers, scaling.cpus_per_worker or scaling.feed_actors, or run on a cluster (RAY_ADDRESS)")
    if scaling.compile:
        check_local_compiler("scaling.compile", scaling.use_gpu)
    if job.synth.enabled and job.synth.output:
        storage.check_output("synth.output", job.synth.output, folder=False)
    if job.mine.enabled and job.mine.output:
        storage.check_output("mine.output", job.mine.output, folder=False)
    if job.teacher.output:
        storage.check_output("teacher.output", job.teacher.output, folder=False)
    check_model(job)
    tracking.check(job)
    if job.synth.enabled:
        from raykit.train import synth

        synth.check(job)
    if job.mine.enabled:
        from raykit.train import mine

        mine.check(job)
    if job.loss.distill and job.teacher.model:
        from raykit.train import score

        score.check(job)


def prepare(job: JobConfig, checked: bool = False, claim=lambda: None) -> tuple[JobConfig, dict]:
    """Everything that can be wrong with the input fails here, on the driver, before a worker starts.

    Returns the job (data.train pointing at mined/scored triplets if it asked for them) and the inputs
    every worker gets: the training table, the evaluation, out-of-domain and validation sets. `claim`
    runs just before the first write into output_dir: before mining or scoring, else once all is checked.
    """
    if not checked:
        check(job)
    writes_data = job.synth.enabled or job.mine.enabled or (job.loss.distill and job.teacher.model)
    if writes_data:
        # Mining and scoring run on Ray too. Start it here, dashboard included: Ray Train's
        # placement-group cleaner needs the State API, which a Ray Data-only start leaves out.
        connect_ray()
        claim()
    job = prepare_data(job)
    if job.eval.data and not storage.exists(job.eval.data):
        raise RaykitError(f"eval.data: {job.eval.data}: no such folder; point it at a BEIR folder or set eval.data= to skip")
    if job.eval.ood_data and not storage.exists(job.eval.ood_data):
        raise RaykitError(f"eval.ood_data: {job.eval.ood_data}: no such folder; point it at an out-of-domain BEIR folder or set eval.ood_data=")
    training = training_set(job.data, job.train.seed)  # pair files: read by Ray tasks, not into this process
    if job.loss.distill and not training.scored:
        raise RaykitError(f"loss.name={job.loss.name}: {job.data.train} has no teacher scores; set teacher.model, or run raykit score")
    inputs = {
        "table": training,
        "num_rows": training.num_rows,
        "eval_set": load_beir(job.eval.data, job.eval.split) if job.eval.data else None,
        "ood_set": load_beir(job.eval.ood_data, job.eval.ood_split) if job.eval.ood_data else None,
        "val_set": load_validation_set(job.data, job.train.seed),
    }
    inputs["steps_per_epoch"], inputs["total_steps"] = schedule_length(training.num_rows, job.scaling.num_workers, job)
    steps_per_epoch, total_steps = inputs["steps_per_epoch"], inputs["total_steps"]
    if not writes_data:
        claim()
    held_out = f" ({job.data.val_queries} queries held out for validation)" if job.data.val_queries else ""
    log.info(
        f"{training.num_rows} training pairs from {job.data.train}{held_out} | {job.scaling.num_workers} worker(s) x "
        f"batch {job.train.batch_size} | {steps_per_epoch} steps/epoch, {total_steps} steps | strategy {job.train.strategy}"
    )
    return job, inputs


def make_trainer(job: JobConfig, inputs: dict, storage_path: str, name: str, callbacks=()):
    """The TorchTrainer of one run: `raykit train`'s, or one sweep trial's (with Tune's report callback)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raykit.train.bad_input import EndOnBadInput

    # The pairs go to the workers through the object store, not as a Ray Data dataset: the loop owns
    # their order, so that a resumed run continues exactly (raykit/train/batches.py).
    loop_config = {"job": job, "log_level": raykit.log.level(), **inputs, "table": inputs["table"].placed(),
                   "checkpoints": storage.join(storage_path, name)}
    path, filesystem = storage.ray_storage(storage_path)  # an S3 client that outlasts an outage
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.scaling.num_workers,
            use_gpu=job.scaling.use_gpu,
            resources_per_worker={"CPU": job.scaling.cpus_per_worker, **({"GPU": 1} if job.scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our progress lines say enough
            # the trackers' settings (MLFLOW_TRACKING_URI, WANDB_PROJECT, ...) and RAYKIT_STORAGE_RETRY
            # of the submitting shell
            worker_runtime_env={"env_vars": env} if (env := {**tracking.worker_env(), **storage.worker_env()}) else None,
            callbacks=[*callbacks, EndOnBadInput()],  # a worker's bad input is not retried
        ),
    )


def prepare_data(job: JobConfig, score: bool = True) -> JobConfig:
    """The job with data.train pointing at what training reads: synthetic pairs or mined triplets,
    then teacher scores (`score=False`: mined only, what `raykit score` scores)."""
    if job.synth.enabled:
        from raykit.train import synth

        job = _training_on(job, synth.run(job))
    if job.mine.enabled:
        from raykit.train import mine

        job = _training_on(job, mine.run(job))
    if score and job.loss.distill and job.teacher.model:
        from raykit.train import score as teacher

        job = _training_on(job, teacher.run(job, job.data.train))
    return job


def _training_on(job: JobConfig, written: str) -> JobConfig:
    """The job reading a file raykit wrote: in raykit's own column names, not the user's."""
    return dataclasses.replace(job, data=dataclasses.replace(job.data, train=written, columns=Columns()))


def check_model(job: JobConfig) -> None:
    """Load the model's config (not its weights) to check the job against it."""
    from transformers import AutoModel

    config = model_config(job.model.name, revision=job.model.revision, trust_remote_code=job.model.trust_remote_code)
    check_length(config, job.model.max_seq_length, job.model.name, "model.max_seq_length")
    for key, dims in (("eval.dims", job.eval.dims), ("loss.matryoshka_dims", job.loss.matryoshka_dims)):
        if dims and dims[-1] > config.hidden_size:
            raise RaykitError(f"{key}: {dims[-1]} is larger than the model's {config.hidden_size} dimensions")
    if job.train.strategy == "lora":
        from raykit.strategies.lora import check_target_modules

        with torch.device("meta"):  # module names without allocating weights
            check_target_modules(AutoModel.from_config(config), job.lora.target_modules)


def schedule_length(num_rows: int, world: int, job: JobConfig) -> tuple[int, int]:
    per_epoch = steps_per_epoch(num_rows, world, job.train.batch_size)
    if per_epoch == 0:
        raise RaykitError(
            f"data.train: {num_rows} pairs is less than one batch per worker "
            f"(train.batch_size {job.train.batch_size} x scaling.num_workers {world}); lower train.batch_size"
        )
    return per_epoch, job.train.max_steps or per_epoch * job.train.epochs
