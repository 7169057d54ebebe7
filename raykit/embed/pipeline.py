"""`raykit embed`: re-embed a whole corpus with Ray Data into object storage, resumable and committed.

The pipeline, one row per shard (see corpus.py) so that a shard is written whole or not at all:

    plan shards (driver) -> read + tokenize (CPU actors) -> encode (GPU actors) -> write Parquet (actors)

with the three stages in stages.py. Tokenizing in its own CPU stage keeps a GPU busy with forward
passes only. On CPUs, where a forward pass costs a hundred times the tokenizing, each encoder actor
runs the three steps for its shard itself (stages.EmbedShards). Inside a shard, documents go
through longest first in token-budget batches, so each pads to similar lengths. Every shard is
followed by a small record; when all are written the driver commits manifest.json (see
manifest.py). A rerun skips shards whose record matches this model and input, so an interrupted job
resumes, and a committed one is a no-op.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
import uuid
from datetime import datetime, timezone

import numpy as np

from raykit import __version__, storage, tokens
from raykit.cluster import (
    actor_count,
    check_local_compiler,
    connect_ray,
    node_count,
    quiet_ray_data,
    require_shared_storage,
    worker_error,
)
from raykit.config import EmbedJob
from raykit.embed import corpus, manifest, stages
from raykit.encoder import Encoder, check_length, model_config
from raykit.errors import RaykitError, RunFailed
from raykit.flops import mfu
from raykit.log import format_duration

log = logging.getLogger(__name__)

# One tokenizer core does ~1,100-2,000 SciFact docs/s at 256 tokens (measured on a 2-core Xeon); a GPU
# encoder is aimed at ~20,000 (issue 14): the pool may grow to this many tokenizers per GPU encoder.
TOKENIZERS_PER_GPU = 16
PROGRESS_EVERY_S = 10.0


def run(job: EmbedJob) -> dict:
    """Embed job.corpus with job.model into job.output; returns the committed manifest."""
    storage.check_output("output", job.output)
    output = storage.resolve(job.output)
    require_shared_storage("output", output)
    source = storage.resolve(job.corpus)
    shards = corpus.plan(source, job.embed.shard_mb)
    committed = manifest.read_committed(output)

    # Everything checkable is checked before a worker starts (or Ray, for a first run: see below).
    hub = {"revision": job.revision, "trust_remote_code": job.trust_remote_code}
    dim = _checked_dim(job, hub)
    if job.embed.compile:
        check_local_compiler("embed.compile", job.embed.num_gpus > 0)
    if committed is None:
        manifest.check_store(output)
    encoder = _load_while_ray_starts(job, hub, start_ray=committed is None)
    fingerprint = encoder.fingerprint()
    identity = {"model": fingerprint, "plan": corpus.plan_fingerprint(shards), "dim": dim, "dtype": job.embed.dtype,
                "precision": job.embed.precision}
    # recorded in the manifest: `raykit search` reads the prompts from there for a model that stores none
    settings = {"pooling": encoder.pooling, "normalize": encoder.normalize, "max_seq_length": encoder.max_seq_length,
                "prompts": encoder.prompts, **hub}
    # for its tokenizer actors
    tokenizer = tokens.backend(encoder.tokenizer, encoder.max_seq_length, (encoder.prompts.get("document", ""),), padding=False)
    del encoder

    replacing = None
    if committed is not None:
        if committed.manifest is not None and _identity(committed.manifest) == identity:
            log.info(f"{storage.join(output, manifest.MANIFEST)}: already committed ({committed.manifest['rows']:,} rows in "
                  f"{len(committed.manifest['shards'])} shards, model {manifest.short(fingerprint)}); nothing to do")
            return committed.manifest
        if not job.new_run:
            raise RaykitError(_mismatch(output, committed.manifest, identity))
        # The committed embeddings stay readable, untouched, until this run's commit replaces them.
        log.info(f"new_run=true: writing new embeddings beside the committed ones in {output}; they replace them when complete")
        replacing = committed
    manifest.check_store(output)

    records = {name: r for name, r in manifest.read_records(output).items() if _record_matches(r, shards, identity)}
    kept = manifest.sound(output, list(records.values()))
    records = {name: record for name, (record, _) in kept.items()}
    id_hashes = {name: ids for name, (_, ids) in kept.items()}  # 8 bytes a document: ids unique across the corpus
    todo = [s for s in shards if s.name not in records]
    log.info(f"embed {source} -> {output} | {len(shards)} shards ({len(records)} already written) | "
          f"model {manifest.short(fingerprint)} | dim {dim} {job.embed.dtype}")

    started = time.time()
    written = 0
    attempt = uuid.uuid4().hex[:8]  # this attempt's shard files are its own: part-000042-<attempt>.parquet
    progress = _Progress(todo, started)
    if todo:
        quiet_ray_data()
        connect_ray(dashboard=False)
        if node_count() > 1 and not (storage.is_uri(output) and storage.is_uri(source)):
            raise RaykitError("corpus and output: on a multi-node cluster both must be storage every node reaches (s3://...)")
        written = _collect(_pipeline(job, todo, output, identity, settings, tokenizer, attempt), records, id_hashes, progress)

    missing = [s.name for s in shards if s.name not in records]
    if missing:  # cannot happen unless a record vanished underneath us; never commit a gap
        raise RaykitError(f"{output}: shards {missing[:5]} have no record; run the job again to write them")
    _refuse_duplicate_ids(shards, id_hashes)
    seconds = time.time() - started
    new = _manifest(job, source, shards, records, identity, settings, started, seconds)
    new["actors"] = progress.actors()  # this attempt's encoder actors: docs/s while busy, MFU
    _commit(output, new, replacing, [r["path"] for r in records.values() if r["path"].endswith(f"-{attempt}.parquet")])
    rate = written / seconds if seconds else 0.0
    log.info(f"committed {new['rows']:,} rows in {len(shards)} shards ({len(todo)} written now) | "
          f"{seconds:.1f} s | {rate:.1f} docs/s -> {storage.join(output, manifest.MANIFEST)}")
    return new


def _checked_dim(job: EmbedJob, hub: dict) -> int:
    """The dim this job writes, checked against the model's config (read without its weights): a bad
    model, max_seq_length or embed.dim is one line before Ray or a worker starts."""
    config = model_config(job.model, "model", **hub)
    check_length(config, job.max_seq_length, job.model)
    width = config.hidden_size
    dim = job.embed.dim or width
    if dim > width:
        raise RaykitError(f"embed.dim: {dim} is larger than the model's {width} dimensions; use {width} or less")
    return dim


def _load_while_ray_starts(job: EmbedJob, hub: dict, start_ray: bool) -> Encoder:
    """The job's model, loaded on a thread while Ray starts (`start_ray`: nothing is committed yet, so
    this run will need it). Loading imports and runs on one core; a local Ray's processes start on
    the others: on a 2-core laptop this overlaps ~5 s of start-up. A model that cannot load is still
    one line (the CLI leaves Ray before printing it)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(Encoder.from_pretrained, job.model, job.max_seq_length, job.prompts.as_dict(), **hub)
        if start_ray:
            quiet_ray_data()
            connect_ray(dashboard=False)  # Ray's start-up stays on this, the main thread (its signal handlers)
        return loading.result()


