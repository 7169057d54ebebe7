"""Training: the per-worker loop, and the TorchTrainer that runs it on Ray.

`train_fn_per_worker` reads top to bottom: load the model, wrap it for the strategy, resume, evaluate
the base, loop (encode, loss, step, log, checkpoint), evaluate, export. `run` validates the job on the
driver, starts the workers, and lays the result out in output_dir.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from raykit import report, storage
from raykit.cluster import connect_ray, raykit_env, require_shared_storage
from raykit.config import JobConfig
from raykit.data import Beir, load_beir, load_training_set, load_validation_set, negative_count
from raykit.encoder import Encoder, resolve_model
from raykit.errors import RaykitError
from raykit.evaluate import evaluate
from raykit.losses import kl_loss, margin_mse_loss, matryoshka_loss, mnr_loss
from raykit.strategies import build_trainee

STATE_FILE = "state.json"


def train_fn_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, once per worker
    _quiet_ray_train_reports()
    job: JobConfig = config["job"]
    eval_set: Beir | None = config["eval_set"]
    ood_set: Beir | None = config.get("ood_set")  # out of domain: the forgetting guard
    val_set: Beir | None = config.get("val_set")  # held-out training queries: what sweeps rank by
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.train.seed)  # same init on every rank; DDP/DeepSpeed also broadcast rank 0's
    torch.set_num_threads(job.scaling.cpus_per_worker)
    device = ray.train.torch.get_device()
    bf16 = use_bf16(job.train.precision, device)
    steps_per_epoch, total_steps = schedule_length(config["num_rows"], world, job)
    log = _printer(rank)

    # Model, wrapped for the strategy (peft + DDP, or a DeepSpeed engine).
    encoder = Encoder.load(job.model)
    trainee = build_trainee(encoder, job, total_steps, device, bf16)

    # Resume: the latest checkpoint of this output_dir, after a rerun or a worker-group restart.
    state = {"step": 0, "eval_before": None, "ood_before": None, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as path:
            trainee.load_state(path)
            state = json.loads(Path(path, STATE_FILE).read_text())
        state.setdefault("resumed_from", []).append(state["step"])
        log(f"resumed from step {state['step']}/{total_steps}")

    def run_eval(beir: Beir | None = None) -> dict:
        return evaluate(trainee.encoder, beir or eval_set, job.eval.dims, job.eval.batch_size, device, trainee.module)

    if eval_set and job.eval.before and state["eval_before"] is None:
        log(f"evaluating the base model on {len(eval_set.corpus)} docs, {len(eval_set.queries)} queries ...")
        state["eval_before"] = run_eval()
        log(_eval_line("before", state["eval_before"]))
    if ood_set and state.get("ood_before") is None:
        log(f"evaluating the base model out of domain ({len(ood_set.corpus)} docs, {len(ood_set.queries)} queries) ...")
        state["ood_before"] = run_eval(ood_set)
        log(_eval_line("before, out of domain", state["ood_before"]))

    shard = ray.train.get_dataset_shard("train")
    global_batch = job.train.batch_size * world
    step = state["step"]
    window_start, window_steps, started = time.perf_counter(), 0, time.perf_counter()
    last_val: dict[str, float] = {}  # the latest validation, repeated in the final report
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        # Same seed per epoch, so a resumed run replays the epoch's order and skips what it did.
        batches = shard.iter_batches(
            batch_size=job.train.batch_size,
            drop_last=True,  # every rank takes the same number of steps, or the collectives hang
            batch_format="numpy",
            local_shuffle_buffer_size=min(config["num_rows"] // world, 100_000),  # a full reshuffle of small shards
            local_shuffle_seed=job.train.seed + epoch,
        )
        for i, batch in enumerate(batches):
            if i < done_in_epoch:
                continue
            loss = training_loss(trainee, batch, job, device)
            grad_norm = trainee.step(loss)
            step += 1
            window_steps += 1
            if checkpoint is None and os.environ.get("RAYKIT_FAIL_AT_STEP") == str(step):
                # Fault injection for the restart tests: fail once, on a run that did not resume.
                raise RuntimeError(f"RAYKIT_FAIL_AT_STEP={step}: injected worker failure")

            at_eval = bool(job.train.eval_every and step % job.train.eval_every == 0)
            do_eval = bool(eval_set and at_eval and step < total_steps)  # the final one follows the loop
            do_val = bool(val_set and (at_eval or step == total_steps))
            if step % job.train.log_every == 0 or step == total_steps or do_eval or do_val:
                now = time.perf_counter()
                pairs_per_s = window_steps * global_batch / (now - window_start)
                metrics = {
                    "step": step,
                    "epoch": epoch + 1,
                    "loss": _mean_across_ranks(loss.detach().float(), world),
                    "lr": trainee.lr,
                    "grad_norm": grad_norm,
                    "pairs_per_s": pairs_per_s,
                    "elapsed_s": now - started,
                }
                eta = (total_steps - step) * global_batch / pairs_per_s
                log(
                    f"step {step}/{total_steps} ({100 * step // total_steps}%) | epoch {epoch + 1} | "
                    f"loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | {pairs_per_s:.1f} pairs/s | eta {_duration(eta)}"
                )
                if do_eval:
                    results = run_eval()
                    metrics.update(_flat(results))
                    log(_eval_line(f"step {step}", results))
                if do_val:
                    results = run_eval(val_set)
                    metrics.update({f"val_{k}": v for k, v in _flat(results).items()})
                    metrics["val_ndcg@10"] = results[max(results)]["ndcg@10"]  # at the full size
                    last_val = {k: v for k, v in metrics.items() if k.startswith("val_")}
                    log(_eval_line(f"step {step} validation", results))
                eval_s = time.perf_counter() - now
                state["history"].append(metrics)
                ray.train.report(metrics)
                # the next window starts now: report time counts against pairs/s, evaluation time doesn't
                window_start, window_steps = now + eval_s, 0

            if job.train.checkpoint_every and step % job.train.checkpoint_every == 0 and step < total_steps:
                state["step"] = step
                _report_checkpoint(trainee, state, rank, step, {"step": step})
                log(f"checkpoint at step {step}")
            if step >= total_steps:
                break

    state["step"] = step
    after = None
    if eval_set:
        log("evaluating the fine-tuned model ...")
        after = run_eval()
        log(_eval_line("after", after))
    if ood_set:
        state["ood_after"] = run_eval(ood_set)
        log(_eval_line("after, out of domain", state["ood_after"]))
    log(f"training took {_duration(time.perf_counter() - started)}; exporting the model")
    final = {"step": step, "done": True, **last_val, **(_flat(after) if after else {})}
    _report_checkpoint(trainee, state, rank, step, final, export=True, eval_after=after)


def training_loss(trainee, batch: dict, job: JobConfig, device) -> torch.Tensor:
    """Encode one batch of (query, positive, k negatives) rows and score it with the job's loss."""
    encoder = trainee.encoder
    k = negative_count(batch)
    queries = trainee(_tokens(encoder, batch["query"], device))  # (B, H)
    positives = trainee(_tokens(encoder, batch["positive"], device))  # (B, H)
    negatives = negative_ids = None
    if k:  # all k*B negatives in one forward pass, then back to (B, k, H)
        texts = [t for j in range(k) for t in batch[f"negative_{j}"]]
        negatives = trainee(_tokens(encoder, texts, device)).reshape(k, len(queries), -1).transpose(0, 1)
        negative_ids = torch.stack([torch.tensor(batch[f"negative_id_{j}"]) for j in range(k)], 1).to(device)  # (B, k)
    query_ids = torch.tensor(batch["query_id"], device=device)
    positive_ids = torch.tensor(batch["positive_id"], device=device)
    cfg = job.loss

    def loss_on(q, p, n):
        if cfg.name == "mnr":
            return mnr_loss(q, p, query_ids, positive_ids, scale=cfg.scale, negatives=n, negative_ids=negative_ids, gather=cfg.gather)
        teacher_pos = torch.tensor(batch["positive_score"], device=device)
        teacher_neg = torch.stack([torch.tensor(batch[f"negative_score_{j}"]) for j in range(k)], 1).to(device)
        if cfg.name == "margin_mse":
            return margin_mse_loss(q, p, n, teacher_pos, teacher_neg, scale=cfg.scale)
        return kl_loss(q, p, n, teacher_pos, teacher_neg, scale=cfg.scale, temperature=cfg.temperature)

    embeddings = (queries, positives, negatives)
    if cfg.matryoshka_dims:
        loss = matryoshka_loss(loss_on, embeddings, cfg.matryoshka_dims, cfg.matryoshka_weights)
    else:
        loss = loss_on(*embeddings)
    if job.train.l2sp:
        loss = loss + job.train.l2sp * trainee.drift()
    return loss


