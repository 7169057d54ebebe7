"""The order training reads its pairs in: a pure function of the seed, the epoch and the worker's rank.

Each epoch is one seeded permutation of the table's rows; worker `rank` of `world` takes every
`world`-th row of it, in batches, and drops the remainder (every rank takes the same number of steps,
or the collectives hang). A step's batch is known without reading the ones before it, so a resumed
run (after a lost worker, a killed driver or a rerun) continues at the step its checkpoint holds:
no batch skipped, none seen twice. Ray Data's streaming split makes no such promise (which rows reach
which worker, in which order, depends on timing), so training reads the table directly: one copy in
Ray's object store, shared by the workers of a node.

`BatchDigest` is the proof a run leaves: a running sha256 of the (query id, positive id) pairs each
rank trained on, in order, kept in checkpoints and written to run.json. Two runs that saw the same
batches in the same order have the same digests, however often either was interrupted.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa


def epoch_batches(num_rows: int, world: int, rank: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """Row indices of this rank's batches in one epoch: shape (steps_per_epoch, batch_size)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    steps = num_rows // world // batch_size
    return order[rank::world][: steps * batch_size].reshape(steps, batch_size)


def take(table: pa.Table, rows: np.ndarray) -> dict[str, np.ndarray]:
    """One batch as columns of numpy arrays (texts as object arrays)."""
    batch = table.take(pa.array(rows))
    return {name: column.to_numpy(zero_copy_only=False) for name, column in zip(batch.column_names, batch.columns)}


class BatchDigest:
    def __init__(self, hexdigest: str = ""):
        self.value = hexdigest

    def update(self, batch: dict[str, np.ndarray]) -> None:
        ids = np.stack([batch["query_id"], batch["positive_id"]], axis=1).astype("<i8")
        self.value = hashlib.sha256(self.value.encode() + ids.tobytes()).hexdigest()

