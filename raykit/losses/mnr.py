"""Multiple-negatives ranking loss (in-batch negatives, InfoNCE), gathered across workers.

Inputs: pairs (query, positive), optionally k hard negatives per query. Each query is scored against
every positive and negative in the *global* batch (all workers); cross-entropy pushes its own
positive to the top. `scale` = 1/temperature (20 means 0.05), as in sentence-transformers'
MultipleNegativesRankingLoss, which this equals on one process.

Ids (int64 hashes of query and document ids) keep a candidate that is really the query's own
positive (the same document twice in a batch, or a second positive of the same query) from being
counted as a negative.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def mnr_loss(
    queries: torch.Tensor,  # (B, D)
    positives: torch.Tensor,  # (B, D)
    query_ids: torch.Tensor,  # (B,) int64
    positive_ids: torch.Tensor,  # (B,) int64
    scale: float = 20.0,
    negatives: torch.Tensor | None = None,  # (B, D) or (B, k, D): hard negatives per query
    negative_ids: torch.Tensor | None = None,  # (B,) or (B, k)
    gather: bool = True,
) -> torch.Tensor:
    """Mean loss over this worker's queries; with DDP/ZeRO gradient averaging this is the global mean."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if gather and dist.is_initialized() else (0, 1)
    batch = queries.shape[0]
    cands, cand_ids, owner_qids = positives, positive_ids, query_ids
    if world > 1:
        # all_gather from torch.distributed.nn keeps the autograd graph: its backward sums every
        # worker's gradient for our candidates and returns it here, so grads flow to their owners.
        cands = torch.cat(dist_fn.all_gather(positives), 0)  # (world*B, D)
        cand_ids = _gather_ids(positive_ids, world)
        owner_qids = _gather_ids(query_ids, world)
    labels = torch.arange(batch, device=queries.device) + rank * batch  # own positive's column
    # A doc candidate is a false negative for query i when it is i's document or belongs to i's query.
    false_neg = (cand_ids[None, :] == positive_ids[:, None]) | (owner_qids[None, :] == query_ids[:, None])  # (B, world*B)
    if negatives is not None:
        negatives, negative_ids = negatives.reshape(-1, negatives.shape[-1]), negative_ids.reshape(-1)  # (B*k, D)
        negs = torch.cat(dist_fn.all_gather(negatives), 0) if world > 1 else negatives  # (world*B*k, D)
        neg_ids = _gather_ids(negative_ids, world) if world > 1 else negative_ids
        cands = torch.cat([cands, negs], 0)  # (world*B*(1+k), D)
        false_neg = torch.cat([false_neg, neg_ids[None, :] == positive_ids[:, None]], 1)
    false_neg[torch.arange(batch, device=queries.device), labels] = False  # an index made on the host would be copied, waiting for the GPU
    scores = scale * queries.float() @ cands.float().T  # (B, world*B*(1+k))
    scores = scores.masked_fill(false_neg, float("-inf"))
    return F.cross_entropy(scores, labels)


def _gather_ids(ids: torch.Tensor, world: int) -> torch.Tensor:
    out = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(out, ids.contiguous())
    return torch.cat(out)
