"""Hard-negative mining: documents the retriever ranks high for a query that are not its positives.

`raykit mine JOB.yaml` (or `mine.enabled: true` before training):
1. embed the corpus with the mining model through `raykit embed`'s Ray Data pipeline (into
   <triplets>.embeddings/, resumable and fingerprinted like any embed output);
2. encode the training queries (and their positives, for the margin filter);
3. stream the stored shards once per block of queries keeping a running top-k: memory is
   queries x top_k, never queries x corpus;
4. per (query, positive): drop the query's known positives, skip the first `range_min` candidates
   (the ones most likely to be unlabeled positives), optionally drop candidates scoring within
   `margin` of the positive, and keep `num_negatives` (random with the job's seed, or the top ones);
5. write triplets (query, positive, negatives, ids) as .jsonl or .parquet, local or s3://, in one put.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from raykit import identity, pairs, storage
from raykit.cluster import require_shared_storage
from raykit.config import EmbedJob, JobConfig, Prompts
from raykit.data import is_beir, load_beir
from raykit.embed import pipeline, search
from raykit.encoder import Encoder, check_length, model_config
from raykit.errors import RaykitError

log = logging.getLogger(__name__)

def triplets_path(job: JobConfig) -> str:
    return job.mine.output or storage.join(storage.resolve(job.output_dir), "mined", "triplets.jsonl")


def check(job: JobConfig) -> None:
    """Mining needs a BEIR folder: its qrels say which documents are each query's positives."""
    if not job.data.train or not is_beir(storage.resolve(job.data.train)):
        raise RaykitError(
            f"data.train: {job.data.train or '(not set)'}: mining needs a BEIR folder (corpus, queries, qrels) "
            "to know each query's positives; point data.train at one"
        )


def run(job: JobConfig) -> str:
    """Mine hard negatives for job.data.train; returns the triplets file (reused if already written)."""
    cfg = job.mine
    out = triplets_path(job)
    storage.check_output("mine.output" if job.mine.output else "output_dir", out, folder=False)
    require_shared_storage("mine.output" if job.mine.output else "output_dir", out)
    model = cfg.model or job.model.name
    source = storage.resolve(job.data.train) if job.data.train else ""
    settings = identity.of({"data": {"train": source, "split": job.data.split}, "model": model,
                            "max_seq_length": job.model.max_seq_length, "prompts": job.to_dict()["model"]["prompts"], "seed": job.train.seed,
                            "mine": job.to_dict()["mine"]},
                           ("mine.output", "mine.enabled", "mine.embed.concurrency", "mine.embed.cpus_per_actor", "mine.embed.num_gpus"))
    if identity.reusable(out, settings, "triplets", "mine.output"):
        log.info(f"mine: {out} exists; reusing it (delete it to mine again)")
        return out
    started = time.time()
    check(job)
    # the job's revision and code trust go with its own model; a separate mining model is a folder or pinned id
    own = {} if cfg.model else {"revision": job.model.revision, "trust_remote_code": job.model.trust_remote_code}
    config = model_config(model, "mine.model" if cfg.model else "model.name", **own)
    check_length(config, job.model.max_seq_length, model, "model.max_seq_length")
    beir = load_beir(source, job.data.split)
    identity.record(out + ".job.json", settings)  # before the triplets: they mark the mining complete
    judged = [(q, d) for q, docs in beir.qrels.items() for d, rel in docs.items() if rel > 0]
    positives = {q: {d for d, rel in docs.items() if rel > 0} for q, docs in beir.qrels.items()}
    log.info(f"mine: {len(judged)} pairs, {len(beir.queries)} queries, corpus {source}, model {model}")

    # 1. The corpus, embedded by the Ray Data pipeline (a rerun finds it committed and skips it).
    store = out.rsplit(".", 1)[0] + ".embeddings"
    # the job's prompts go with its own model; a separate mining model uses those its folder stores
    committed = pipeline.run(EmbedJob(model=model, corpus=source, output=store, max_seq_length=job.model.max_seq_length,
                                      prompts=job.model.prompts if not cfg.model else Prompts(), embed=cfg.embed, **own))

    # 2. Queries and positives, in the stored space.
    encoder = Encoder.from_pretrained(model, committed["model"]["max_seq_length"], committed["model"]["prompts"], **own)
    qids = list(beir.queries)
    q_emb = search.encode_texts(encoder, committed, [beir.queries[q] for q in qids], "query")  # (Q, dim)
    q_row = {q: i for i, q in enumerate(qids)}
    pos_ids = sorted({d for _, d in judged})
    p_emb = search.encode_texts(encoder, committed, [beir.corpus[d] for d in pos_ids], "document")
    p_row = {d: i for i, d in enumerate(pos_ids)}

    # 3. Top-k per query, streaming the shards; room for the positives that will be dropped.
    depth = cfg.top_k + max(len(p) for p in positives.values())
    ranked: list[list[tuple[str, float]]] = []
    for block in range(0, len(qids), search.QUERY_BLOCK):
        ranked += search.top_k(store, committed, q_emb[block:block + search.QUERY_BLOCK], depth)

    # 4. Negatives per pair.
    rng = np.random.default_rng(job.train.seed)
    rows, skipped, ranks = [], 0, []
    for q, d in judged:
        pos_score = float(q_emb[q_row[q]] @ p_emb[p_row[d]])
        cands = [(i, s) for i, s in ranked[q_row[q]] if i not in positives[q]][: cfg.top_k]
        cands = [(r, i, s) for r, (i, s) in enumerate(cands) if r >= cfg.range_min]
        if cfg.margin > 0:
            cands = [c for c in cands if c[2] <= pos_score - cfg.margin]
        if len(cands) < cfg.num_negatives:
            skipped += 1
            continue
        pick = range(cfg.num_negatives) if cfg.sampling == "top" else sorted(rng.choice(len(cands), cfg.num_negatives, replace=False))
        chosen = [cands[j] for j in pick]
        ranks += [r for r, _, _ in chosen]
        rows.append({
            "query": beir.queries[q], "positive": beir.corpus[d], "negatives": [beir.corpus[i] for _, i, _ in chosen],
            "query_id": q, "positive_id": d, "negative_ids": [i for _, i, _ in chosen],
            "positive_retriever_score": round(pos_score, 6), "negative_retriever_scores": [round(s, 6) for _, _, s in chosen],
        })
    if not rows:
        raise RaykitError(f"mine: no pair kept {cfg.num_negatives} negatives; lower mine.range_min or mine.margin, or raise mine.top_k")

    # 5. One write: the file exists only once it is whole.
    pairs.write(out, rows)
    log.info(f"mine: {len(rows)} triplets x {cfg.num_negatives} negatives -> {out} | {skipped} pairs skipped "
          f"(too few candidates) | median negative rank {int(np.median(ranks))} | {time.time() - started:.0f} s")
    return out

