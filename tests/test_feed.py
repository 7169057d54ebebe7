"""raykit/train/feed.py: the training input read and tokenized ahead, on threads or by tokenizer
actors (a Ray Data stage on the session's Ray), in the loop's order."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from raykit.config import ModelConfig
from raykit.data import TrainingSet
from raykit.encoder import Encoder
from raykit.train.batches import Plan, take
from raykit.train.feed import AHEAD, Ahead, Stream, feed_threads, prepare, read_ahead

TEXTS = [f"query {i} " + "word " * (i % 7) for i in range(40)]


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return Encoder.load(ModelConfig(name=tiny_model, max_seq_length=16))


def table(n: int = 40) -> pa.Table:
    return pa.table({"query_id": np.arange(n), "positive_id": np.arange(n) + 1000, "query": TEXTS[:n],
                     "positive": [t.upper() for t in TEXTS[:n]], "negative_0": TEXTS[::-1][:n], "negative_id_0": np.arange(n) + 2000})


def same(a, b) -> None:
    assert a.batch["query_id"].tolist() == b.batch["query_id"].tolist()
    assert a.orders == b.orders and torch.equal(a.lengths, b.lengths)
    assert a.targets.keys() == b.targets.keys() and all(torch.equal(a.targets[k], b.targets[k]) for k in a.targets)
    for chunks_a, chunks_b in zip(a.groups, b.groups, strict=True):
        for ta, tb in zip(chunks_a, chunks_b, strict=True):
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("chunk,threads", [(0, 1), (3, 1), (3, 3)])
def test_batches_read_ahead_are_the_ones_read_in_line_in_the_same_order(encoder, chunk, threads):
    """Plain and gradient-cached (chunks of 3, longest first), on one thread and on three at once (a
    GPU worker's); while the threads read ahead, the loop's thread tokenizes too (evaluation does),
    with the encoder's own tokenizer. The tokenizer's backend alone (raykit/tokens.py) prepares what
    transformers' call does."""
    tokenizing = encoder.tokenizing()
    assert tokenizing.backend is not None
    steps = [np.array([4 * s + j for j in range(4)]) for s in range(10)]
    with Ahead(tokenizing, table(), steps, chunk, "cpu", threads) as ahead:
        read = []
        for prepared in ahead:
            encoder.tokenize(TEXTS, role="query")
            read.append(prepared)
    assert len(read) == len(steps)
    for rows, prepared in zip(steps, read):
        same(prepared, prepare(tokenizing, take(table(), rows), chunk, "cpu"))
        same(prepared, prepare(dataclasses.replace(tokenizing, backend=None), take(table(), rows), chunk, "cpu"))
    assert len(read[0].groups) == 3 and len(read[0].groups[0]) == (2 if chunk else 1)
    # what the loss reads of the rows comes prepared with the tokens (raykit/train/loop.py builds nothing from the rows)
    first = read[0]
    assert first.targets["query_id"].tolist() == first.batch["query_id"].tolist()
    assert first.targets["negative_ids"].tolist() == [[i] for i in first.batch["negative_id_0"].tolist()]
    for i, order in enumerate(first.orders or ()):  # each pass's embeddings back in the batch's order
        assert [order[j] for j in first.targets[f"inverse_{i}"].tolist()] == list(range(len(order)))
    assert ("inverse_0" in first.targets) == bool(chunk)


def test_leaving_early_stops_the_thread_and_an_error_reaches_the_loop(encoder):
    """The run's last step (or an error in the loop) ends the read-ahead thread, which never ran more
    than AHEAD batches ahead; an error while reading ahead is raised in the loop."""
    made = []

    def steps():
        for s in range(100):
            made.append(s)
            yield np.array([s % 40])

    with Ahead(encoder.tokenizing(), table(), steps(), 0, "cpu") as ahead:
        first = next(iter(ahead))
    assert first.batch["query_id"].tolist() == [0]
    assert len(made) <= 1 + AHEAD + 1  # the one taken, AHEAD queued, one waiting for room
    assert not [t for t in threading.enumerate() if t.name.startswith("raykit-feed")]

    with pytest.raises(IndexError), Ahead(encoder.tokenizing(), table(), [np.array([0]), np.array([99])], 0, "cpu") as ahead:
        assert [p.batch["query_id"].tolist() for p in ahead] == [[0]]


def test_a_gpu_worker_reads_ahead_on_all_its_cores_but_one_and_a_cpu_worker_on_one():
    assert [feed_threads(cpus, "cuda") for cpus in (1, 2, 8)] == [1, 1, 7]
    assert [feed_threads(cpus, "cpu") for cpus in (1, 8)] == [1, 1]


def test_tokenizer_actors_stream_a_resumed_runs_steps_as_the_threads_read_them(ray_cluster, encoder):
    """scaling.feed_actors: two actors of a Ray Data stage prepare the steps of rank 1 of 2 from step
    3 (a resumed run's), across an epoch's end, length-grouped and in chunks of 3, from the table the
    workers share: the same batches, tokens and chunk orders, in the same order, as the worker's own
    threads (and so as a run never interrupted). Leaving early stops the stage and its actors."""
    from ray.util.state import list_actors

    placed = TrainingSet([table()], 40, 1, False, seed=0, max_examples=0).placed()
    shared = placed.table()
    plan = Plan(shared, 2, 1, 4, 7, True)  # 5 steps an epoch
    steps = range(3, 40)

    def tokenizers() -> list:
        return [a for a in list_actors(address=ray_cluster, filters=[("state", "=", "ALIVE")]) if "TokenizeSteps" in a.class_name]

    with read_ahead(encoder, placed, shared, plan, steps, 3, "cpu", cpus=1, actors=2) as stream:
        assert isinstance(stream, Stream)
        streamed = [prepared for prepared, _ in zip(stream, range(8))]
        assert len(tokenizers()) == 2
    with read_ahead(encoder, placed, shared, plan, steps[:8], 3, "cpu", cpus=1, actors=0) as ahead:
        assert isinstance(ahead, Ahead)
        threaded = list(ahead)
    assert len(streamed) == len(threaded) == 8
    for a, b, step in zip(streamed, threaded, steps):
        assert a.batch["query_id"].tolist() == take(shared, plan.rows(step))["query_id"].tolist()
        same(a, b)
    deadline = time.monotonic() + 30
    while tokenizers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not tokenizers()
