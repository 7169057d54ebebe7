"""Gradient caching (GradCache; Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"): a contrastive batch larger than activation memory allows, with the loss and
gradients of the whole batch at once.

1. Embed the batch a chunk at a time without autograd graphs, keeping only the embeddings (and each
   chunk's random state, so that dropout repeats).
2. Compute the loss on all the embeddings (gathered across workers, as without caching) and take its
   gradient with respect to the embeddings alone.
3. Run each chunk again, with its graph, and back-propagate the cached embedding gradients into the
   model; gradients accumulate across chunks and are reduced across workers once, with the last.

Memory holds one chunk's activations; the cost is one more forward pass per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def cached_backward(trainee, groups: list[list[dict]], loss_on: Callable[..., torch.Tensor],
                    extra: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Back-propagate `loss_on(*embeddings)` (+ `extra()`, a term on the weights) into the trainee's
    model, chunk by chunk. `groups` holds one list of tokenized chunks per input of the loss (queries,
    documents, ...); a group's embeddings are its chunks' in order. Returns the loss's value."""
    device = next(iter(groups[0][0].values())).device
    states, embeddings = [], []
    with torch.no_grad():
        for chunks in groups:
            parts = []
            for tokens in chunks:
                states.append(_rng_state(device))
                parts.append(trainee(tokens))
            embeddings.append(torch.cat(parts).detach().requires_grad_())
    loss = loss_on(*embeddings)
    loss.backward()  # into the embeddings only: the model is not in this graph

    work = [(tokens, grad) for chunks, e in zip(groups, embeddings)
            for tokens, grad in zip(chunks, e.grad.split([len(next(iter(t.values()))) for t in chunks]))]
    value = loss.detach()
    for i, ((tokens, grad), state) in enumerate(zip(work, states)):
        last = i == len(work) - 1
        with contextlib.nullcontext() if last else trainee.accumulating():
            with _restored(state, device):
                out = trainee(tokens)
            surrogate = torch.dot(out.float().flatten(), grad.float().flatten())  # d surrogate/d out = grad
            if last and extra is not None:
                term = extra()
                value = value + term.detach()
                surrogate = surrogate + term
            trainee.backward(surrogate)
    return value


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _restored(state: tuple, device: torch.device):
    """Run with a chunk's random state of the first pass (dropout masks repeat), leaving the
    generator where it was after."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
