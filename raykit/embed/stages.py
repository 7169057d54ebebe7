"""The stages of `raykit embed`'s Ray Data pipeline, each a long-lived actor: tokenize (CPU), encode
(GPU or CPU), write (CPU). See pipeline.py for how they are wired.

Each stage imports what it uses when it starts: the tokenizers and writers never load torch or a
model, so each costs one light process, not another copy of the ML stack. On CPUs one actor runs
all three for its shard (EmbedShards).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import time

import numpy as np

from raykit import storage
from raykit.data import text_id
from raykit.embed import corpus, manifest
from raykit.errors import RaykitError


class TokenizeShards:
    """Reads a shard's documents and tokenizes them after the document prompt (no padding: the
    encoder pads per batch).

    `tokenizer` is the driver's fast tokenizer's backend (an object ref to a raykit.tokens.Backend):
    the same ids as transformers' AutoTokenizer, without importing transformers or torch, so a
    tokenizer actor starts in a fraction of the time (a GPU encoder has up to 16 of them). Where
    tokens.backend gives None (a slow tokenizer, or a class that changes its backend's ids) the
    actor loads AutoTokenizer instead."""

    def __init__(self, model: str, max_seq_length: int, prompt: str = "", revision: str = "", trust_remote_code: bool = False,
                 tokenizer=None):
        if tokenizer is not None:
            import ray

            self.encode = ray.get(tokenizer).ids
        else:
            from transformers import AutoTokenizer

            from raykit.encoder import hub_options, resolve_model

            auto = AutoTokenizer.from_pretrained(resolve_model(model), **hub_options(revision, trust_remote_code))
            self.encode = lambda texts: auto(texts, truncation=True, max_length=max_seq_length)["input_ids"]
        self.prompt = prompt

    def __call__(self, batch: dict) -> dict:
        out = _read_and_tokenize({"shard": batch["shard"][0]}, self.encode, self.prompt)
        return {k: [v] for k, v in out.items()}


def packed(encoded: list[list[int]]) -> dict[str, bytes]:
    """A shard's token ids as its encoder actor takes them: every text's ids end to end (int32), and
    each text's count (int64)."""
    lengths = np.array([len(t) for t in encoded], dtype=np.int64)
    tokens = np.fromiter((t for seq in encoded for t in seq), dtype=np.int32, count=int(lengths.sum()))
    return {"tokens": tokens.tobytes(), "lengths": lengths.tobytes()}


def _read_and_tokenize(row: dict, encode, prompt: str = "") -> dict:
    shard = corpus.Shard(**json.loads(row["shard"]))
    ids, texts = corpus.read(shard)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise RaykitError(f"{shard.path}: duplicate id '{dup}' in {shard.name}; ids must be unique")
    prompted = [prompt + t for t in texts] if prompt else texts  # as Encoder.prompted: one rule, but no torch here
    encoded = encode(prompted) if texts else []
    row = {
        "shard": row["shard"],
        "ids": json.dumps(ids),  # one string: Arrow keeps it as is, whatever the ids look like
        **packed(encoded),
        "content": corpus.content_hash(ids, texts),
    }
    del texts, prompted, encoded
    _release_memory()
    return row


class EncodeShards:
    """An encoder actor: loads the model once, checks it is the driver's, embeds one shard per call."""

    def __init__(self, model, max_seq_length, prompts, revision, trust_remote_code, fingerprint, dim, dtype, batch_size,
                 batch_tokens, precision, threads, peak_tflops=0.0, compile=False):
        import os
        import socket

        import torch

        from raykit.device import compiled, local_device
        from raykit.encoder import Encoder
        from raykit.flops import ModelFlops, peak_flops
        from raykit.precision import use_bf16

        self.device = local_device()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        encoder = Encoder.from_pretrained(model, max_seq_length, prompts, revision, trust_remote_code)
        mine = encoder.fingerprint()
        if mine != fingerprint:  # e.g. a hub id that resolved to another revision on this node
            raise RaykitError(f"model: {model} loaded on this node as {manifest.short(mine)}, on the driver as {manifest.short(fingerprint)}; pin one revision (revision=) or use a folder on shared storage")
        self.encoder = encoder.to(self.device).eval()
        if compile:  # embed.compile: the first batches of each new shape family wait for the compiler
            compiled(self.encoder, "embed.compile")
        self.bf16 = use_bf16(precision, self.device)
        self.pad = encoder.tokenizer.pad_token_id or 0
        self.dim, self.dtype, self.batch_size = dim, np.dtype(dtype), batch_size
        # Tokens per batch bound the activations: on a CPU a batch that fits in a core's cache runs
        # faster per document than a large one (all-MiniLM-L6-v2 on one core: 2,048 tokens ~5% faster
        # than 4,096, ~1.5x faster than 128 documents); a GPU wants large batches.
        self.batch_tokens = batch_tokens or (65536 if self.device.type == "cuda" else 2048)
        # what this actor reports with each shard: its time busy and model FLOPs, for docs/s and MFU per actor
        self.flops = ModelFlops(encoder.model, encoder.model.config)
        self.peak = peak_flops(self.device, self.bf16, peak_tflops) or 0.0
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu x{threads}"
        self.actor = f"{socket.gethostname()}:{os.getpid()} ({where}, {'bf16' if self.bf16 else 'fp32'}{', compiled' if compile else ''})"

    def __call__(self, batch: dict) -> dict:
        import torch
        import torch.nn.functional as F

        started = time.perf_counter()
        lengths = np.frombuffer(batch["lengths"][0], dtype=np.int64)
        tokens = np.frombuffer(batch["tokens"][0], dtype=np.int32)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        order, parts = [], []
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for idx in self._batches(lengths):
                width = int(lengths[idx].max())
                mask = np.arange(width) < lengths[idx, None]  # row-major: each row's tokens, then its padding
                ids = np.full((len(idx), width), self.pad, dtype=np.int64)
                ids[mask] = np.concatenate([tokens[starts[i]: starts[i] + lengths[i]] for i in idx])
                emb = self.encoder(*(self._to_device(torch.from_numpy(a)) for a in (ids, mask.astype(np.int64)))).float()
                if self.dim < emb.shape[1]:  # Matryoshka: keep the prefix, re-normalize if the model normalizes
                    emb = emb[:, : self.dim]
                    emb = F.normalize(emb, dim=-1) if self.encoder.normalize else emb
                order.append(idx)
                parts.append(emb)
            # to the host once per shard: a copy per batch would wait for the device each time, and it
            # would idle while the host pads the next batch
            out = np.empty((len(lengths), self.dim), dtype=np.float32)
            if parts:
                out[np.concatenate(order)] = torch.cat(parts).cpu().numpy()
        busy = time.perf_counter() - started
        _release_memory()
        return {
            "shard": batch["shard"],
            "ids": batch["ids"],
            "content": batch["content"],
            "ran_in": ["bf16" if self.bf16 else "fp32"],
            "embedding": [out.astype(self.dtype).tobytes()],
            **{k: [v] for k, v in self.work(lengths, busy).items()},
        }

    def _to_device(self, tensor):
        """To a GPU from pinned memory, asynchronously: the host prepares the next batch meanwhile."""
        return tensor.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else tensor

    def work(self, lengths: np.ndarray, busy: float) -> dict:
        """What one shard cost this actor: the seconds it was busy, the forward FLOPs of its documents'
        real tokens, and the peak they count against (0: unknown; raykit/flops.py)."""
        import torch

        return {"actor": self.actor, "busy_s": busy, "flops": self.flops.forward(torch.from_numpy(lengths.copy())),
                "peak": self.peak}

    def _batches(self, lengths: np.ndarray):
        """Index arrays, longest documents first, each within batch_size docs and batch_tokens padded tokens."""
        order = np.argsort(-lengths, kind="stable")
        start = 0
        while start < len(order):
            width = max(1, int(lengths[order[start]]))  # the longest in the batch sets its width
            n = max(1, min(self.batch_size, self.batch_tokens // width))
            yield order[start:start + n]
            start += n


class EmbedShards(EncodeShards):
    """A CPU encoder actor that takes each shard end to end: read and tokenize, encode, write.

    On a CPU, tokenizing a shard costs about 1% of encoding it and writing less: separate tokenizer
    and writer actors would save the encoders nothing, and each is one more Ray Data worker to start
    (~3 core-seconds) while the encoders, holding every core, start too. `read` and `write` are
    TokenizeShards' and WriteShards' arguments."""

    def __init__(self, read: dict, write: dict, **encode):
        super().__init__(**encode)
        self.read, self.write = TokenizeShards(**read), WriteShards(**write)

    def __call__(self, batch: dict) -> dict:
        return self.write(super().__call__(self.read(batch)))


class WriteShards:
    """Writes a shard's Parquet file, then its record (see manifest.py): light, no torch."""

    def __init__(self, output: str, identity: dict, attempt: str):
        self.output, self.identity, self.attempt = output, identity, attempt

    def __call__(self, batch: dict) -> dict:
        out = _write_shard({k: v[0] for k, v in batch.items()}, self.output, self.identity, self.attempt)
        return {k: [v] for k, v in out.items()}


def _write_shard(row: dict, output: str, identity: dict, attempt: str) -> dict:
    shard = corpus.Shard(**json.loads(row["shard"]))
    ids = json.loads(row["ids"])
    emb = np.frombuffer(row["embedding"], dtype=np.dtype(identity["dtype"])).reshape(len(ids), identity["dim"])
    data = manifest.shard_bytes(ids, emb)
    path = f"{shard.name}-{attempt}.parquet"  # never an existing file: a reader of the last commit may be on it
    storage.put(storage.join(output, path), data)
    record = {
        "name": shard.name,
        "path": path,
        "rows": len(ids),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "content": row["content"],
        "ran_in": row["ran_in"],  # the precision that actually ran on this actor's hardware
        "source": shard.source(),
        **{k: identity[k] for k in ("model", "dim", "dtype", "precision")},
    }
    manifest.write_record(output, record)  # after the shard: a record means the shard is whole
    del data, emb
    _release_memory()
    # the ids' 64-bit hashes: the driver checks ids are unique across shards before it commits; the
    # encoder actor's cost of this shard, passed on for the driver's docs/s and MFU per actor
    return {"name": shard.name, "rows": len(ids), "record": json.dumps(record), "id_hashes": text_id(ids).tobytes(),
            **{k: row[k] for k in ("actor", "busy_s", "flops", "peak")}}


def _release_memory() -> None:
    """Hand freed heap pages back to the OS after a shard.

    glibc keeps freed memory in its arenas; batches of ever-different shapes then fragment them and a
    long-lived worker's resident memory creeps up with corpus size. One malloc_trim per shard keeps it
    flat, at a cost of well under a millisecond.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
