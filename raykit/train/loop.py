"""The per-worker training loop: what every Ray Train worker runs, top to bottom.

Load the model and wrap it for the strategy (peft + DDP, or a DeepSpeed engine); resume from the
latest checkpoint; evaluate the base; loop (encode, loss, step, report, checkpoint); evaluate; export.
Its decisions (when to report, evaluate, validate, checkpoint) are the small helpers below it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import raykit.log
from raykit.config import JobConfig
from raykit.data import Beir, negative_count
from raykit.encoder import Encoder
from raykit.evaluate import evaluate
from raykit.losses import kl_loss, margin_mse_loss, matryoshka_loss, mnr_loss
from raykit.precision import use_bf16
from raykit.strategies import build_trainee
from raykit.train.tracking import RunLog

STATE_FILE = "state.json"


def train_fn_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, once per worker
    job: JobConfig = config["job"]
    sets = {"eval": config["eval_set"], "ood": config.get("ood_set"), "val": config.get("val_set")}
    steps_per_epoch, total_steps = config["steps_per_epoch"], config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(job.train.seed)  # same init on every rank; DDP/DeepSpeed also broadcast rank 0's
    torch.set_num_threads(job.scaling.cpus_per_worker)
    device = ray.train.torch.get_device()
    raykit.log.setup(config["log_level"])
    _quiet_ray_train_reports()
    log = _rank0_logger(rank)

    # Model, wrapped for the strategy.
    encoder = Encoder.load(job.model)
    trainee = build_trainee(encoder, job, total_steps, device, use_bf16(job.train.precision, device))

    # Resume: the latest checkpoint of this output_dir, after a rerun or a worker-group restart.
    checkpoint = ray.train.get_checkpoint()
    state = _resume(trainee, checkpoint, total_steps, log)
    run_log = RunLog(job, state, rank)  # metrics.jsonl and the trackers, as training goes

    def run_eval(beir: Beir) -> dict:
        return evaluate(trainee.encoder, beir, job.eval.dims, job.eval.batch_size, device, trainee.module)

    _evaluate_base(state, sets, job, run_eval, log)

    shard = ray.train.get_dataset_shard("train")
    meter = _Throughput(job.train.batch_size * world, total_steps)
    last_val: dict[str, float] = {}  # the latest validation, repeated in the final report
    step = state["step"]
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        for i, batch in enumerate(_epoch_batches(shard, job, config["num_rows"] // world, epoch)):
            if i < done_in_epoch:
                continue  # a resumed run replays the epoch's order and skips what it did
            loss = training_loss(trainee, batch, job, device)
            grad_norm = trainee.step(loss)
            step += 1
            meter.steps += 1

            do_eval, do_val = _evaluations_due(job, step, total_steps, sets)
            if step % job.train.log_every == 0 or step == total_steps or do_eval or do_val:
                metrics = {"step": step, "epoch": epoch + 1, "loss": _mean_across_ranks(loss.detach().float(), world),
                           "lr": trainee.lr, "grad_norm": grad_norm, **meter.rates()}
                log(_progress_line(metrics, total_steps, meter.eta(step)))
                if do_eval:
                    results = run_eval(sets["eval"])
                    metrics.update(_flat(results))
                    log(_eval_line(f"step {step}", results))
                if do_val:
                    results = run_eval(sets["val"])
                    last_val = {f"val_{k}": v for k, v in _flat(results).items()}
                    last_val["val_ndcg@10"] = results[max(results)]["ndcg@10"]  # at the full size
                    metrics.update(last_val)
                    log(_eval_line(f"step {step} validation", results))
                eval_s = time.perf_counter() - meter.reported_at
                run_log.log(metrics)
                ray.train.report(metrics)
                meter.restart(eval_s)

            if job.train.checkpoint_every and step % job.train.checkpoint_every == 0 and step < total_steps:
                state["step"] = step
                _report_checkpoint(trainee, state, rank, step, {"step": step})
                log(f"checkpoint at step {step}")
            if step >= total_steps:
                break

    state["step"] = step
    run_log.close()
    log(f"training took {_duration(meter.elapsed())}")
    after = _evaluate_fine_tuned(state, sets, run_eval, log)
    log("exporting the model")
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


# --- the loop's decisions ----------------------------------------------------------------------------


def _resume(trainee, checkpoint, total_steps: int, log) -> dict:
    """The run's state: from the checkpoint (weights and optimizer loaded into trainee), or fresh."""
    if not checkpoint:
        return {"step": 0, "eval_before": None, "ood_before": None, "history": []}
    with checkpoint.as_directory() as path:
        trainee.load_state(path)
        state = json.loads(Path(path, STATE_FILE).read_text())
    state.setdefault("resumed_from", []).append(state["step"])
    log(f"resumed from step {state['step']}/{total_steps}")
    return state


