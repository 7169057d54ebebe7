"""The training input: each step's rows read, tokenized and pinned a few steps ahead of the model.

Each step's rows come from the table in batches.py's order, unchanged: a resumed run reads exactly
what an uninterrupted one does. They are tokenized ahead of the step, in one of two places:

- `Ahead`: background threads of the worker (the default). The tokenizer is Rust code that releases
  the GIL, and raykit pads its ids without transformers' Python (raykit/tokens.py), so on a GPU node
  the host's work overlaps the device's, several steps are tokenized at once on the worker's cores,
  and the loop's thread, launching the GPU's kernels, keeps the GIL. Each thread has its own copy of
  the tokenizer: evaluation tokenizes on the loop's thread meanwhile, and a fast tokenizer used from
  two threads at once fails ("Already borrowed").
- `Stream` (scaling.feed_actors > 0): a Ray Data stage of tokenizer actors on the cluster's CPUs, any
  node's, for a GPU worker whose own cores cannot keep up. The stage streams step numbers, not rows:
  each actor builds the worker's batches.Plan from the shared table and prepares the steps it is
  given, and the stage keeps their order (preserve_order). So the order stays exact on resume (the
  stream starts at the checkpoint's step), and only steps about to be trained are ever tokenized.

For a GPU the tensors are placed in pinned memory, so the copy to the device does not block the
host. On the H200 check a step first waited on this work done in line, then on one thread doing it
(raykit#14).
"""

from __future__ import annotations

import copy
import pickle
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from raykit.data import Pairs, TrainingSet, negative_count
from raykit.encoder import Encoder
from raykit.tokens import Tokenizing
from raykit.train.batches import Plan, take

AHEAD = 2  # batches ready beyond the one training: hides a slow tokenization, holds little memory
# What a Stream may hold in Ray's object store, tokenized steps waiting to be trained: tens of steps
# at batch 1,024 (~40 MB a step at 512 tokens with a negative), far more at usual sizes.
STREAM_BYTES = 512 * 2**20


