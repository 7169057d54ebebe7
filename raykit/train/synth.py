"""Cold start: (query, positive) pairs made from a corpus alone, for a team with no labelled queries yet.

`raykit synth JOB.yaml` (or `synth.enabled: true` before training):
1. read the corpus in shards (`raykit embed`'s plan; a BEIR folder gives its corpus.jsonl only, never
   its queries or qrels) and, with `synth.max_docs`, keep a seeded sample of exactly that many;
2. make queries on Ray Data, one batch of documents per call (the writers: raykit/train/queries.py):
   - model-free (no `synth.generator`): the document's title, then sentences of its text, are its
     queries and the document without them the positive (title-body pairs, as E5 pre-trains; the
     inverse cloze task of Lee et al. 2019);
   - a Hugging Face causal or seq2seq LM in an actor pool on GPUs or CPUs (`synth.generator`), or
     an OpenAI-compatible server such as vLLM (`synth.endpoint`), `queries_per_doc` per document;
3. de-duplicate: a query made for two documents tells neither apart, so both go;
4. the round trip: embed the corpus with model.name (through `raykit embed`'s pipeline, resumable),
   and keep a pair only when its document ranks in the top `filter_top_k` of the whole corpus for
   its query (Promptagator's consistency filter, with the retriever about to be fine-tuned);
5. write the pairs (query, positive, positive_id) in one put; a rerun with the same settings reuses them.
The pairs are gathered on the driver, as mining's triplets are: sample a corpus of many millions.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from raykit import identity, pairs, storage
from raykit.cluster import (
    actor_count,
    connect_ray,
    quiet_ray_data,
    raised_by_raykit,
    require_shared_storage,
    worker_error,
)
from raykit.config import EmbedJob, JobConfig
from raykit.embed import corpus, pipeline, search
from raykit.encoder import Encoder, check_length, model_config
from raykit.errors import RaykitError
from raykit.log import format_duration
from raykit.train import queries

log = logging.getLogger(__name__)

def pairs_path(job: JobConfig) -> str:
    return job.synth.output or storage.join(storage.resolve(job.output_dir), "synth", "pairs.jsonl")


def check(job: JobConfig) -> None:
    """What can be checked before anything is written: the corpus, the generator, the filter's model."""
    cfg = job.synth
    if cfg.enabled and job.data.train:
        raise RaykitError(f"data.train: {job.data.train} and synth.enabled: the synthetic pairs are the training data; "
                          "set data.train= (empty), or synth.enabled=false to train on data.train")
    if not cfg.corpus:
        raise RaykitError("synth.corpus: not set; point it at the documents to make queries for, e.g. synth.corpus=../shared/data/scifact")
    if not storage.exists(storage.resolve(cfg.corpus)):
        raise RaykitError(f"synth.corpus: {cfg.corpus}: no such file or folder; point it at a BEIR folder or .jsonl/.parquet documents")
    corpus.input_files(storage.resolve(cfg.corpus))  # raises naming the file when it is not a corpus
    if cfg.generator and not cfg.endpoint:
        config = model_config(cfg.generator, "synth.generator")
        generates = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")  # the heads generate() runs on
        if not (config.is_encoder_decoder or any(a.endswith(generates) for a in config.architectures or [])):
            raise RaykitError(f"synth.generator: {cfg.generator} is neither a causal nor a seq2seq LM "
                              f"({', '.join(config.architectures or ['no architecture'])}); use e.g. a doc2query T5 or an instruct LLM")
    if cfg.filter_top_k:
        config = model_config(job.model.name, "model.name", revision=job.model.revision, trust_remote_code=job.model.trust_remote_code)
        check_length(config, job.model.max_seq_length, job.model.name, "model.max_seq_length")


