"""Pair files: the (query, positive[, negatives][, teacher scores]) rows raykit trains on, in the
formats users keep them.

Formats, local or s3://: .jsonl, .parquet, .csv and .tsv (a header row), one file or a folder of them;
a Hugging Face dataset folder (`save_to_disk`; `data.split` picks the split of a DatasetDict); or
`hf:ORG/NAME`, a dataset on the hub where the hub is reachable. `data.columns` says which of the
file's columns holds each field. Every row is validated before training starts: an error names the
file and line (or row) and the column as the file names it. `raykit mine` and `raykit score` write
the default columns as .jsonl or .parquet.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from raykit import cache, storage
from raykit.config import Columns
from raykit.errors import DataError
from raykit.textfiles import read_jsonl, utf8

SUFFIXES = (".jsonl", ".parquet", ".csv", ".tsv")
HUB = "hf:"


def is_dataset(path: str) -> bool:
    """A Hugging Face dataset: `hf:ORG/NAME`, or a folder `save_to_disk` wrote."""
    return path.startswith(HUB) or any(storage.exists(storage.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def files(path: str, key: str = "data.train") -> list[str]:
    """The pair files `path` names: itself, or the files of a folder (a dataset folder is one)."""
    if is_dataset(path) or not storage.is_dir(path):
        return [path]
    found = storage.list_files(path, SUFFIXES)
    if not found:
        raise DataError(f"{key}: {path}: no {', '.join(SUFFIXES)} files or Hugging Face dataset in this folder")
    return found


def read(path: str, columns: Columns | None = None, split: str = "train") -> list[tuple[dict, str]]:
    """Validated rows as {query, positive, negatives: [...][, positive_score, negative_scores]}, each
    with where it is (`file:line N`, `file:row N`)."""
    columns = columns or Columns()
    records = _records(path, columns, split)
    if not records:
        raise DataError(f"{path}: empty file; it needs rows with {columns.query}, {columns.positive}")
    return [(_row(rec, where, columns), where) for where, rec in records]


def write(path: str, rows: list[dict]) -> None:
    """Rows with the default columns (what `read` reads back): .jsonl or .parquet by the path's
    suffix, local or s3://, in one atomic write."""
    if path.endswith(".parquet"):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        storage.put(path, buf.getvalue())
    else:
        storage.put_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# --- reading each format --------------------------------------------------------------------------


def _records(path: str, columns: Columns, split: str) -> list[tuple[str, dict]]:
    if is_dataset(path):
        return _dataset(path, split)
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(path)))
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: not a valid Parquet file ({e})") from None
        return [(f"{path}:row {i}", r) for i, r in enumerate(table.to_pylist(), start=1)]
    if path.endswith(".jsonl"):
        return [(f"{path}:line {n}", rec) for n, rec in read_jsonl(path)]
    if path.endswith((".csv", ".tsv")):
        return _delimited(path, columns)
    raise DataError(f"{path}: unknown format; use {', '.join(SUFFIXES)} or a Hugging Face dataset folder")


def _delimited(path: str, columns: Columns) -> list[tuple[str, dict]]:
    """CSV or TSV with a header row. Text columns stay text (a query of digits is not a number); a
    negatives column holds one negative per row."""
    import pyarrow.csv as pacsv

    data = storage.read_bytes(path)
    if not data.strip():
        raise DataError(f"{path}: empty file")
    utf8(data, path)  # a latin-1 file: one line naming the line and the byte
    parse = pacsv.ParseOptions(delimiter="\t" if path.endswith(".tsv") else ",", newlines_in_values=True)
    text = {c: pa.string() for c in (columns.query, columns.positive, columns.negatives, "negative")}
    try:
        table = pacsv.read_csv(io.BytesIO(data), parse_options=parse,
                               convert_options=pacsv.ConvertOptions(column_types=text, strings_can_be_null=True))
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not a valid {path.rsplit('.', 1)[1].upper()} file ({str(e).splitlines()[0]})") from None
    return [(f"{path}:line {i + 1}", r) for i, r in enumerate(table.to_pylist(), start=1)]


def _dataset(path: str, split: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a Hugging Face dataset; reading one needs its library: pip install datasets") from None
    datasets.disable_progress_bars()
    if path.startswith(HUB):
        try:
            ds = datasets.load_dataset(path[len(HUB):], split=split)
        except Exception as e:  # noqa: BLE001 - unreachable hub, unknown name or split: one line
            raise DataError(f"{path}: cannot load this dataset from the hub ({str(e).splitlines()[0]}); "
                            "save it with save_to_disk where the hub is reachable and point data.train at the folder") from None
    else:
        ds = datasets.load_from_disk(cache.local_copy(path) if storage.is_uri(path) else storage.resolve(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split '{split}' in this dataset (it has {', '.join(ds)}); set data.split")
            ds = ds[split]
    return [(f"{path}:row {i}", r) for i, r in enumerate(ds.to_list(), start=1)]


# --- one row ----------------------------------------------------------------------------------------


def _row(rec: dict, where: str, columns: Columns) -> dict:
    default = columns == Columns()
    row = {"query": _text(rec.get(columns.query), columns.query, where, columns),
           "positive": _text(rec.get(columns.positive), columns.positive, where, columns)}
    negatives = rec.get(columns.negatives)
    if negatives is None and default:
        negatives = rec.get("negative")  # the one-negative column, by its own name
    negatives = [] if negatives is None else [negatives] if isinstance(negatives, str) else negatives
    if not isinstance(negatives, list):
        raise DataError(f"{where}: column '{columns.negatives}' must be a list of strings, got {type(negatives).__name__}")
    row["negatives"] = [_text(n, columns.negatives, where, columns) for n in negatives]
    if rec.get(columns.positive_score) is not None:
        scores = rec.get(columns.negative_scores)
        if scores is None and default:
            scores = rec.get("negative_score")
        scores = [] if scores is None else scores if isinstance(scores, list) else [scores]
        if len(scores) != len(negatives):
            raise DataError(f"{where}: '{columns.negative_scores}' must give one score per negative ({len(negatives)})")
        row["positive_score"] = _number(rec[columns.positive_score], columns.positive_score, where)
        row["negative_scores"] = [_number(x, columns.negative_scores, where) for x in scores]
    return row


def _text(value, column: str, where: str, columns: Columns) -> str:
    if not isinstance(value, str) or not value.strip():
        problem = "missing" if value is None else f"not a non-empty string ({value!r:.40})"
        mapping = "" if columns == Columns() else " (data.columns)"
        raise DataError(f"{where}: column '{column}' is {problem}; every row needs {columns.query}, {columns.positive}{mapping}")
    return value


def _number(value, column: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise DataError(f"{where}: '{column}' must be a number, got {value!r:.40}")
    return float(value)
