"""Teacher scores for distillation: `raykit score JOB.yaml`, or before training a margin_mse/kl job.

Reads the training triplets (query, positive, negatives), scores every (query, document) pair with
the teacher in a Ray Data actor pool, and writes the triplets again with `positive_score` and
`negative_scores`. The teacher is either
- a cross-encoder (`teacher.kind: cross_encoder`): a Hugging Face sequence-classification model with
  one output; the score is its logit for (query, document) read together. The precise choice;
- a bi-encoder (`teacher.kind: bi_encoder`): a larger or better embedding model; the score is
  `loss.scale * cosine`, on the same scale as the student's.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from raykit import identity, pairs, storage
from raykit.cluster import actor_count, connect_ray, quiet_ray_data, require_shared_storage, worker_error
from raykit.config import JobConfig
from raykit.data import is_beir
from raykit.encoder import Encoder, model_config, resolve_model
from raykit.errors import RaykitError

log = logging.getLogger(__name__)


def scored_path(job: JobConfig) -> str:
    return job.teacher.output or storage.join(storage.resolve(job.output_dir), "scored", "triplets.jsonl")


def check(job: JobConfig) -> None:
    """The teacher, read without its weights, before anything is written: a cross-encoder needs one output."""
    cfg = job.teacher
    if not cfg.model:
        raise RaykitError(f"loss.name={job.loss.name}: the data has no teacher scores; set teacher.model (a cross-encoder)")
    config = model_config(cfg.model, "teacher.model", embedding=cfg.kind == "bi_encoder")
    if cfg.kind == "cross_encoder" and config.num_labels != 1:
        raise RaykitError(f"teacher.model: {cfg.model} has {config.num_labels} outputs; a cross-encoder teacher "
                          "needs 1 (a relevance logit), or set teacher.kind=bi_encoder for an embedding model")


def run(job: JobConfig, triplets: str) -> str:
    """Write `triplets` with teacher scores; returns the new file (reused if already written)."""
    import ray.data

    cfg = job.teacher
    out = scored_path(job)
    storage.check_output("teacher.output" if job.teacher.output else "output_dir", out, folder=False)
    require_shared_storage("teacher.output" if job.teacher.output else "output_dir", out)
    settings = identity.of({"triplets": triplets, "scale": job.loss.scale, "teacher": job.to_dict()["teacher"]},
                           ("teacher.output", "teacher.concurrency", "teacher.num_gpus", "teacher.batch_size"))
    if identity.reusable(out, settings, "scored triplets", "teacher.output"):
        log.info(f"score: {out} exists; reusing it (delete it to score again)")
        return out
    check(job)
    if is_beir(triplets):
        raise RaykitError(f"data.train: {triplets} is a BEIR folder: its pairs have no negatives to score; "
                          "mine them first (mine.enabled=true) or point data.train at triplets")
    # the user's own triplets in their columns; mined ones in raykit's
    columns = job.data.columns if triplets == job.data.train else None
    rows = [row for f in pairs.files(triplets) for row, _ in pairs.read(f, columns, job.data.split)]
    if not any(r["negatives"] for r in rows):
        raise RaykitError(f"{triplets}: no negatives to score against; mine them first (mine.enabled=true)")
    identity.record(out + ".job.json", settings)  # before the scores: they mark the scoring complete
    started = time.time()
    log.info(f"score: {len(rows)} triplets with {cfg.kind} {cfg.model}")

    quiet_ray_data()
    connect_ray(dashboard=False)
    items = [{"i": i, "query": r["query"], "docs": json.dumps([r["positive"], *r["negatives"]])} for i, r in enumerate(rows)]
    ds = ray.data.from_items(items).map_batches(
        _Teacher,
        fn_constructor_kwargs={"model": cfg.model, "kind": cfg.kind, "max_seq_length": cfg.max_seq_length,
                               "batch_size": cfg.batch_size, "scale": job.loss.scale},
        batch_size=max(1, cfg.batch_size // 4),  # rows per call; each row is 1 + k pairs
        compute=ray.data.ActorPoolStrategy(size=actor_count(cfg.concurrency, cfg.num_gpus, 1, len(items))),
        num_gpus=cfg.num_gpus,
        num_cpus=0 if cfg.num_gpus else 1,
    )
    try:
        for result in ds.iter_rows():
            scores = json.loads(result["scores"])
            rows[result["i"]]["positive_score"] = scores[0]
            rows[result["i"]]["negative_scores"] = scores[1:]
    except Exception as e:  # noqa: BLE001 - a worker's bad-input error arrives wrapped by Ray
        raise worker_error(e, "scoring stopped", "rerun the same command") from None
    pairs.write(out, rows)
    margins = np.array([r["positive_score"] - s for r in rows for s in r["negative_scores"]])
    log.info(f"score: {len(rows)} triplets -> {out} | teacher margin pos-neg mean {margins.mean():.3f}, "
          f"positive above negative in {100 * (margins > 0).mean():.0f}% | {time.time() - started:.0f} s")
    return out


class _Teacher:
    def __init__(self, model: str, kind: str, max_seq_length: int, batch_size: int, scale: float):
        from raykit.device import local_device

        self.device = local_device()
        self.kind, self.batch_size, self.scale, self.max_len = kind, batch_size, scale, max_seq_length
        if kind == "bi_encoder":
            self.encoder = Encoder.from_pretrained(model).to(self.device).eval()
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise RaykitError(f"teacher.model: cannot load '{model}' as a cross-encoder ({str(e).splitlines()[0]})") from None
        if self.model.config.num_labels != 1:
            raise RaykitError(f"teacher.model: {model} has {self.model.config.num_labels} outputs; a cross-encoder teacher needs 1 (a relevance logit)")

    def __call__(self, batch: dict) -> dict:
        import torch

        queries = list(batch["query"])
        docs = [json.loads(d) for d in batch["docs"]]
        pairs = [(q, d) for q, ds in zip(queries, docs) for d in ds]
        scores = []
        with torch.inference_mode():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                scores += self._score(chunk)
        out, pos = [], 0
        for ds in docs:
            out.append(json.dumps(scores[pos:pos + len(ds)]))
            pos += len(ds)
        return {"i": batch["i"], "scores": out}

    def _score(self, pairs: list[tuple[str, str]]) -> list[float]:
        if self.kind == "bi_encoder":
            # the teacher's own prompts (those its folder stores)
            q = self.encoder.encode([p[0] for p in pairs], len(pairs), self.device, role="query")
            d = self.encoder.encode([p[1] for p in pairs], len(pairs), self.device, role="document")
            return (self.scale * (q * d).sum(-1)).tolist()
        enc = self.tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True, truncation=True,
                             max_length=self.max_len, return_tensors="pt").to(self.device)
        return self.model(**enc).logits[:, 0].float().cpu().tolist()
