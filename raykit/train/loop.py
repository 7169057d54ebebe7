"""The per-worker training loop: what every Ray Train worker runs, top to bottom.

Load the model and wrap it for the strategy (peft + DDP, or a DeepSpeed engine); resume from the
latest checkpoint; evaluate the base; loop (encode, loss, step, report, checkpoint); evaluate; export.
Its decisions (when to report, evaluate, validate, checkpoint) are the small helpers below it.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings

import torch
import torch.distributed as dist

import raykit.log
from raykit.config import JobConfig
from raykit.data import Beir
from raykit.device import configure
from raykit.encoder import Encoder
from raykit.evaluate import evaluate
from raykit.log import format_duration
from raykit.losses import kl_loss, margin_mse_loss, matryoshka_loss, mnr_loss
from raykit.precision import use_bf16
from raykit.strategies import build_trainee
from raykit.train import checkpoints, gradcache
from raykit.train.batches import BatchDigest, Plan
from raykit.train.feed import Prepared, prepare, read_ahead
from raykit.train.meter import Throughput
from raykit.train.tracking import RunLog


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
    device = configure(ray.train.torch.get_device())
    raykit.log.setup(config["log_level"])
    _quiet_ray_train_reports()
    log = _rank0_logger(rank)

    trainee = _load_trainee(job, total_steps, device, log)  # the model, wrapped for the strategy

    # Resume: the latest sound checkpoint of this output_dir, after a rerun or a worker-group restart.
    checkpoint = ray.train.get_checkpoint() or checkpoints.latest_kept(config["checkpoints"])
    state, digest = _resume(trainee, checkpoint, rank, total_steps, log)
    run_log = RunLog(job, state, rank)  # metrics.jsonl and the trackers, as training goes

    def run_eval(beir: Beir) -> dict:
        with trainee.evaluating():  # LoRA: the adapters merged in for the duration
            return evaluate(trainee.encoder, beir, job.eval.dims, job.eval.batch_size, device, trainee.module)

    _evaluate_base(state, sets, job, run_eval, log)

    table = config["table"].table()  # the training pairs: one copy per node, in Ray's object store
    meter = Throughput(job, world, total_steps, trainee.encoder, device)
    saves = _CheckpointCadence(job, state)
    to_ray = _RayReports()
    last_val: dict[str, float] = {}  # the latest validation, repeated in the final report
    step = state["step"]
    # a resumed run starts at the step its checkpoint holds; each step's input is read and tokenized
    # ahead, on threads of this worker or by tokenizer actors (raykit/train/feed.py)
    plan = Plan(table, world, rank, job.train.batch_size, job.train.seed, job.train.group_by_length)
    with read_ahead(trainee.encoder, config["table"], table, plan, range(step, total_steps), job.loss.mini_batch_size,
                    device, job.scaling.cpus_per_worker, job.scaling.feed_actors) as ahead:
        log(f"input read ahead by {ahead.by}")
        for prepared in ahead:
            digest.update(prepared.batch)
            loss, grad_norm, lengths = training_step(trainee, prepared, job, device)
            epoch, step = step // steps_per_epoch, step + 1
            meter.add_step(lengths)

            do_eval, do_val = _evaluations_due(job, step, total_steps, sets)
            do_report = step % job.train.log_every == 0 or step == total_steps or do_eval or do_val
            time_up = False
            if do_report:
                loss_sum, time_up, window_flops, ray_due = _sum_across_ranks(
                    [loss.detach().float(), saves.time_up(), meter.flops, to_ray.due()], world)
                metrics = {"step": step, "epoch": epoch + 1, "loss": loss_sum / world,
                           "lr": trainee.lr, "grad_norm": float(grad_norm), **meter.rates(window_flops)}
                log(_progress_line(metrics, total_steps, meter.eta(step)))
                if do_eval:
                    results = run_eval(sets["eval"])
                    metrics.update(_flat(results))
                    log(_eval_line(f"step {step}", results))
                if do_val:
                    last_val = _validation(run_eval(sets["val"]), step, log)
                    metrics.update(last_val)
                eval_s = time.perf_counter() - meter.reported_at
                run_log.log(metrics)
                if ray_due or do_eval or do_val:
                    to_ray.report(metrics)
                meter.restart(eval_s)

            if step < total_steps and (saves.steps_up(step) or time_up):
                state["step"] = step
                log(saves.timed(step, lambda: checkpoints.save(trainee, state, rank, world, step, {"step": step}, digest.value)))

    run_log.close()
    log(f"training took {format_duration(meter.elapsed())}{saves.share_line(meter.elapsed())}")
    state["throughput"] = {**meter.summary(_sum_across_ranks([meter.total_flops], world)[0]), "read_ahead_by": ahead.by}
    _finish(trainee, state, step, digest, last_val, sets, run_eval, rank, world, log)


def _finish(trainee, state: dict, step: int, digest: BatchDigest, last_val: dict, sets: dict, run_eval, rank: int,
            world: int, log) -> None:
    """Evaluate the fine-tuned model, then export it with the run's summary (every rank takes part:
    ZeRO-3 gathers its shards)."""
    state["step"] = step
    state["batches_sha256"] = _gather_across_ranks(digest.value, world)
    after = _evaluate_fine_tuned(state, sets, run_eval, log)
    log("exporting the model")
    final = {"step": step, "done": True, **last_val, **(_flat(after) if after else {})}
    evaluation = {"before": state["eval_before"], "after": after, "ood_before": state.get("ood_before"), "ood_after": state.get("ood_after")}
    checkpoints.save(trainee, state, rank, world, step, final, digest.value, export=True, evaluation=evaluation)


def training_step(trainee, batch: Prepared | dict, job: JobConfig, device) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor]:
    """One optimizer step on one batch; returns (loss, gradient norm, every encoded text's token count).
    Nothing here reads a value back from the device: on a GPU the host queues the next step's work
    while this one runs."""
    loss, lengths = backward_batch(trainee, batch, job, device)
    return loss, trainee.step(None), lengths


def backward_batch(trainee, batch: Prepared | dict, job: JobConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode one batch of (query, positive, k negatives) rows, score it with the job's loss and
    back-propagate: the whole batch at once, or in chunks of loss.mini_batch_size (gradient caching,
    the same loss and gradients). `batch`: prepared by feed.py, or rows to prepare here. Returns the
    loss and the token count of every text encoded (for MFU)."""
    if not isinstance(batch, Prepared):
        batch = prepare(trainee.encoder.tokenizing(), batch, job.loss.mini_batch_size, device)
    groups, targets = batch.on(device)
    loss_on = _loss_on_embeddings(targets, job)
    extra = (lambda: job.train.l2sp * trainee.drift()) if job.train.l2sp else None
    if batch.orders is not None:
        # the chunks hold each pass's texts longest first; the loss takes the embeddings back in the batch's order
        inverses = [targets[f"inverse_{i}"] for i in range(len(groups))]

        def in_batch_order(*embeddings):
            return loss_on(*(e[inverse] for e, inverse in zip(embeddings, inverses)))

        return gradcache.cached_backward(trainee, groups, in_batch_order, extra), batch.lengths
    loss = loss_on(*(trainee(chunks[0]) for chunks in groups))
    if extra is not None:
        loss = loss + extra()
    trainee.backward(loss)
    return loss, batch.lengths


def _loss_on_embeddings(targets: dict[str, torch.Tensor], job: JobConfig):
    """The job's loss as a function of the batch's embeddings: queries (B, H), positives (B, H) and,
    when the rows have k negatives, the negatives as `feed.forward_inputs` orders them (k*B, H).
    `targets`: the rows' ids and teacher scores on the device (feed.loss_inputs)."""
    negative_ids = targets.get("negative_ids")  # (B, k)
    k = 0 if negative_ids is None else negative_ids.shape[1]
    query_ids, positive_ids = targets["query_id"], targets["positive_id"]
    cfg = job.loss

    def loss_on(q, p, n):
        if cfg.name == "mnr":
            return mnr_loss(q, p, query_ids, positive_ids, scale=cfg.scale, negatives=n, negative_ids=negative_ids, gather=cfg.gather)
        teacher_pos, teacher_neg = targets["positive_score"], targets["negative_scores"]
        if cfg.name == "margin_mse":
            return margin_mse_loss(q, p, n, teacher_pos, teacher_neg, scale=cfg.scale)
        return kl_loss(q, p, n, teacher_pos, teacher_neg, scale=cfg.scale, temperature=cfg.temperature)

    def loss(queries, positives, negatives=None):
        if negatives is not None:  # (k*B, H) -> (B, k, H)
            negatives = negatives.reshape(k, len(queries), -1).transpose(0, 1)
        embeddings = (queries, positives, negatives)
        if cfg.matryoshka_dims:
            return matryoshka_loss(loss_on, embeddings, cfg.matryoshka_dims, cfg.matryoshka_weights)
        return loss_on(*embeddings)

    return loss


# --- the loop's decisions ----------------------------------------------------------------------------


def _load_trainee(job: JobConfig, total_steps: int, device, log):
    """The model, wrapped for the strategy (peft + DDP, or a DeepSpeed engine), compiled if asked."""
    encoder = Encoder.load(job.model, attention_dropout=job.train.attention_dropout)
    trainee = build_trainee(encoder, job, total_steps, device, use_bf16(job.train.precision, device))
    if job.scaling.compile:
        log("the model runs through torch.compile: its first steps and evaluation wait for the compiler")
    return trainee


def _resume(trainee, checkpoint, rank: int, total_steps: int, log) -> tuple[dict, BatchDigest]:
    """The run's state and this rank's batch digest: from the latest sound checkpoint (weights,
    optimizer and RNG loaded), or fresh."""
    resumed = checkpoints.resume(trainee, checkpoint, rank)
    if not resumed:
        return {"step": 0, "eval_before": None, "ood_before": None, "history": []}, BatchDigest()
    state, batches_sha256 = resumed
    state.setdefault("resumed_from", []).append(state["step"])
    log(f"resumed from step {state['step']}/{total_steps}")
    return state, BatchDigest(batches_sha256)


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


def _validation(results: dict, step: int, log) -> dict[str, float]:
    """A validation's figures as reported (`val_ndcg@10/32`, ...), `val_ndcg@10` at the full size."""
    log(_eval_line(f"step {step} validation", results))
    val = {f"val_{k}": v for k, v in _flat(results).items()}
    val["val_ndcg@10"] = results[max(results)]["ndcg@10"]
    return val


def _evaluations_due(job: JobConfig, step: int, total_steps: int, sets: dict) -> tuple[bool, bool]:
    """(periodic evaluation, validation) at this step; the final evaluation follows the loop."""
    at_eval = bool(job.train.eval_every and step % job.train.eval_every == 0)
    return bool(sets["eval"] and at_eval and step < total_steps), bool(sets["val"] and (at_eval or step == total_steps))


def _progress_line(metrics: dict, total_steps: int, eta: float) -> str:
    step = metrics["step"]
    used = f" | MFU {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""
    return (f"step {step}/{total_steps} ({100 * step // total_steps}%) | epoch {metrics['epoch']} | "
            f"loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | {metrics['pairs_per_s']:.1f} pairs/s{used} | "
            f"eta {format_duration(eta)}")


class _RayReports:
    """Which progress reports also go to Ray Train (a sweep's trial results and its scheduler).

    ray.train.report hands a result to the controller through a queue of one, and the controller
    takes it when it next polls its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): a
    report while the last one still waits blocks every worker until that poll. Every log_every steps,
    fast steps would idle on it (on a GPU, 5 steps of ~0.1 s, then up to 2 s of nothing). So a
    progress report goes to Ray Train once one and a half poll intervals have passed since the last;
    evaluations and validations always go. The progress line, metrics.jsonl and the trackers (RunLog)
    get every report."""

    def __init__(self, clock=time.perf_counter):
        self.every = 1.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))
        self.clock, self.last = clock, -math.inf

    def due(self) -> bool:
        """This rank's clock; the loop acts on the sum over ranks, so every rank reports at one step."""
        return self.clock() - self.last >= self.every

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)
        self.last = self.clock()


