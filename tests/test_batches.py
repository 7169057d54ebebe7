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


def test_length_grouped_batches_keep_the_epochs_rows_and_pad_less():
    """train.group_by_length: each rank trains on the same rows as without it, in batches of similar
    lengths (padding: each batch's longest row times its size, against the rows' own lengths),
    in an order that is again a pure function of the seed and the epoch."""
    from raykit.train.batches import GROUP_WINDOW, row_lengths

    rows, world, batch = 4000, 2, 8
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(1, 400, rows)]
    table = pa.table({"query": ["q"] * rows, "positive": texts, "negative_0": ["n"] * rows, "negative_id_0": list(range(rows))})
    lengths = row_lengths(table)
    assert lengths.tolist()[:3] == [len(t) + 2 for t in texts[:3]]

    def padded(batches):
        return int(sum(lengths[b].max() * len(b) for b in batches))

    for rank in range(world):
        plain = epoch_batches(rows, world, rank, batch, seed=3, epoch=0)
        grouped = epoch_batches(rows, world, rank, batch, seed=3, epoch=0, lengths=lengths)
        assert grouped.shape == plain.shape and sorted(grouped.ravel().tolist()) == sorted(plain.ravel().tolist())
        assert np.array_equal(grouped, epoch_batches(rows, world, rank, batch, seed=3, epoch=0, lengths=lengths))
        assert padded(grouped) < 0.7 * padded(plain)
        # the batches' order is shuffled: not the windows' length order
        first_window = grouped[:GROUP_WINDOW]
        assert not all(lengths[a].max() <= lengths[b].min() for a, b in zip(first_window, first_window[1:]))
    assert not np.array_equal(epoch_batches(rows, world, 0, batch, seed=3, epoch=1, lengths=lengths),
                              epoch_batches(rows, world, 0, batch, seed=3, epoch=0, lengths=lengths))


def test_a_plan_gives_any_steps_rows_as_the_epochs_batches_do_and_rebuilds_from_its_args():
    """A resumed run (and a tokenizer actor) asks for steps from the middle on, across epochs."""
    from raykit.train.batches import Plan, row_lengths

    table = pa.table({"query": [f"q{'x' * (i % 9)}" for i in range(50)], "positive": ["p"] * 50})
    plan = Plan(table, 2, 1, 4, 7, True)  # 50 // 2 // 4 = 6 steps an epoch
    expected = [epoch_batches(50, 2, 1, 4, 7, epoch, row_lengths(table))[i] for epoch in range(3) for i in range(6)]
    for step in (13, 5, 6, 0, 17):
        assert np.array_equal(plan.rows(step), expected[step])
    again = Plan(table, *plan.args)
    assert all(np.array_equal(again.rows(step), expected[step]) for step in range(18))