def _report_checkpoint(trainee, state, rank, step, metrics, export=False, eval_after=None):
    """Save state (and the exported model) to a local folder and hand it to Ray Train to persist."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        trainee.save_state(tmp, rank)
        if export:
            trainee.export(os.path.join(tmp, "model"), rank)
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
            if export:
                evaluation = {"before": state["eval_before"], "after": eval_after,
                              "ood_before": state.get("ood_before"), "ood_after": state.get("ood_after")}
                Path(tmp, "eval.json").write_text(json.dumps(evaluation, indent=2))
                Path(tmp, "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in state["history"]))
        has_files = any(Path(tmp).iterdir())
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None,
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


def run(job: JobConfig) -> dict:
    """Validate, train on Ray, and write output_dir. Returns the run summary (also run.json)."""
    import ray.train

    output_dir = storage.resolve(job.output_dir)
    require_shared_storage("output_dir", output_dir)
    summary_path = storage.join(output_dir, "run.json")
    if storage.exists(summary_path):
        print(f"[raykit] {summary_path} exists: this run is complete. Use another output_dir to train again.")
        return json.loads(storage.read_bytes(summary_path))

    job, inputs = prepare(job)
    connect_ray()
    trainer = make_trainer(job, inputs, storage_path=output_dir, name="checkpoints")
    started = time.time()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        print(str(e), file=sys.stderr)  # the workers' tracebacks: the detail the one-line summary can't hold
        where = storage.join(output_dir, "checkpoints")
        raise RaykitError(
            f"training failed ({str(e).strip().splitlines()[0]}); the traceback is above. "
            f"Checkpoints are in {where}: rerun the same command to resume from the latest."
        ) from None
    with result.checkpoint.as_directory() as path:
        for name in ("model", "adapter"):
            if Path(path, name).is_dir():
                storage.copy_dir(str(Path(path, name)), storage.join(output_dir, name))
        if Path(path, "metrics.jsonl").is_file():
            storage.write_text(storage.join(output_dir, "metrics.jsonl"), Path(path, "metrics.jsonl").read_text())
        evaluation = json.loads(Path(path, "eval.json").read_text()) if Path(path, "eval.json").is_file() else {}
        state = json.loads(Path(path, STATE_FILE).read_text())
    if evaluation:
        evaluation["flags"] = report.flags(evaluation, job.eval)
        storage.write_text(storage.join(output_dir, "eval.json"), json.dumps(evaluation, indent=2))
        report.write_plots(evaluation, job.eval, output_dir)

    summary = {
        "output_dir": output_dir,
        "model": storage.join(output_dir, "model"),
        "steps": schedule_length(inputs["num_rows"], job.scaling.num_workers, job)[1],
        "train_pairs": inputs["num_rows"],
        "seconds": round(time.time() - started, 1),
        "resumed_from": state.get("resumed_from", []),
        "eval": evaluation,
        "config": job.to_dict(),
    }
    storage.write_text(summary_path, json.dumps(summary, indent=2))  # written last: marks the run complete
    if evaluation:
        print("\n" + report.text(evaluation, job.eval))
    print(f"\n[raykit] model: {summary['model']}  ({summary['seconds']}s)")
    return summary


def prepare(job: JobConfig) -> tuple[JobConfig, dict]:
    """Everything that can be wrong with the input fails here, on the driver, before a worker starts.

    Returns the job (data.train pointing at mined/scored triplets if it asked for them) and the inputs
    every worker gets: the training table, the evaluation, out-of-domain and validation sets.
    """
    check_model(job)
    if job.mine.enabled or (job.loss.distill and job.teacher.model):
        # Mining and scoring run on Ray too. Start it here, dashboard included: Ray Train's
        # placement-group cleaner needs the State API, which a Ray Data-only start leaves out.
        connect_ray()
    job = prepare_data(job)
    table = load_training_set(job.data, job.train.seed)
    if job.loss.distill and "positive_score" not in table.column_names:
        raise RaykitError(f"loss.name={job.loss.name}: {job.data.train} has no teacher scores; set teacher.model, or run raykit score")
    if job.eval.data and not storage.exists(job.eval.data):
        raise RaykitError(f"eval.data: {job.eval.data}: no such folder; point it at a BEIR folder or set eval.data= to skip")
    if job.eval.ood_data and not storage.exists(job.eval.ood_data):
        raise RaykitError(f"eval.ood_data: {job.eval.ood_data}: no such folder; point it at an out-of-domain BEIR folder or set eval.ood_data=")
    inputs = {
        "table": table,
        "num_rows": table.num_rows,
        "eval_set": load_beir(job.eval.data, job.eval.split) if job.eval.data else None,
        "ood_set": load_beir(job.eval.ood_data, job.eval.ood_split) if job.eval.ood_data else None,
        "val_set": load_validation_set(job.data, job.train.seed),
    }
    steps_per_epoch, total_steps = schedule_length(table.num_rows, job.scaling.num_workers, job)
    held_out = f" ({job.data.val_queries} queries held out for validation)" if job.data.val_queries else ""
    print(
        f"[raykit] {table.num_rows} training pairs from {job.data.train}{held_out} | {job.scaling.num_workers} worker(s) x "
        f"batch {job.train.batch_size} | {steps_per_epoch} steps/epoch, {total_steps} steps | strategy {job.train.strategy}"
    )
    return job, inputs


def make_trainer(job: JobConfig, inputs: dict, storage_path: str, name: str, callbacks=()):
    """The TorchTrainer of one run: `raykit train`'s, or one sweep trial's (with Tune's report callback)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.data.DataContext.get_current().enable_progress_bars = False  # one progress line: ours
    loop_config = {"job": job, **{k: v for k, v in inputs.items() if k != "table"}}
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
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # our progress lines say enough
            # RAYKIT_* settings of the submitting shell reach the workers too
            worker_runtime_env={"env_vars": env} if (env := raykit_env()) else None,
            callbacks=list(callbacks),
        ),
        datasets={"train": ray.data.from_arrow(inputs["table"])},
    )