def _evaluate_base(state: dict, sets: dict, job: JobConfig, run_eval, log) -> None:
    """Score the base model in domain and out of domain, once (a resumed run keeps its figures)."""
    if sets["eval"] and job.eval.before and state["eval_before"] is None:
        log(f"evaluating the base model on {len(sets['eval'].corpus)} docs, {len(sets['eval'].queries)} queries ...")
        state["eval_before"] = run_eval(sets["eval"])
        log(_eval_line("before", state["eval_before"]))
    if sets["ood"] and state.get("ood_before") is None:
        log(f"evaluating the base model out of domain ({len(sets['ood'].corpus)} docs, {len(sets['ood'].queries)} queries) ...")
        state["ood_before"] = run_eval(sets["ood"])
        log(_eval_line("before, out of domain", state["ood_before"]))


def _evaluate_fine_tuned(state: dict, sets: dict, run_eval, log) -> dict | None:
    """Score the fine-tuned model in domain (returned) and out of domain (into state)."""
    after = None
    if sets["eval"]:
        log("evaluating the fine-tuned model ...")
        after = run_eval(sets["eval"])
        log(_eval_line("after", after))
    if sets["ood"]:
        state["ood_after"] = run_eval(sets["ood"])
        log(_eval_line("after, out of domain", state["ood_after"]))
    return after


def _epoch_batches(shard, job: JobConfig, rows_per_worker: int, epoch: int):
    """This worker's batches of one epoch, in an order fixed by the seed and the epoch."""
    return shard.iter_batches(
        batch_size=job.train.batch_size,
        drop_last=True,  # every rank takes the same number of steps, or the collectives hang
        batch_format="numpy",
        local_shuffle_buffer_size=min(rows_per_worker, 100_000),  # a full reshuffle of small shards
        local_shuffle_seed=job.train.seed + epoch,
    )


def _evaluations_due(job: JobConfig, step: int, total_steps: int, sets: dict) -> tuple[bool, bool]:
    """(periodic evaluation, validation) at this step; the final evaluation follows the loop."""
    at_eval = bool(job.train.eval_every and step % job.train.eval_every == 0)
    return bool(sets["eval"] and at_eval and step < total_steps), bool(sets["val"] and (at_eval or step == total_steps))


class _Throughput:
    """pairs/s over the steps since the last report: report time counts against it, evaluation time doesn't."""

    def __init__(self, global_batch: int, total_steps: int):
        self.global_batch, self.total_steps = global_batch, total_steps
        self.started = self.window_start = self.reported_at = time.perf_counter()
        self.steps = 0
        self.pairs_per_s = 0.0

    def rates(self) -> dict[str, float]:
        self.reported_at = time.perf_counter()
        self.pairs_per_s = self.steps * self.global_batch / (self.reported_at - self.window_start)
        return {"pairs_per_s": self.pairs_per_s, "elapsed_s": self.reported_at - self.started}

    def eta(self, step: int) -> float:
        return (self.total_steps - step) * self.global_batch / self.pairs_per_s if self.pairs_per_s else math.inf

    def restart(self, eval_s: float) -> None:
        """The next window starts at the report, moved past the evaluation that followed it."""
        self.window_start, self.steps = self.reported_at + eval_s, 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _progress_line(metrics: dict, total_steps: int, eta: float) -> str:
    step = metrics["step"]
    return (f"step {step}/{total_steps} ({100 * step // total_steps}%) | epoch {metrics['epoch']} | "
            f"loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | {metrics['pairs_per_s']:.1f} pairs/s | eta {_duration(eta)}")


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
        has_files = any(Path(tmp).iterdir())
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None,
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


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

    Ray Train sets a worker's root logger to INFO, and that line comes from a logger named by its file
    path, which propagates to root. `raykit` records don't propagate, so a root at WARNING (unless -v)
    drops only the libraries' INFO lines.
    """
    if raykit.log.level() > logging.DEBUG:
        logging.getLogger().setLevel(logging.WARNING)


def _rank0_logger(rank: int):
    """Rank 0 speaks for the run: one progress line per report, not one per worker."""
    logger = logging.getLogger(__name__)

    def log(msg: str) -> None:
        if rank == 0:
            logger.info(msg)

    return log


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
