"""Matryoshka representation learning: a loss summed over embedding prefixes.

Each prefix (the first d dims, re-normalized) is scored by the same base loss, so the first 64 dims
are trained to be an embedding on their own, as are the first 128, and so on up to the full size;
one model then serves every size. It wraps any loss on embeddings and never changes the model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def matryoshka_loss(
    base: Callable[..., torch.Tensor],
    embeddings: Sequence[torch.Tensor | None],
    dims: Sequence[int],
    weights: Sequence[float] = (),
) -> torch.Tensor:
    """sum_i weights[i] * base(*[prefix(e, dims[i]) for e in embeddings]).

    `embeddings` are the base loss's embedding arguments (queries, positives, negatives...; None
    passes through); the last axis is the embedding. Weights default to 1 for every dim.
    """
    weights = list(weights) or [1.0] * len(dims)
    full = next(e for e in embeddings if e is not None).shape[-1]
    total = 0.0
    for dim, weight in zip(dims, weights):
        prefixed = [e if e is None or dim == full else F.normalize(e[..., :dim], dim=-1) for e in embeddings]
        total = total + weight * base(*prefixed)
    return total
