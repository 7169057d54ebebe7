"""A corpus to embed, cut into shards: the unit of parallelism, retry, resume and output.

The plan is derived from the input alone (file names, sizes, modification times and `shard_mb`), so a
rerun of the same job over the same input computes the same shards with the same names, and can
skip the ones already written. JSONL files are cut by byte ranges (a line belongs to the shard that
holds its first byte, as Hadoop splits text), Parquet files by row groups. Nothing reads the whole
corpus on the driver: a billion documents cost a listing and one footer read per Parquet file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq

from raykit import storage
from raykit.data import doc_text
from raykit.errors import DataError, StorageUnavailable
from raykit.textfiles import json_object, utf8

SUFFIXES = (".jsonl", ".parquet")
ID_FIELDS = ("_id", "id")  # BEIR writes _id; plain files often id


@dataclass(frozen=True)
class Shard:
    index: int
    name: str  # part-000042: the output file is <output>/part-000042.parquet
    path: str  # the input file (local path or s3:// URI)
    start: int  # jsonl: byte offset; parquet: first row group
    end: int  # jsonl: byte offset (exclusive); parquet: row group (exclusive)
    size: int  # the input file's size and modification time when planned: a changed file
    mtime: str  # invalidates the shards cut from it

    def source(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("index", "name")}


def input_files(corpus: str) -> list[str]:
    """The files a corpus names: a BEIR folder's corpus.jsonl, a folder's .jsonl/.parquet, or one file."""
    if not storage.exists(corpus):
        raise DataError(f"corpus: {corpus}: no such file or folder")
    if not storage.is_dir(corpus):
        if not corpus.endswith(SUFFIXES):
            raise DataError(f"corpus: {corpus}: unknown format; use .jsonl or .parquet files, or a BEIR folder")
        return [corpus]
    beir = storage.join(corpus, "corpus.jsonl")
    if storage.exists(beir):
        return [beir]
    files = storage.list_files(corpus, SUFFIXES)
    if not files:
        raise DataError(f"corpus: {corpus}: no .jsonl or .parquet files in this folder")
    return files


def plan(corpus: str, shard_mb: float) -> list[Shard]:
    """Every shard of the corpus, in a fixed order."""
    shard_bytes = max(1, int(shard_mb * 2**20))
    shards: list[Shard] = []
    for path in input_files(corpus):
        fs, p = storage.filesystem(path)
        info = storage.retrying(path, fs.get_file_info, p)
        if info.size == 0:
            raise DataError(f"{path}: empty file; remove it or give it documents with id and text")
        mtime = info.mtime.isoformat() if info.mtime else ""
        if path.endswith(".parquet"):
            ranges = _row_group_ranges(fs, p, path, shard_bytes)
        else:
            n = math.ceil(info.size / shard_bytes)
            ranges = [(i * shard_bytes, min(info.size, (i + 1) * shard_bytes)) for i in range(n)]
        for start, end in ranges:
            i = len(shards)
            shards.append(Shard(i, f"part-{i:06d}", path, start, end, info.size, mtime))
    return shards


def plan_fingerprint(shards: list[Shard]) -> str:
    """Identity of the input as planned (names, sizes, times, cuts): cheap, without reading documents."""
    h = hashlib.sha256(json.dumps([s.source() for s in shards], sort_keys=True).encode())
    return "sha256:" + h.hexdigest()


def read(shard: Shard) -> tuple[list[str], list[str]]:
    """(ids, texts) of one shard, validated; a document's text is title + " " + text."""
    ids, titles, bodies = read_parts(shard)
    return ids, [doc_text(title, text) for title, text in zip(titles, bodies)]


def read_parts(shard: Shard) -> tuple[list[str], list[str], list[str]]:
    """(ids, titles, texts) of one shard, validated; a missing title is ""."""
    if shard.path.endswith(".parquet"):
        return _read_parquet(shard)
    return _read_jsonl(shard)


def content_hash(ids: list[str], texts: list[str]) -> str:
    """sha256 of a shard's documents; the corpus fingerprint combines these in shard order."""
    h = hashlib.sha256()
    for i, t in zip(ids, texts):
        h.update(i.encode())
        h.update(b"\0")
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()