def run(job: JobConfig) -> str:
    """Make pairs from job.synth.corpus; returns the pairs file (reused if already written)."""
    cfg = job.synth
    out = pairs_path(job)
    key = "synth.output" if cfg.output else "output_dir"
    storage.check_output(key, out, folder=False)
    require_shared_storage(key, out)
    if not cfg.corpus:
        check(job)  # names the missing key
    source = storage.resolve(cfg.corpus)
    filtered_by = {"model": job.model.name, "revision": job.model.revision, "max_seq_length": job.model.max_seq_length,
                   "prompts": job.to_dict()["model"]["prompts"]} if cfg.filter_top_k else {}
    settings = identity.of({"synth": {**job.to_dict()["synth"], "corpus": source}, "filter": filtered_by, "seed": job.train.seed},
                           ("synth.output", "synth.enabled", "synth.concurrency", "synth.num_gpus", "synth.batch_size",
                            "synth.embed.concurrency", "synth.embed.cpus_per_actor", "synth.embed.num_gpus"))
    if identity.reusable(out, settings, "pairs", key):
        log.info(f"synth: {out} exists; reusing it (delete it to make pairs again)")
        return out
    check(job)
    started = time.time()
    quiet_ray_data()
    connect_ray(dashboard=False)
    items = [{"shard": json.dumps(s.__dict__)} for s in corpus.plan(source, cfg.embed.shard_mb)]
    total, cutoff = _census(items, cfg.max_docs, job.train.seed)  # reads every document: bad input ends here
    identity.record(out + ".job.json", settings)  # before the pairs: they mark the work complete
    made = _generate(job, source, items, total, cutoff)
    unique = _deduplicate(made)
    kept = _round_trip(job, source, out, unique) if cfg.filter_top_k else unique
    if not kept:
        raise RaykitError(f"synth: no pair survived the round trip (top {cfg.filter_top_k} of the corpus); "
                          "raise synth.filter_top_k, or use a stronger generator")
    stats = {"documents": len({r["positive_id"] for r in made}), "made": len(made), "unique": len(unique), "kept": len(kept),
             "keep_rate": round(len(kept) / max(1, len(unique)), 4) if cfg.filter_top_k else None,
             "seconds": round(time.time() - started, 1)}
    storage.put_text(out + ".stats.json", json.dumps(stats, indent=2))
    pairs.write(out, kept)  # last: the pairs mark the work complete
    filtered = (f"{len(kept)} kept by the round trip ({100 * stats['keep_rate']:.0f}%)" if cfg.filter_top_k
                else "no round trip (synth.filter_top_k=0)")
    log.info(f"synth: {len(kept)} pairs from {stats['documents']} documents -> {out} | made {len(made)}, {len(unique)} "
             f"after de-duplication, {filtered} | {stats['seconds']:.0f} s")
    return out


# --- 1-2. documents to queries, on Ray Data ----------------------------------------------------------


def _generate(job: JobConfig, source: str, items: list[dict], total: int, cutoff: int | None) -> list[dict]:
    import ray.data

    cfg = job.synth
    docs = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _read_docs, fn_kwargs={"cutoff": cutoff, "seed": job.train.seed})
    options = {"queries_per_doc": cfg.queries_per_doc, "seed": job.train.seed}
    if not cfg.generator:
        made = docs.map_batches(queries.model_free, fn_kwargs=options, batch_size=cfg.batch_size * 32)
        what = "model-free (titles and sentences as queries)"
    else:
        maker = queries.Endpoint if cfg.endpoint else queries.Generator
        # the endpoint's key as the submitting shell has it, in the actors' environment: never in a job or a log
        key = {"runtime_env": {"env_vars": {queries.KEY_ENV: os.environ[queries.KEY_ENV]}}} if cfg.endpoint and os.environ.get(queries.KEY_ENV) else {}
        made = docs.map_batches(
            maker, fn_constructor_kwargs={**options, **_generator_kwargs(cfg)}, batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=_generators(cfg)),
            num_gpus=cfg.num_gpus, num_cpus=0 if cfg.num_gpus else 1, **key)
        what = f"{cfg.generator}" + (f" at {cfg.endpoint}" if cfg.endpoint else "")
    log.info(f"synth: queries for {total} documents of {source} by {what}")
    rows, done, last, started = [], 0, 0.0, time.time()
    try:
        for batch in made.iter_batches(batch_size=None, batch_format="pandas"):
            rows += batch.to_dict("records")
            done += batch["positive_id"].nunique()  # a batch holds whole documents (a document without queries is not counted)
            if time.time() - last > 10:
                last, rate = time.time(), done / max(1e-9, time.time() - started)
                log.info(f"synth: {done}/{total} documents | {len(rows)} queries | {rate:.1f} docs/s | "
                         f"ETA {format_duration((total - done) / max(rate, 1e-9))}")
    except Exception as e:  # noqa: BLE001 - a worker's bad-input error arrives wrapped by Ray
        raise worker_error(e, "synth stopped", "rerun the same command") from None
    rows.sort(key=lambda r: (r["positive_id"], r["query"]))  # one order, whichever actor finished first
    return rows


