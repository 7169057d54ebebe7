"""The order training reads its pairs in: a pure function of the seed, the epoch and the worker's rank.

Each epoch is one seeded permutation of the table's rows; worker `rank` of `world` takes every
`world`-th row of it, in batches, and drops the remainder (every rank takes the same number of steps,
or the collectives hang). A step's batch is known without reading the ones before it, so a resumed
run (after a lost worker, a killed driver or a rerun) continues at the step its checkpoint holds:
no batch skipped, none seen twice. Ray Data's streaming split makes no such promise (which rows reach
which worker, in which order, depends on timing), so training reads the table directly: one copy in
Ray's object store, shared by the workers of a node.

With train.group_by_length, each window of GROUP_WINDOW batches of that permutation is sorted by the
rows' text length before it is cut into batches, and the epoch's batches are shuffled again (seeded):
each batch pads to texts of about one length, and the order stays a pure function of the same inputs.

`BatchDigest` is the proof a run leaves: a running sha256 of the (query id, positive id) pairs each
rank trained on, in order, kept in checkpoints and written to run.json. Two runs that saw the same
batches in the same order have the same digests, however often either was interrupted.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raykit.data import Pairs

GROUP_WINDOW = 64  # batches per length-sorted window: long enough to group, short enough to stay random


def steps_per_epoch(num_rows: int, world: int, batch_size: int) -> int:
    """Every rank's steps in an epoch: its share of the rows in whole batches (the remainder dropped)."""
    return num_rows // world // batch_size


def epoch_batches(num_rows: int, world: int, rank: int, batch_size: int, seed: int, epoch: int,
                  lengths: np.ndarray | None = None) -> np.ndarray:
    """Row indices of this rank's batches in one epoch: shape (steps_per_epoch, batch_size).
    `lengths` (row_lengths): group each batch's rows by length."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_rows)
    steps = steps_per_epoch(num_rows, world, batch_size)
    mine = order[rank::world][: steps * batch_size]
    if lengths is None:
        return mine.reshape(steps, batch_size)
    window = GROUP_WINDOW * batch_size
    grouped = np.concatenate([w[np.argsort(lengths[w], kind="stable")] for w in np.split(mine, range(window, len(mine), window))])
    return grouped.reshape(steps, batch_size)[rng.permutation(steps)]


class Plan:
    """A rank's rows for any step of a run: epoch_batches of the step's epoch, the epoch's batches
    computed once. The tokenizer actors that read ahead for a worker (raykit/train/feed.py) build
    the same plan from the same table and `args`."""

    def __init__(self, table: pa.Table | Pairs, world: int, rank: int, batch_size: int, seed: int, group_by_length: bool):
        self.args = world, rank, batch_size, seed, group_by_length  # the same plan elsewhere: Plan(table, *args)
        self.num_rows, self.world, self.rank, self.batch_size, self.seed = table.num_rows, world, rank, batch_size, seed
        self.lengths = row_lengths(table) if group_by_length else None
        self.steps_per_epoch = steps_per_epoch(self.num_rows, world, batch_size)
        self._epoch: tuple[int, np.ndarray] | None = None

    def rows(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = epoch, epoch_batches(self.num_rows, self.world, self.rank, self.batch_size, self.seed, epoch, self.lengths)
        return self._epoch[1][i]


def row_lengths(table: pa.Table | Pairs) -> np.ndarray:
    """Each row's length for grouping: the characters of its query, positive and negatives."""
    if isinstance(table, Pairs):  # counted on the blocks as stored, then put in the pairs' order
        return row_lengths(table.base)[table.order]
    texts = [name for name in table.column_names if name in ("query", "positive") or
             (name.startswith("negative_") and name[len("negative_"):].isdigit())]
    return np.sum([pc.utf8_length(table[name]).to_numpy(zero_copy_only=False) for name in texts], axis=0)


def take(table: pa.Table | Pairs, rows: np.ndarray) -> dict[str, np.ndarray]:
    """One batch as columns of numpy arrays (texts as object arrays)."""
    batch = table.take(pa.array(rows))
    return {name: column.to_numpy(zero_copy_only=False) for name, column in zip(batch.column_names, batch.columns)}


class BatchDigest:
    def __init__(self, hexdigest: str = ""):
        self.value = hexdigest

    def update(self, batch: dict[str, np.ndarray]) -> None:
        ids = np.stack([batch["query_id"], batch["positive_id"]], axis=1).astype("<i8")
        self.value = hashlib.sha256(self.value.encode() + ids.tobytes()).hexdigest()