def _row_group_ranges(fs, p: str, shown: str, shard_bytes: int) -> list[tuple[int, int]]:
    def footer():
        with fs.open_input_file(p) as f:
            return pq.ParquetFile(f).metadata

    try:
        meta = storage.retrying(shown, footer)
    except StorageUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{shown}: not a valid Parquet file ({str(e).splitlines()[0]})") from None
    names = set(meta.schema.names)
    if not names & set(ID_FIELDS) or "text" not in names:
        raise DataError(f"{shown}: columns {sorted(names)}; a corpus file needs 'id' (or '_id') and 'text' [and 'title']")
    ranges, start, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= shard_bytes:
            ranges.append((start, g + 1))
            start, acc = g + 1, 0
    if start < meta.num_row_groups:
        ranges.append((start, meta.num_row_groups))
    return ranges


def _read_parquet(shard: Shard) -> tuple[list[str], list[str], list[str]]:
    fs, p = storage.filesystem(shard.path)

    def load():
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            id_col = next(c for c in ID_FIELDS if c in pf.schema_arrow.names)
            cols = [id_col, "text"] + (["title"] if "title" in pf.schema_arrow.names else [])
            return pf, id_col, cols, pf.read_row_groups(list(range(shard.start, shard.end)), columns=cols)

    pf, id_col, cols, table = storage.retrying(shard.path, load)
    ids = [None if v is None else str(v) for v in table[id_col].to_pylist()]
    texts = table["text"].to_pylist()
    titles = table["title"].to_pylist() if "title" in cols else [""] * len(ids)
    for n, (i, t) in enumerate(zip(ids, texts)):
        if i is None or not isinstance(t, str):
            row = sum(pf.metadata.row_group(g).num_rows for g in range(shard.start)) + n + 1
            raise DataError(f"{shard.path}: row {row}: {'id is null' if i is None else 'text is not a string'}")
    return ids, [t if isinstance(t, str) else "" for t in titles], texts


def _read_jsonl(shard: Shard) -> tuple[list[str], list[str], list[str]]:
    data, base = _line_range(shard)
    ids, titles, texts = [], [], []
    offset = base
    for raw in data.split(b"\n"):
        line_start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            utf8(raw, shard.path, _line_number(shard, line_start))  # raises, naming the line and byte
        rec = json_object(line, lambda: f"{shard.path}:{_line_number(shard, line_start)}")
        _id = next((rec[f] for f in ID_FIELDS if f in rec), None)
        text = rec.get("text")
        if _id is None or not isinstance(text, str):
            what = "no 'id' or '_id' field" if _id is None else "'text' is missing or not a string"
            raise DataError(f"{shard.path}:{_line_number(shard, line_start)}: {what}; every line needs id and text")
        ids.append(str(_id))
        titles.append(rec["title"] if isinstance(rec.get("title"), str) else "")
        texts.append(text)
    return ids, titles, texts


def _line_range(shard: Shard) -> tuple[bytes, int]:
    """The bytes of every line whose first byte lies in [start, end), and the offset they start at."""
    return storage.retrying(shard.path, _read_line_range, shard)


def _read_line_range(shard: Shard) -> tuple[bytes, int]:
    fs, p = storage.filesystem(shard.path)
    with fs.open_input_file(p) as f:
        if f.size() != shard.size:
            raise DataError(f"{shard.path}: changed while being embedded (was {shard.size} bytes, now {f.size()}); run the job again")
        begin = max(0, shard.start - 1)
        f.seek(begin)
        data = f.read(shard.end - begin)
        # A line that starts before `start` belongs to the previous shard: skip to the first line start.
        if shard.start > 0:
            cut = data.find(b"\n")
            if cut < 0:
                return b"", shard.end
            data, begin = data[cut + 1:], begin + cut + 1
        # The last line may run past `end`: read on to its newline.
        if data and shard.end < shard.size and not data.endswith(b"\n"):
            tail = bytearray()
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                cut = chunk.find(b"\n")
                if cut >= 0:
                    tail += chunk[:cut]
                    break
                tail += chunk
            data += bytes(tail)
    return data, begin


def _line_number(shard: Shard, offset: int) -> int:
    # Only on an error: count the newlines before the bad line's offset.
    fs, p = storage.filesystem(shard.path)
    with fs.open_input_file(p) as f:
        return f.read(offset).count(b"\n") + 1