@dataclass
class Prepared:
    """One step's input on the host. `groups`: per forward pass (queries, positives, then all the
    negatives), its tokenized chunks; one chunk each unless gradient caching splits the batch, in
    which case `orders` holds each pass's text order in its chunks (longest first)."""

    batch: dict[str, np.ndarray]  # the rows' columns, for the batch digest
    groups: list[list[dict[str, torch.Tensor]]]
    orders: list[list[int]] | None
    lengths: torch.Tensor  # every text's real token count (for MFU), counted here and not on the device
    # what the loss reads of the rows (loss_inputs), made here so that it goes to the device as the
    # tokens do: a tensor made on a GPU from host data waits for all the GPU's queued work
    targets: dict[str, torch.Tensor]

    def on(self, device) -> tuple[list[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
        """The tokenized chunks and the loss's targets on `device` (a non-blocking copy from pinned
        memory on a GPU: the host goes on launching while they travel)."""
        groups = [[{k: v.to(device, non_blocking=True) for k, v in tokens.items()} for tokens in chunks] for chunks in self.groups]
        return groups, {k: v.to(device, non_blocking=True) for k, v in self.targets.items()}


def forward_inputs(batch: dict) -> list[tuple[list[str], str]]:
    """(texts, role) per forward pass: queries, positives, then all k*B negatives in one (negative j of
    every row, for j = 0..k-1)."""
    inputs = [(list(batch["query"]), "query"), (list(batch["positive"]), "document")]
    if k := negative_count(batch):
        inputs.append(([t for j in range(k) for t in batch[f"negative_{j}"]], "document"))
    return inputs


def prepare(tokenizing: Tokenizing, batch: dict, chunk: int, device) -> Prepared:
    """Tokenize a batch of rows for one step; `chunk` (loss.mini_batch_size) splits each pass into
    chunks, each pass's texts longest first so that a chunk pads only to texts of its own length."""
    inputs = forward_inputs(batch)
    orders = None
    if chunk and chunk < len(batch["query"]):
        orders = [sorted(range(len(texts)), key=lambda i: -len(texts[i])) for texts, _ in inputs]
        groups = [[tokenizing.tokenize([texts[j] for j in order[i:i + chunk]], role=role)
                   for i in range(0, len(texts), chunk)] for (texts, role), order in zip(inputs, orders)]
    else:
        groups = [[tokenizing.tokenize(texts, role=role)] for texts, role in inputs]
    lengths = torch.cat([tokens["attention_mask"].sum(1) for chunks in groups for tokens in chunks])
    return _pinned(Prepared(batch, groups, orders, lengths, loss_inputs(batch, orders)), device)


def loss_inputs(batch: dict, orders: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """What the loss reads of a batch's rows: `query_id`, `positive_id` (B,), `negative_ids` (B, k) with
    negatives, the teacher's `positive_score` (B,) and `negative_scores` (B, k) where the rows have
    them; with gradient-caching `orders`, `inverse_i`: pass i's embeddings back in the batch's order."""
    k = negative_count(batch)
    out = {name: torch.tensor(batch[name]) for name in ("query_id", "positive_id", "positive_score") if name in batch}
    if k:
        out["negative_ids"] = torch.tensor(np.stack([batch[f"negative_id_{j}"] for j in range(k)], 1))
        if "negative_score_0" in batch:
            out["negative_scores"] = torch.tensor(np.stack([batch[f"negative_score_{j}"] for j in range(k)], 1))
    for i, order in enumerate(orders or ()):
        out[f"inverse_{i}"] = torch.tensor(np.argsort(order))
    return out


def _pinned(prepared: Prepared, device) -> Prepared:
    """For a GPU, the tensors in pinned memory: the copy to the device then does not block the host."""
    if torch.device(device).type == "cuda":
        prepared.groups = [[{k: v.pin_memory() for k, v in tokens.items()} for tokens in chunks] for chunks in prepared.groups]
        prepared.targets = {k: v.pin_memory() for k, v in prepared.targets.items()}
    return prepared


def read_ahead(encoder: Encoder, placed: TrainingSet, table: Pairs, plan: Plan, steps: range, chunk: int, device, cpus: int,
               actors: int) -> Ahead | Stream:
    """The prepared batches of `steps`, tokenized by `actors` tokenizer actors (scaling.feed_actors)
    or, where there are none, on the worker's own threads. `placed`: the table as the workers got it."""
    if actors:
        return Stream(encoder.tokenizing(), placed, plan, steps, chunk, device, actors)
    return Ahead(encoder.tokenizing(), table, (plan.rows(step) for step in steps), chunk, device, feed_threads(cpus, device))


def feed_threads(cpus: int, device) -> int:
    """Read-ahead threads for a worker with `cpus` cores. On a GPU, all but the core that runs the
    loop: one core tokenizes 900 to 1,700 SciFact passages of 256 tokens a second, and an H200 trains
    on more pairs than that (bench/gpu_check.py). On a CPU one: torch's threads hold the cores, and
    tokenizing costs ~1% of a step there."""
    return max(1, cpus - 1) if torch.device(device).type == "cuda" else 1


class Ahead:
    """The prepared batches of `steps` (row indices, one array per step), in order, made by `threads`
    background threads up to AHEAD + threads steps early. Use as a context manager: leaving it (the
    run's last step, an error) stops the threads."""

    def __init__(self, tokenizing: Tokenizing, table: pa.Table | Pairs, steps: Iterable[np.ndarray], chunk: int, device,
                 threads: int = 1):
        # one tokenizer per thread, copied here on the loop's thread: a copy made while the loop's
        # thread tokenizes with the encoder's own could fail as two uses at once do
        copies: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            copies.put(copy.deepcopy(tokenizing))
        mine = threading.local()

        def make(rows: np.ndarray) -> Prepared:
            if not hasattr(mine, "tokenizing"):
                mine.tokenizing = copies.get_nowait()
            return prepare(mine.tokenizing, take(table, rows), chunk, device)

        self._make, self._steps = make, iter(steps)
        self.by = f"{threads} thread(s) of each worker"  # who reads ahead, for the log and run.json
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="raykit-feed")
        self._pending: deque[Future] = deque()
        for _ in range(AHEAD + threads):
            self._submit()

    def _submit(self) -> None:
        rows = next(self._steps, None)
        if rows is not None:
            self._pending.append(self._pool.submit(self._make, rows))

    def __iter__(self) -> Iterator[Prepared]:
        while self._pending:
            prepared = self._pending.popleft().result()  # an error while reading ahead is raised here
            self._submit()
            yield prepared

    def __enter__(self) -> Ahead:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Stream:
    """The prepared batches of `steps`, in order, made by a Ray Data stage of `actors` tokenizer
    actors (TokenizeSteps, 1 CPU each) and held in Ray's object store until the loop takes them. Use
    as a context manager: leaving it stops the stage."""

    def __init__(self, tokenizing: Tokenizing, placed: TrainingSet, plan: Plan, steps: range, chunk: int, device, actors: int):
        import ray
        import ray.data

        from raykit.cluster import quiet_ray_data

        quiet_ray_data()
        # the step numbers from one read task that needs no CPU: the worker and the actors hold the
        # CPUs a run asked for, and a read task waiting for one more would wait for ever
        ds = ray.data.read_datasource(_step_numbers(len(steps)), override_num_blocks=1, num_cpus=0)
        options = ds.context.execution_options
        options.preserve_order = True  # the steps in the loop's order, whichever actor finishes first
        options.resource_limits = ray.data.ExecutionResources.for_limits(object_store_memory=STREAM_BYTES)
        ds.context.target_max_block_size = 1  # a block per step: each goes to the loop once it is ready, not with its neighbours
        # the tokenizer goes into the object store once, for every actor to fetch (in a list, so that
        # it arrives as the reference); the pairs are already there (placed)
        ds = ds.map_batches(TokenizeSteps, batch_size=1, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=actors),
                            fn_constructor_kwargs={"tokenizing": [ray.put(tokenizing)], "placed": placed, "plan": plan.args,
                                                   "first": steps.start, "chunk": chunk})
        self._batches = iter(ds.iter_batches(batch_size=None, prefetch_batches=AHEAD))  # the stage starts here
        self._device = device
        self.by = f"{actors} tokenizer actor(s) per worker"

    def __iter__(self) -> Iterator[Prepared]:
        for batch in self._batches:
            for prepared in batch["prepared"]:
                yield _pinned(pickle.loads(prepared), self._device)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self._batches.close()  # Ray Data's iterator is a generator: closing it shuts its executor down


class TokenizeSteps:
    """A tokenizer actor of a Stream: the worker's plan rebuilt from the shared table, and each step
    it is given (a number counted from `first`) read and prepared on the host."""

    def __init__(self, tokenizing: list, placed: TrainingSet, plan: tuple, first: int, chunk: int):
        import ray

        self.tokenizing = ray.get(tokenizing[0])
        self.table = placed.table()
        self.plan = Plan(self.table, *plan)
        self.first, self.chunk = first, chunk

    def __call__(self, batch: dict) -> dict:
        steps = [self.first + int(i) for i in batch["step"]]
        return {"prepared": np.array([pickle.dumps(self._prepare(step)) for step in steps], dtype=object)}

    def _prepare(self, step: int) -> Prepared:
        prepared = prepare(self.tokenizing, take(self.table, self.plan.rows(step)), self.chunk, "cpu")
        # the loop needs the rows' ids (for the batch digest), not their texts (tokenized here)
        prepared.batch = {name: column for name, column in prepared.batch.items() if column.dtype != object}
        return prepared


def _step_numbers(n: int):
    """A Ray Data source of the numbers 0..n-1, each its own block, made as the stage asks for them."""
    import ray.data
    from ray.data.block import BlockMetadata

    class StepNumbers(ray.data.Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return 8 * n

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            def read():
                for i in range(n):
                    yield pa.table({"step": [i]})

            return [ray.data.ReadTask(read, BlockMetadata(num_rows=n, size_bytes=8 * n, input_files=None, exec_stats=None))]

    return StepNumbers()
