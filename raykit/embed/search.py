"""Searching stored embeddings, refusing a model that did not make them.

Queries are encoded with the model given, configured as the manifest says the documents were
(max length), and compared by fingerprint first: a query from another model, another tokenizer or
other pooling meets the documents in a different space and scores would be quietly meaningless.
Shards are read one at a time (each checked against its sha256) and a running top-k is kept, so
memory stays one shard plus the results.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from raykit.data import Beir
from raykit.embed import manifest
from raykit.encoder import Encoder
from raykit.errors import RaykitError
from raykit.evaluate import K_MAX, score_rankings


def load_query_encoder(output: str, model: str, trust_remote_code: bool = False) -> tuple[Encoder, dict]:
    """The model as a query encoder for `output`, or an error naming both fingerprints."""
    committed = manifest.require_manifest(output)
    made_by = committed["model"]
    # the prompts the documents were embedded with, for a model whose folder stores none (a base E5),
    # and the revision they were embedded at when it is the same hub id. Never its code trust: a
    # manifest is data anyone who can write the bucket can write.
    revision = made_by.get("revision", "") if model == made_by["name"] else ""
    encoder = Encoder.from_pretrained(model, made_by["max_seq_length"], made_by.get("prompts"), revision, trust_remote_code)
    mine, theirs = encoder.fingerprint(), committed["model"]["fingerprint"]
    if mine != theirs:
        raise RaykitError(
            f"serving mismatch: {output} was embedded by model {manifest.short(theirs)} ({committed['model']['name']}), "
            f"but --model {model} is {manifest.short(mine)}; search with the model that embedded the corpus, or re-embed it with this one"
        )
    return encoder, committed


QUERY_BLOCK = 4096  # queries scored per pass over the shards (mining, the synth round trip)


def encode_texts(encoder: Encoder, committed: dict, texts: list[str], role: str = "query", batch_size: int = 64) -> np.ndarray:
    """Embeddings in the stored space (queries, or documents as `role`): same prefix length,
    re-normalized like the documents."""
    emb = encoder.encode(texts, batch_size, role=role)
    dim = committed["embedding"]["dim"]
    if dim < emb.shape[1]:
        emb = emb[:, :dim]
        emb = F.normalize(emb, dim=-1) if committed["embedding"]["normalized"] else emb
    return emb.numpy()


def top_k(output: str, committed: dict, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """The k best (id, score) per query over every committed shard, by dot product."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_scores = torch.full((len(q), 0), -float("inf"))
    best_ids: list[list[str]] = [[] for _ in range(len(q))]
    for shard in committed["shards"]:
        ids, emb = manifest.read_shard(output, shard, committed["embedding"]["dim"])
        if not ids:
            continue
        scores = q @ torch.from_numpy(emb.astype(np.float32)).T  # (Q, shard rows)
        s, i = scores.topk(min(k, len(ids)), dim=1)
        merged = torch.cat([best_scores, s], dim=1)
        cand = [best_ids[r] + [ids[j] for j in i[r].tolist()] for r in range(len(q))]
        best_scores, pos = merged.topk(min(k, merged.shape[1]), dim=1)
        best_ids = [[cand[r][j] for j in pos[r].tolist()] for r in range(len(q))]
    return [list(zip(best_ids[r], best_scores[r].tolist())) for r in range(len(q))]


def search(output: str, model: str, queries: list[str], k: int = 10, trust_remote_code: bool = False) -> list[list[tuple[str, float]]]:
    encoder, committed = load_query_encoder(output, model, trust_remote_code)
    return top_k(output, committed, encode_texts(encoder, committed, queries), k)


def evaluate_stored(output: str, model: str, beir: Beir, trust_remote_code: bool = False) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 of a BEIR split against the stored document embeddings."""
    encoder, committed = load_query_encoder(output, model, trust_remote_code)
    stored_rows = committed["rows"]
    if stored_rows != len(beir.corpus):
        raise RaykitError(f"{output} holds {stored_rows:,} documents, the BEIR corpus {len(beir.corpus):,}; embed that corpus first")
    qids = list(beir.queries)
    results = top_k(output, committed, encode_texts(encoder, committed, [beir.queries[q] for q in qids]), K_MAX)
    return score_rankings({q: [d for d, _ in r] for q, r in zip(qids, results)}, beir.qrels)