def prepare_data(job: JobConfig) -> JobConfig:
    """The job with data.train pointing at what training reads: mined triplets, then teacher scores."""
    import dataclasses

    if job.mine.enabled:
        from raykit import mine

        job = dataclasses.replace(job, data=dataclasses.replace(job.data, train=mine.run(job)))
    if job.loss.distill and job.teacher.model:
        from raykit import score

        job = dataclasses.replace(job, data=dataclasses.replace(job.data, train=score.run(job, job.data.train)))
    return job


def check_model(job: JobConfig) -> None:
    """Load the model's config (not its weights) to check the job against it."""
    from transformers import AutoConfig, AutoModel

    path = resolve_model(job.model.name)
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RaykitError(f"model.name: cannot load '{job.model.name}' ({str(e).splitlines()[0]})") from None
    for key, dims in (("eval.dims", job.eval.dims), ("loss.matryoshka_dims", job.loss.matryoshka_dims)):
        if dims and dims[-1] > model_config.hidden_size:
            raise RaykitError(f"{key}: {dims[-1]} is larger than the model's {model_config.hidden_size} dimensions")
    if job.train.strategy == "lora":
        from raykit.strategies.lora import check_target_modules

        with torch.device("meta"):  # module names without allocating weights
            check_target_modules(AutoModel.from_config(model_config), job.lora.target_modules)


