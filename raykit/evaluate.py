"""Retrieval quality: nDCG@10, Recall@100 and MRR@10 on a BEIR split, at every embedding size asked.

Definitions follow BEIR/pytrec_eval (linear gain for nDCG, relevance > 0 counts as relevant), so the
figures compare with published MTEB numbers. Under Ray Train every worker encodes a slice of the
corpus and the per-slice top-k lists are merged, so evaluation scales with the workers.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raykit.data import Beir

K_MAX = 100  # deepest cut-off any metric reads


def evaluate(encoder, beir: Beir, dims=(), batch_size: int = 64, device=None, module=None) -> dict[int, dict[str, float]]:
    """{dim: {"ndcg@10", "recall@100", "mrr@10"}} for each dim (default: the encoder's full size).

    Collective when torch.distributed is initialized: every rank must call it.
    """
    dims = tuple(dims) or (encoder.dim,)
    if dims[-1] > encoder.dim:
        raise ValueError(f"eval.dims: {dims[-1]} is larger than the model's {encoder.dim} dimensions")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    doc_ids = list(beir.corpus)
    query_ids = list(beir.queries)
    per = math.ceil(len(doc_ids) / world)
    mine = doc_ids[rank * per:(rank + 1) * per]
    # Pad every slice to the same length: under ZeRO-3 each forward is a collective, so all ranks
    # must run the same number of batches.
    texts = [beir.corpus[d] for d in mine] + [""] * (per - len(mine))
    was_training = encoder.training
    encoder.eval()
    docs = encoder.encode(texts, batch_size, device, module, role="document")[: len(mine)]  # (n_mine, H)
    queries = encoder.encode([beir.queries[q] for q in query_ids], batch_size, device, module, role="query")  # (Q, H)
    encoder.train(was_training)

    results = {}
    for dim in dims:
        q, d = _truncate(queries, dim, encoder.dim), _truncate(docs, dim, encoder.dim)
        k = min(K_MAX, len(mine))
        scores, idx = (q @ d.T).topk(k, dim=1) if k else (torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long))
        idx = idx + rank * per  # global doc index
        if world > 1:
            scores, idx = _merge_topk(scores, idx, world, device)
        ranked = {qid: [doc_ids[j] for j in idx[i].tolist() if j >= 0] for i, qid in enumerate(query_ids)}
        results[dim] = score_rankings(ranked, beir.qrels)
    return results


def score_rankings(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Mean nDCG@10, Recall@100 and MRR@10 over the judged queries."""
    ndcg = recall = mrr = 0.0
    for qid, judged in qrels.items():
        ranking = ranked.get(qid, [])
        gains = [judged.get(d, 0) for d in ranking]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]) if g > 0)
        ideal = sorted((r for r in judged.values() if r > 0), reverse=True)[:10]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        ndcg += dcg / idcg if idcg else 0.0
        relevant = {d for d, r in judged.items() if r > 0}
        recall += len(relevant & set(ranking[:100])) / len(relevant) if relevant else 0.0
        mrr += next((1.0 / (i + 1) for i, g in enumerate(gains[:10]) if g > 0), 0.0)
    n = len(qrels)
    return {"ndcg@10": ndcg / n, "recall@100": recall / n, "mrr@10": mrr / n}


def format_table(before: dict | None, after: dict) -> str:
    """The before/after table printed at the end of a run."""
    lines = [f"{'dim':>5}  {'metric':<11}{'before':>9}{'after':>9}{'change':>9}"]
    for dim, metrics in after.items():
        for name, value in metrics.items():
            old = before.get(dim, {}).get(name) if before else None
            prev = f"{old:9.4f}" if old is not None else f"{'-':>9}"
            delta = f"{value - old:+9.4f}" if old is not None else f"{'':>9}"
            lines.append(f"{dim:>5}  {name:<11}{prev}{value:9.4f}{delta}")
    return "\n".join(lines)


def _truncate(emb: torch.Tensor, dim: int, full: int) -> torch.Tensor:
    # A Matryoshka prefix is re-normalized so that dot product stays cosine.
    return emb if dim == full else F.normalize(emb[:, :dim], dim=-1)


def _merge_topk(scores: torch.Tensor, idx: torch.Tensor, world: int, device):
    k = K_MAX
    pad = k - scores.shape[1]
    if pad > 0:  # a short last slice: pad so every rank gathers the same shape
        scores = torch.cat([scores, torch.full((len(scores), pad), -math.inf)], dim=1)
        idx = torch.cat([idx, torch.full((len(idx), pad), -1, dtype=idx.dtype)], dim=1)
    # NCCL gathers only device tensors; gloo takes CPU ones.
    on = device if dist.get_backend() == "nccl" else "cpu"
    scores, idx = scores.to(on), idx.to(on)
    all_scores = [torch.empty_like(scores) for _ in range(world)]
    all_idx = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(all_scores, scores.contiguous())
    dist.all_gather(all_idx, idx.contiguous())
    scores, idx = torch.cat(all_scores, 1), torch.cat(all_idx, 1)  # (Q, world*k)
    top, pos = scores.cpu().topk(k, dim=1)
    idx = idx.cpu().gather(1, pos)
    return top, idx.masked_fill(top == -math.inf, -1)