def _generators(cfg) -> int:
    """Generator actors: synth.concurrency, else one per GPU, or on CPUs one per free core but one: a
    pool holding every CPU would leave none to read the documents it waits for. Free, not total: a
    CPU another job holds (or a placement group Ray Train has not yet released) is not the pool's,
    and counting it hung the pipeline with every free CPU in the pool."""
    import ray

    batches = -(-cfg.max_docs // cfg.batch_size) if cfg.max_docs else 1 << 30
    if cfg.concurrency or cfg.num_gpus:
        return actor_count(cfg.concurrency, cfg.num_gpus, 1, batches)
    free = min(ray.cluster_resources().get("CPU", 1), ray.available_resources().get("CPU", 1))
    return max(1, min(int(free) - 1, batches))


def _generator_kwargs(cfg) -> dict:
    return {"model": cfg.generator, "endpoint": cfg.endpoint, "prompt": cfg.prompt, "max_input_tokens": cfg.max_input_tokens,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}


def _census(items: list[dict], max_docs: int, seed: int) -> tuple[int, int | None]:
    """(documents to make queries for, the largest key in the sample) with max_docs: the sample is the
    max_docs documents with the smallest keys; its cutoff None when the corpus has no more. One pass
    over the corpus, counting its documents, and keeping 8 bytes per document for a sample."""
    import ray

    try:
        found = ray.get([ray.remote(num_cpus=1)(_keys).remote(item["shard"], seed, bool(max_docs)) for item in items])
    except Exception as e:  # noqa: BLE001 - a bad document: the task's DataError, wrapped by Ray
        raise raised_by_raykit(e) or e from None
    if not max_docs:
        return sum(found), None
    keys = np.concatenate(found)
    if len(keys) <= max_docs:
        return len(keys), None
    return max_docs, int(np.partition(keys, max_docs - 1)[max_docs - 1])


def _keys(shard: str, seed: int, keys: bool) -> np.ndarray | int:
    ids, _ = corpus.read(corpus.Shard(**json.loads(shard)))
    return np.array([queries.doc_key(seed, i) for i in ids], dtype=np.int64) if keys else len(ids)


def _read_docs(row: dict, cutoff: int | None, seed: int) -> list[dict]:
    """A shard's documents as rows (id, title, text): those in the sample only."""
    ids, titles, texts = corpus.read_parts(corpus.Shard(**json.loads(row["shard"])))
    return [{"id": i, "title": h, "text": t} for i, h, t in zip(ids, titles, texts)
            if cutoff is None or queries.doc_key(seed, i) <= cutoff]


# --- 3-4. de-duplication and the round trip ----------------------------------------------------------


def _deduplicate(rows: list[dict]) -> list[dict]:
    """One row per (query, document); a query made for more than one document is dropped for all."""
    def norm(q: str) -> str:
        return " ".join(q.lower().split()).strip(" .?!")

    docs_of: dict[str, set[str]] = {}
    for r in rows:
        docs_of.setdefault(norm(r["query"]), set()).add(r["positive_id"])
    out, seen = [], set()
    for r in rows:
        key = norm(r["query"])
        if key and len(docs_of[key]) == 1 and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _round_trip(job: JobConfig, source: str, out: str, rows: list[dict]) -> list[dict]:
    """The rows whose document model.name ranks in the top filter_top_k of the corpus for their query."""
    cfg, model = job.synth, job.model
    own = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    store = out.rsplit(".", 1)[0] + ".embeddings"  # a rerun finds it committed and skips it
    committed = pipeline.run(EmbedJob(model=model.name, corpus=source, output=store, max_seq_length=model.max_seq_length,
                                      prompts=model.prompts, embed=cfg.embed, **own))
    encoder = Encoder.from_pretrained(model.name, committed["model"]["max_seq_length"], committed["model"]["prompts"], **own)
    log.info(f"synth: round trip of {len(rows)} queries against {committed['rows']} documents (top {cfg.filter_top_k})")
    kept = []
    for block in range(0, len(rows), search.QUERY_BLOCK):
        chunk = rows[block:block + search.QUERY_BLOCK]
        q_emb = search.encode_texts(encoder, committed, [r["query"] for r in chunk], "query")
        for r, hits in zip(chunk, search.top_k(store, committed, q_emb, cfg.filter_top_k)):
            ranks = [i for i, (doc, _) in enumerate(hits) if doc == r["positive_id"]]
            if ranks:
                kept.append({**r, "round_trip_rank": ranks[0] + 1})
    return kept