def schedule_length(num_rows: int, world: int, job: JobConfig) -> tuple[int, int]:
    steps_per_epoch = (num_rows // world) // job.train.batch_size
    if steps_per_epoch == 0:
        raise RaykitError(
            f"data.train: {num_rows} pairs is less than one batch per worker "
            f"(train.batch_size {job.train.batch_size} x scaling.num_workers {world}); lower train.batch_size"
        )
    return steps_per_epoch, job.train.max_steps or steps_per_epoch * job.train.epochs


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def _tokens(encoder: Encoder, texts, device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in encoder.tokenize(list(texts)).items()}


def _mean_across_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        on = value.device if dist.get_backend() == "nccl" else "cpu"
        value = value.to(on)
        dist.all_reduce(value)
        value /= world
    return float(value)


def _flat(results: dict) -> dict[str, float]:
    return {f"{name}/{dim}": v for dim, metrics in results.items() for name, v in metrics.items()}


def _eval_line(label: str, results: dict) -> str:
    return f"{label}: " + " | ".join(f"nDCG@10@{dim} {m['ndcg@10']:.4f}" for dim, m in results.items())


def _quiet_ray_train_reports() -> None:
    """Our progress line replaces Ray Train's "Reporting training result" line at every report.

    Ray Train names that logger by its file path, not its module, so LoggingConfig doesn't reach it.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _printer(rank: int):
    def log(msg: str) -> None:
        if rank == 0:
            # Not print(): Ray Train patches print on workers and the line would show twice.
            sys.stdout.write(f"[raykit] {msg}\n")
            sys.stdout.flush()

    return log


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"

