"""The training input: each step's rows read, tokenized and pinned a few steps ahead of the model.

Background threads take each step's rows from the table (in batches.py's order, unchanged: a resumed
run reads exactly what an uninterrupted one does), tokenize them and, for a GPU, place the tensors
in pinned memory, while the training loop runs the steps before. The tokenizer is Rust code that
releases the GIL, so on a GPU node the host's work overlaps the device's, several steps are
tokenized at once on several cores, and the copy to the device does not block the host. On the H200
check a step first waited on this work done in line, then on one thread doing it (raykit#14).

Each thread tokenizes with its own copy of the tokenizer: evaluation tokenizes on the loop's thread
meanwhile, and a fast tokenizer used from two threads at once fails ("Already borrowed").
"""

from __future__ import annotations

import copy
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from raykit.data import negative_count
from raykit.encoder import Encoder
from raykit.train.batches import take

AHEAD = 2  # batches ready beyond the one training: hides a slow tokenization, holds little memory


@dataclass
class Prepared:
    """One step's input on the host. `groups`: per forward pass (queries, positives, then all the
    negatives), its tokenized chunks; one chunk each unless gradient caching splits the batch, in
    which case `orders` holds each pass's text order in its chunks (longest first)."""

    batch: dict[str, np.ndarray]  # the rows' columns: ids and teacher scores for the loss
    groups: list[list[dict[str, torch.Tensor]]]
    orders: list[list[int]] | None
    lengths: torch.Tensor  # every text's real token count (for MFU), counted here and not on the device

    def on(self, device) -> list[list[dict[str, torch.Tensor]]]:
        """The tokenized chunks on `device` (a non-blocking copy from pinned memory on a GPU)."""
        return [[{k: v.to(device, non_blocking=True) for k, v in tokens.items()} for tokens in chunks]
                for chunks in self.groups]


def forward_inputs(batch: dict) -> list[tuple[list[str], str]]:
    """(texts, role) per forward pass: queries, positives, then all k*B negatives in one (negative j of
    every row, for j = 0..k-1)."""
    inputs = [(list(batch["query"]), "query"), (list(batch["positive"]), "document")]
    if k := negative_count(batch):
        inputs.append(([t for j in range(k) for t in batch[f"negative_{j}"]], "document"))
    return inputs


def prepare(encoder: Encoder, batch: dict, chunk: int, device, tokenizer=None) -> Prepared:
    """Tokenize a batch of rows for one step; `chunk` (loss.mini_batch_size) splits each pass into
    chunks, each pass's texts longest first so that a chunk pads only to texts of its own length."""
    inputs = forward_inputs(batch)
    orders = None
    if chunk and chunk < len(batch["query"]):
        orders = [sorted(range(len(texts)), key=lambda i: -len(texts[i])) for texts, _ in inputs]
        groups = [[encoder.tokenize([texts[j] for j in order[i:i + chunk]], role=role, tokenizer=tokenizer)
                   for i in range(0, len(texts), chunk)] for (texts, role), order in zip(inputs, orders)]
    else:
        groups = [[encoder.tokenize(texts, role=role, tokenizer=tokenizer)] for texts, role in inputs]
    lengths = torch.cat([tokens["attention_mask"].sum(1) for chunks in groups for tokens in chunks])
    if torch.device(device).type == "cuda":
        groups = [[{k: v.pin_memory() for k, v in tokens.items()} for tokens in chunks] for chunks in groups]
    return Prepared(batch, groups, orders, lengths)


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

    def __init__(self, encoder: Encoder, table: pa.Table, steps: Iterable[np.ndarray], chunk: int, device, threads: int = 1):
        # one tokenizer per thread, copied here on the loop's thread: a copy made while the loop's
        # thread tokenizes with the encoder's own could fail as two uses at once do
        copies: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):
            copies.put(copy.deepcopy(encoder.tokenizer))
        mine = threading.local()

        def make(rows: np.ndarray) -> Prepared:
            if not hasattr(mine, "tokenizer"):
                mine.tokenizer = copies.get_nowait()
            return prepare(encoder, take(table, rows), chunk, device, mine.tokenizer)

        self._make, self._steps = make, iter(steps)
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