class _CheckpointCadence:
    """When to checkpoint (train.checkpoint_every: steps, or a duration of training) and what it costs."""

    def __init__(self, job: JobConfig, state: dict):
        self.steps, self.seconds = job.train.checkpoint_interval
        self.totals = state.setdefault("checkpoint_totals", {"count": 0, "seconds": 0.0})
        self.since = time.perf_counter()

    def steps_up(self, step: int) -> bool:
        return bool(self.steps) and step % self.steps == 0

    def time_up(self) -> bool:
        """This rank's clock; the loop acts on the sum over ranks, so every rank checkpoints at one step."""
        return bool(self.seconds) and time.perf_counter() - self.since >= self.seconds

    def timed(self, step: int, save) -> str:
        """Run `save`, count its cost, and say it as a share of the training time since the last one."""
        started = time.perf_counter()
        save()
        seconds = time.perf_counter() - started
        trained = started - self.since
        self.totals["count"] += 1
        self.totals["seconds"] += seconds
        self.since = time.perf_counter()
        return f"checkpoint at step {step}: {seconds:.1f}s, {100 * seconds / max(trained, 1e-9):.1f}% of the {format_duration(trained)} trained since the last"

    def share_line(self, elapsed: float) -> str:
        n, seconds = self.totals["count"], self.totals["seconds"]
        return f" ({n} checkpoint(s): {seconds:.1f}s, {100 * seconds / elapsed:.1f}% of it)" if n and elapsed else ""


def _sum_across_ranks(values: list, world: int) -> list[float]:
    """Every rank's values summed (one all-reduce for all of them)."""
    value = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if world > 1:
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        value = value.to(on)
        dist.all_reduce(value)
    return value.tolist()


def _gather_across_ranks(value: str, world: int) -> list[str]:
    if world == 1:
        return [value]
    values: list = [None] * world
    dist.all_gather_object(values, value)
    return values


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
