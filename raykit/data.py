"""Datasets: BEIR folders, and the training table built from one or from pair files (raykit/pairs.py),
local or s3://, validated up front.

Everything is checked on the driver before a worker starts: a bad line costs seconds, not a cluster
allocation. Errors name the file and the offending line or id. The training table goes to the workers
through Ray's object store; raykit/train/batches.py orders its rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raykit import pairs, storage
from raykit.config import DataConfig
from raykit.errors import DataError
from raykit.textfiles import read_jsonl, utf8


@dataclass(frozen=True)
class Beir:
    """A BEIR split: texts by id and graded relevance by query id."""

    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]  # query id -> text (only queries that the split judges)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}


def is_beir(path: str) -> bool:
    return storage.exists(storage.join(path, "corpus.jsonl"))


def load_beir(path: str, split: str) -> Beir:
    corpus_path = storage.join(path, "corpus.jsonl")
    queries_path = storage.join(path, "queries.jsonl")
    qrels_path = storage.join(path, "qrels", f"{split}.tsv")
    if not storage.exists(corpus_path):
        raise DataError(f"{path}: not a BEIR folder (no corpus.jsonl); expected corpus.jsonl, queries.jsonl, qrels/{split}.tsv")
    if not storage.exists(qrels_path):
        raise DataError(f"{qrels_path}: no such qrels file; check the split name (e.g. data.split=train)")
    corpus = {
        _id: doc_text(rec.get("title"), rec.get("text", ""))
        for _id, rec in _read_jsonl_records(corpus_path, id_field="_id")
    }
    all_queries = {_id: rec.get("text", "") for _id, rec in _read_jsonl_records(queries_path, id_field="_id")}
    qrels = _read_qrels(qrels_path, all_queries, corpus, queries_path, corpus_path)
    return Beir(corpus=corpus, queries={q: all_queries[q] for q in qrels}, qrels=qrels)


def load_training_set(cfg: DataConfig, seed: int) -> pa.Table:
    """The training examples as one Arrow table in this process, shuffled once with `seed` (what
    `TrainingSet.table` gives a worker; tests and benchmarks read it here).

    Columns: query, positive, negative_0..k-1 (text); query_id, positive_id, negative_id_j (int64 hashes
    of the source ids, or of the texts for plain pair files: the loss uses them to avoid treating a
    second copy of a query's own positive as a negative); and with teacher scores positive_score,
    negative_score_j (float32).
    """
    _check_source(cfg)
    if is_beir(cfg.train):
        return _shuffled(_beir_table(cfg, seed), seed, cfg.max_examples)
    read = [_read_file(f, cfg) for f in pairs.files(cfg.train)]
    negatives, scored = _agree(cfg, [summary for _, summary in read])
    return _shuffled(pa.concat_tables([_finish(raw, negatives, scored) for raw, _ in read]), seed, cfg.max_examples)


@dataclass(frozen=True)
class TrainingSet:
    """The training table where the workers read it: blocks in Ray's object store, one per pair file,
    read and validated by Ray tasks, so the driver holds references and counts, never the rows."""

    blocks: list  # pa.Tables (a BEIR folder's pairs, before Ray starts) or ObjectRefs of them, in file order
    num_rows: int  # after data.max_examples
    negatives: int  # hard negatives per row
    scored: bool  # teacher scores present
    seed: int
    max_examples: int

    def placed(self) -> "TrainingSet":
        """This set with every block in Ray's object store (one copy per node, not one per worker)."""
        import ray

        return dataclasses.replace(self, blocks=[ray.put(b) if isinstance(b, pa.Table) else b for b in self.blocks])

    def table(self) -> Pairs:
        """The whole table, shuffled once with the seed: the same on every worker and tokenizer actor,
        and the same rows as load_training_set's, read through the order (no copy of the blocks)."""
        import ray

        blocks = [ray.get(b) if isinstance(b, ray.ObjectRef) else b for b in self.blocks]
        base = pa.concat_tables(blocks)
        return Pairs(base, _order(base.num_rows, self.seed, self.max_examples))


@dataclass(frozen=True)
class Pairs:
    """The training table in its seeded order, read through that order. A worker and each of its
    tokenizer actors read the blocks where Ray's object store holds them (one copy per node, mapped,
    not copied), and copy only the rows of a batch when they take it."""

    base: pa.Table  # the blocks as stored
    order: np.ndarray  # row i of the pairs is base's row order[i]

    @property
    def num_rows(self) -> int:
        return len(self.order)

    def take(self, rows) -> pa.Table:
        return self.base.take(pa.array(self.order[np.asarray(rows)]))


def training_set(cfg: DataConfig, seed: int) -> TrainingSet:
    """The training examples for a run on Ray. A BEIR folder's pairs are built here (its corpus is
    read here anyway; placed in the object store with the trainer); pair files are read and validated
    by one Ray task each, and a bad row there is the same one line as here (file:line, exit 2)."""
    import ray

    from raykit.cluster import connect_ray, raised_by_raykit

    _check_source(cfg)
    if is_beir(cfg.train):
        table = _beir_table(cfg, seed)
        return TrainingSet([table], _kept(table.num_rows, cfg), negative_count(table.column_names),
                           "positive_score" in table.column_names, seed, cfg.max_examples)
    connect_ray()
    env = {"runtime_env": {"env_vars": storage.worker_env()}} if storage.worker_env() else {}  # RAYKIT_STORAGE_RETRY
    read = ray.remote(num_cpus=1)(_read_file).options(num_returns=2, **env)
    refs = [read.remote(f, cfg) for f in pairs.files(cfg.train)]
    try:
        summaries = ray.get([summary for _, summary in refs])
    except Exception as e:  # noqa: BLE001 - a bad row: the task's DataError, wrapped by Ray
        raise raised_by_raykit(e) or e from None
    negatives, scored = _agree(cfg, summaries)
    finish = ray.remote(num_cpus=1)(_finish).options(**env)
    blocks = [finish.remote(raw, negatives, scored) for raw, _ in refs]
    ray.wait(blocks, num_returns=len(blocks), fetch_local=False)
    return TrainingSet(blocks, _kept(sum(s.rows for s in summaries), cfg), negatives, scored, seed, cfg.max_examples)


def _check_source(cfg: DataConfig) -> None:
    if not cfg.train:
        raise DataError("data.train: not set; point it at a BEIR folder or a .jsonl/.parquet file (data.train=PATH)")
    if not cfg.train.startswith(pairs.HUB) and not storage.exists(cfg.train):
        raise DataError(f"data.train: {cfg.train}: no such file or folder")
    if cfg.val_queries and not is_beir(cfg.train):
        raise DataError(f"data.val_queries: needs data.train to be a BEIR folder (its qrels judge the held-out queries); "
                        f"{cfg.train} is a pair file. Set data.val_queries=0")


def _beir_table(cfg: DataConfig, seed: int) -> pa.Table:
    beir = load_beir(cfg.train, cfg.split)
    return _beir_pairs(beir, storage.join(cfg.train, "qrels", cfg.split + ".tsv"), validation_queries(beir, cfg, seed))


def _shuffled(table: pa.Table, seed: int, max_examples: int) -> pa.Table:
    return table.take(_order(table.num_rows, seed, max_examples))


def _order(num_rows: int, seed: int, max_examples: int) -> np.ndarray:
    """The rows of a training table in its seeded order, the first max_examples of them if set."""
    order = np.random.default_rng(seed).permutation(num_rows)
    return order[:max_examples] if max_examples else order


def _kept(rows: int, cfg: DataConfig) -> int:
    return min(rows, cfg.max_examples) if cfg.max_examples else rows


def load_validation_set(cfg: DataConfig, seed: int) -> Beir | None:
    """The held-out training queries (data.val_queries) as a BEIR split; None when there are none."""
    if not cfg.val_queries:
        return None
    beir = load_beir(cfg.train, cfg.split)
    held_out = validation_queries(beir, cfg, seed)
    qrels = {q: beir.qrels[q] for q in held_out}
    corpus = beir.corpus
    if 0 < cfg.val_corpus < len(corpus):
        judged = {d for docs in qrels.values() for d in docs}
        others = sorted(set(corpus) - judged)
        rng = np.random.default_rng(seed)
        picked = {others[i] for i in rng.permutation(len(others))[: max(0, cfg.val_corpus - len(judged))]}
        corpus = {d: text for d, text in corpus.items() if d in judged or d in picked}
    return Beir(corpus=corpus, queries={q: beir.queries[q] for q in qrels}, qrels=qrels)


def validation_queries(beir: Beir, cfg: DataConfig, seed: int) -> list[str]:
    """Which training queries are held out: the first data.val_queries of a seeded permutation."""
    if not cfg.val_queries:
        return []
    ids = sorted(beir.qrels)
    if cfg.val_queries >= len(ids):
        raise DataError(f"data.val_queries: {cfg.val_queries} of the {len(ids)} training queries in {cfg.train} "
                        f"leaves none to train on; hold out fewer (e.g. data.val_queries={max(1, len(ids) // 10)})")
    order = np.random.default_rng(seed).permutation(len(ids))
    return sorted(ids[i] for i in order[: cfg.val_queries])


def doc_text(title, text: str) -> str:
    """A document as every model here reads it: `title text` (BEIR's convention), or the text alone."""
    return (f"{title} {text}" if isinstance(title, str) and title else text).strip()


def text_id(texts) -> np.ndarray:
    return np.array([_hash64(t) for t in texts], dtype=np.int64)


def _beir_pairs(beir: Beir, qrels_path: str, held_out: list[str]) -> pa.Table:
    skip = set(held_out)
    rows = [(q, d) for q, docs in beir.qrels.items() if q not in skip for d, rel in docs.items() if rel > 0]
    if not rows:
        raise DataError(f"{qrels_path}: no pair with relevance > 0 to train on")
    return pa.table(
        {
            "query": [beir.queries[q] for q, _ in rows],
            "positive": [beir.corpus[d] for _, d in rows],
            "query_id": text_id(["q:" + q for q, _ in rows]),
            "positive_id": text_id(["d:" + d for _, d in rows]),
        }
    )


@dataclass(frozen=True)
class _FileSummary:
    """What the driver needs of one pair file to check that the files agree."""

    rows: int
    fewest: tuple[int, str]  # the fewest negatives in a row, and where that row is
    most: int
    unscored: str | None  # where a row without teacher scores is, if one is
    scored: bool  # some row has teacher scores


def _read_file(path: str, cfg: DataConfig) -> tuple[pa.Table, _FileSummary]:
    """One pair file's validated rows (negatives as lists, as the file has them) and its summary."""
    rows = pairs.read(path, cfg.columns, cfg.split)
    counts = [len(r["negatives"]) for r, _ in rows]
    fewest = min(range(len(rows)), key=counts.__getitem__)
    scored = [("positive_score" in r) for r, _ in rows]
    raw = {"query": [r["query"] for r, _ in rows], "positive": [r["positive"] for r, _ in rows],
           "negatives": [r["negatives"] for r, _ in rows]}
    if all(scored):
        raw["positive_score"] = [r["positive_score"] for r, _ in rows]
        raw["negative_scores"] = [r["negative_scores"] for r, _ in rows]
    summary = _FileSummary(len(rows), (counts[fewest], rows[fewest][1]), max(counts),
                           next((where for (r, where), s in zip(rows, scored) if not s), None), any(scored))
    return pa.table(raw), summary


def _agree(cfg: DataConfig, summaries: list[_FileSummary]) -> tuple[int, bool]:
    """(negatives per row, teacher scores or not) that every pair file's rows agree on; one line where they don't."""
    fewest, where = min(s.fewest for s in summaries)
    most = max(s.most for s in summaries)
    k = cfg.num_negatives or fewest
    if not cfg.num_negatives and fewest != most:
        raise DataError(f"data.train: {cfg.train}: rows have {fewest} to {most} negatives; "
                        f"set data.num_negatives=N to train on the first N of each")
    if fewest < k:
        raise DataError(f"{where}: {fewest} negatives, data.num_negatives asks {k}")
    unscored = next((s.unscored for s in summaries if s.unscored), None)
    if unscored and any(s.scored for s in summaries):
        raise DataError(f"data.train: {cfg.train}: some rows have teacher scores and some don't (e.g. {unscored}); make them agree")
    return k, unscored is None


def _finish(raw: pa.Table, k: int, scored: bool) -> pa.Table:
    """A pair file's rows as training columns: the first k negatives each in a column of its own."""
    negatives = raw["negatives"].to_pylist()
    columns = {
        "query": raw["query"],
        "positive": raw["positive"],
        "query_id": text_id(raw["query"].to_pylist()),
        "positive_id": text_id(raw["positive"].to_pylist()),
    }
    for j in range(k):  # one column per negative: plain arrays for the loop's numpy batches
        columns[f"negative_{j}"] = [n[j] for n in negatives]
        columns[f"negative_id_{j}"] = text_id(columns[f"negative_{j}"])
    if scored:
        columns["positive_score"] = raw["positive_score"].cast(pa.float32())
        scores = raw["negative_scores"].to_pylist()
        for j in range(k):
            columns[f"negative_score_{j}"] = np.array([s[j] for s in scores], dtype=np.float32)
    return pa.table(columns)


def negative_count(columns) -> int:
    """How many hard negatives per row a training table (or batch) carries."""
    return sum(1 for c in columns if c.startswith("negative_") and c[len("negative_"):].isdigit())


def _read_jsonl_records(path: str, id_field: str):
    if not storage.exists(path):
        raise DataError(f"{path}: no such file; a BEIR folder needs corpus.jsonl and queries.jsonl")
    seen: dict[str, int] = {}
    for lineno, rec in read_jsonl(path):
        if id_field not in rec:
            raise DataError(f"{path}:{lineno}: no '{id_field}' field")
        _id = str(rec[id_field])
        if _id in seen:
            raise DataError(f"{path}:{lineno}: duplicate {id_field} '{_id}' (first on line {seen[_id]})")
        seen[_id] = lineno
        yield _id, rec


def _read_qrels(path: str, queries: dict, corpus: dict, queries_path: str, corpus_path: str) -> dict[str, dict[str, int]]:
    text = utf8(storage.read_bytes(path), path)
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.rstrip("\r").split("\t")
        if not line.strip() or (lineno == 1 and parts[0] == "query-id"):
            continue
        if len(parts) != 3:
            raise DataError(f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score)")
        q, d, score = parts
        try:
            rel = int(score)
        except ValueError:
            raise DataError(f"{path}:{lineno}: score {score!r} is not an integer") from None
        if q not in queries:
            raise DataError(f"{path}:{lineno}: query-id '{q}' is not in {queries_path}")
        if d not in corpus:
            raise DataError(f"{path}:{lineno}: corpus-id '{d}' is not in {corpus_path}")
        qrels.setdefault(q, {})[d] = rel
    if not qrels:
        raise DataError(f"{path}: no judgements; it needs rows of query-id, corpus-id, score")
    return qrels


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
