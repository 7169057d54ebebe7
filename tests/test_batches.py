"""The order training reads its pairs in (raykit/train/batches.py): what makes a resumed run exact."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raykit.train.batches import BatchDigest, epoch_batches, take


def test_an_epoch_gives_every_row_to_at_most_one_rank_once_and_the_seed_fixes_the_order():
    rows, world, batch = 103, 3, 4
    epoch = [epoch_batches(rows, world, rank, batch, seed=7, epoch=0) for rank in range(world)]
    assert all(b.shape == (rows // world // batch, batch) for b in epoch)  # every rank takes as many steps
    seen = np.concatenate([b.ravel() for b in epoch])
    assert len(set(seen.tolist())) == len(seen) and seen.max() < rows  # no row twice, none invented
    assert np.array_equal(epoch[1], epoch_batches(rows, world, 1, batch, seed=7, epoch=0))  # recomputable
    assert not np.array_equal(epoch[1], epoch_batches(rows, world, 1, batch, seed=7, epoch=1))  # reshuffled
    assert not np.array_equal(epoch[1], epoch_batches(rows, world, 1, batch, seed=8, epoch=0))


def test_the_digest_follows_the_batches_query_and_positive_ids_in_order():
    table = pa.table({"query": ["a", "b", "c"], "query_id": [1, 2, 3], "positive_id": [10, 20, 30]})
    assert take(table, np.array([2, 0]))["query"].tolist() == ["c", "a"]

    def digest(*batches):
        d = BatchDigest()
        for rows in batches:
            d.update(take(table, np.array(rows)))
        return d.value

    assert digest([0, 1], [2]) == digest([0, 1], [2])
    assert digest([0, 1], [2]) != digest([2], [0, 1])  # another order
    assert digest([0, 1], [2]) != digest([0, 1], [1])  # another batch
    resumed = BatchDigest(digest([0, 1]))  # a run resumed from a checkpoint carries the digest on
    resumed.update(take(table, np.array([2])))
    assert resumed.value == digest([0, 1], [2])