def _pipeline(job: EmbedJob, todo: list[corpus.Shard], output: str, identity: dict, settings: dict, tokenizer: tokens.Backend | None,
              attempt: str):
    import ray.data

    cfg = job.embed
    actors = actor_count(cfg.concurrency, cfg.num_gpus, cfg.cpus_per_actor, len(todo))
    env = {"runtime_env": {"env_vars": storage.worker_env()}} if storage.worker_env() else {}
    hub = {key: settings[key] for key in ("revision", "trust_remote_code")}
    # the tokenizer's backend (its JSON, megabytes for a large vocabulary) once in the object store, not in every actor's arguments
    read = {"model": job.model, "max_seq_length": settings["max_seq_length"], "prompt": settings["prompts"].get("document", ""),
            **hub, "tokenizer": ray.put(tokenizer) if tokenizer else None}
    encode = {"model": job.model, "max_seq_length": settings["max_seq_length"], "prompts": settings["prompts"], **hub,
              "fingerprint": identity["model"], "dim": identity["dim"], "dtype": identity["dtype"], "batch_size": cfg.batch_size,
              "batch_tokens": cfg.batch_tokens, "precision": cfg.precision, "threads": max(1, round(cfg.cpus_per_actor)),
              "peak_tflops": cfg.peak_tflops, "compile": cfg.compile}
    write = {"output": output, "identity": identity, "attempt": attempt}
    ds = ray.data.from_items([{"shard": json.dumps(s.__dict__)} for s in todo], override_num_blocks=len(todo))

    if not cfg.num_gpus:
        # One shard per call. A CPU encoder takes its next shard only when free: one queued behind a
        # minute-long shard would be the run's tail on the other core.
        return ds.map_batches(stages.EmbedShards, fn_constructor_kwargs={"read": read, "write": write, **encode}, batch_size=1,
                              compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                              num_cpus=cfg.cpus_per_actor, **env)

    # Reading + tokenizing and writing are light next to a GPU's forward pass: actor pools that take no
    # CPU reservation and grow with the encoders, not with the corpus; long-lived actors, not tasks, so
    # that memory stays flat. A GPU encodes far faster than one core tokenizes: up to TOKENIZERS_PER_GPU
    # tokenizer actors per encoder, Ray Data growing the pool while encoders wait on it.
    def light(cls, size: int, kwargs: dict):
        return {"fn": cls, "fn_constructor_kwargs": kwargs, "batch_size": 1, "num_cpus": 0,
                "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=size), **env}

    ds = ds.map_batches(**light(stages.TokenizeShards, actors * TOKENIZERS_PER_GPU, read))
    # One shard per call, the actor batching its documents itself; one more queued, so that its next
    # shard's tokens are already there.
    ds = ds.map_batches(stages.EncodeShards, fn_constructor_kwargs=encode, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
                        num_gpus=cfg.num_gpus, num_cpus=cfg.cpus_per_actor, **env)
    return ds.map_batches(**light(stages.WriteShards, actors, write))


def _commit(output: str, new: dict, replacing: manifest.Committed | None, written_now: list[str]) -> None:
    """Commit `new` over what this run started from. The loser of a race takes away the files it
    wrote; the winner of a new run deletes the generation before the one it replaces."""
    old = replacing.manifest if replacing else None
    if old:
        new["previous"] = sorted({s["path"] for s in old["shards"]} - {s["path"] for s in new["shards"]})
    try:
        manifest.commit(output, new, replacing)
    except RunFailed:  # another job committed first: what this attempt wrote is nobody's
        manifest.remove_shards(output, written_now)
        raise
    manifest.retire(output, old, new)


def _collect(ds, records: dict, id_hashes: dict, progress: "_Progress") -> int:
    """Run the pipeline, filling `records` and `id_hashes` as shards are written; returns the documents
    embedded. A failure ends in one line; the shards written so far stay for the rerun."""
    written = 0
    failed = None
    try:
        for row in ds.iter_rows():
            records[row["name"]] = json.loads(row["record"])
            id_hashes[row["name"]] = np.frombuffer(row["id_hashes"], dtype=np.int64)
            written += row["rows"]
            progress.update(row, written)
    except Exception as e:  # noqa: BLE001 - a worker's bad-input error arrives wrapped by Ray
        failed = worker_error(e, "embedding stopped",
                              "the shards written so far are kept: rerun the same command to write the rest")
    if failed:
        # Raised here, not in the except block: chained to Ray's exception, it would keep the
        # pipeline's frames, and with them its encoder actors (a CPU or GPU each), alive for as
        # long as the caller holds the error: a notebook, or a test session's shared Ray.
        del ds
        gc.collect()  # Ray's own frames hold the exception in cycles
        raise failed
    return written


def _refuse_duplicate_ids(shards: list[corpus.Shard], id_hashes: dict[str, np.ndarray]) -> None:
    """One id in two places (two files, or two shards of one) makes a search hit ambiguous: refuse
    to commit, naming the id and both files. Each shard refused its own duplicates already."""
    from raykit.data import text_id

    names = [s.name for s in shards]
    every = np.concatenate([id_hashes[n] for n in names]) if names else np.empty(0, np.int64)
    values, counts = np.unique(every, return_counts=True)
    if not (counts > 1).any():
        return
    twice = values[counts > 1][0]
    found = []
    for shard in shards:
        if twice in id_hashes[shard.name]:
            ids, _ = corpus.read(shard)
            found.append((shard, next(i for i, h in zip(ids, text_id(ids)) if h == twice)))
            if len(found) == 2:
                break
    (first, doc_id), (second, _) = found
    where = f"{first.path} and {second.path}" if first.path != second.path else f"{first.path} twice"
    raise RaykitError(f"corpus: document id '{doc_id}' is in {where}; ids must be unique across the corpus "
                      "(nothing was committed)")


def _record_matches(record: dict, shards: list[corpus.Shard], identity: dict) -> bool:
    by_name = {s.name: s for s in shards}
    shard = by_name.get(record.get("name"))
    return (
        shard is not None
        and record.get("source") == shard.source()
        and all(record.get(k) == identity[k] for k in ("model", "dim", "dtype", "precision"))
    )


def _manifest(job, source, shards, records, identity, settings, started, seconds) -> dict:
    ordered = [records[s.name] for s in shards]
    return {
        "format": manifest.FORMAT,
        "raykit_version": __version__,
        "model": {"name": job.model, "fingerprint": identity["model"], **settings},
        "embedding": {"dim": identity["dim"], "dtype": identity["dtype"], "normalized": settings["normalize"],
                      "precision": identity["precision"], "ran_in": sorted({r["ran_in"] for r in ordered}),
                      "id_column": "id", "column": "embedding"},
        "corpus": {"source": source, "fingerprint": _corpus_fingerprint(ordered), "plan": identity["plan"],
                   "files": len({s.path for s in shards}), "shard_mb": job.embed.shard_mb},
        "rows": sum(r["rows"] for r in ordered),
        "shards": [{k: r[k] for k in ("path", "rows", "bytes", "sha256")} for r in ordered],
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
    }


def _corpus_fingerprint(records: list[dict]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(bytes.fromhex(r["content"]))
    return "sha256:" + h.hexdigest()


def _identity(committed: dict) -> dict:
    return {
        "model": committed["model"]["fingerprint"],
        "plan": committed["corpus"]["plan"],
        "dim": committed["embedding"]["dim"],
        "dtype": committed["embedding"]["dtype"],
        "precision": committed["embedding"]["precision"],
    }


def _mismatch(output: str, committed: dict | None, identity: dict) -> str:
    if committed is None:
        return f"{storage.join(output, manifest.MANIFEST)}: not valid JSON (damaged); pass new_run=true to embed into it again"
    old = _identity(committed)
    what = []
    if old["model"] != identity["model"]:
        what.append(f"model {manifest.short(old['model'])} ({committed['model']['name']}), this job's is {manifest.short(identity['model'])}")
    if old["plan"] != identity["plan"]:
        what.append("another corpus (or the same files changed, or another embed.shard_mb)")
    keys = ("dim", "dtype", "precision")
    if any(old[k] != identity[k] for k in keys):
        what.append(f"embed {' '.join(str(old[k]) for k in keys)}, this job asks {' '.join(str(identity[k]) for k in keys)}")
    return (f"{storage.join(output, manifest.MANIFEST)}: already committed with {'; '.join(what)}. "
            "Write to another output, or pass new_run=true to replace it")


class _Progress:
    """One line every PROGRESS_EVERY_S seconds and at the end: shards, docs, docs/s, ETA (by input bytes)."""

    def __init__(self, todo: list[corpus.Shard], started: float):
        self.size = {s.name: s.end - s.start for s in todo}  # jsonl: bytes; parquet: row groups
        self.total = sum(self.size.values()) or 1
        self.done: set[str] = set()
        self.started, self.last = started, 0.0
        self.work: dict[str, dict] = {}  # per encoder actor: docs, seconds busy, FLOPs, peak

    def actors(self) -> list[dict]:
        """Each encoder actor's docs/s while it was busy and its MFU (None: its device's peak is unknown),
        logged a line each."""
        out = [{"actor": actor, "docs": w["docs"], "busy_s": round(w["busy_s"], 6),
                "docs_per_s": round(w["docs"] / max(w["busy_s"], 1e-9), 1),
                "mfu": mfu(w["flops"], w["busy_s"], w["peak"] or None)} for actor, w in sorted(self.work.items())]
        for a in out:
            used = f" | MFU {100 * a['mfu']:.1f}%" if a["mfu"] is not None else ""
            log.info(f"encoder {a['actor']}: {a['docs']:,} docs in {a['busy_s']:.1f} s busy | {a['docs_per_s']:.1f} docs/s{used}")
        return out

    def update(self, row: dict, written: int) -> None:
        """A shard written (its row from the pipeline); `written`: documents so far."""
        name = row["name"]
        work = self.work.setdefault(str(row["actor"]), {"docs": 0, "busy_s": 0.0, "flops": 0.0, "peak": float(row["peak"])})
        work["docs"] += int(row["rows"])
        work["busy_s"] += float(row["busy_s"])
        work["flops"] += float(row["flops"])
        self.done.add(name)
        now = time.time()
        finished = len(self.done) == len(self.size)
        if not finished and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        fraction = sum(self.size[n] for n in self.done) / self.total
        eta = elapsed * (1 - fraction) / fraction
        log.info(f"embed {len(self.done)}/{len(self.size)} shards | {written:,} docs | "
                 f"{written / elapsed:.1f} docs/s | ETA {format_duration(eta)}")

