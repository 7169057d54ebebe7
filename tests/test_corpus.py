"""Shard planning and reading: every document exactly once, whatever the cuts; bad lines named."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import QUICKSTART

from raykit.embed import corpus
from raykit.errors import DataError


def read_all(path: str, shard_mb: float) -> tuple[list[str], list[str], int]:
    shards = corpus.plan(path, shard_mb)
    ids, texts = [], []
    for s in shards:
        i, t = corpus.read(s)
        ids += i
        texts += t
    return ids, texts, len(shards)


@pytest.mark.parametrize("shard_mb", [1e-4, 3e-4, 0.0013, 0.01, 64])
def test_jsonl_cuts_lose_and_repeat_nothing(shard_mb):
    expected = [json.loads(line) for line in (QUICKSTART / "corpus.jsonl").read_text().splitlines()]
    ids, texts, n = read_all(str(QUICKSTART), shard_mb)
    assert ids == [r["_id"] for r in expected]
    assert texts == [(r.get("title", "") + " " + r["text"]).strip() for r in expected]
    assert (n == 1) == (shard_mb == 64)  # one shard only when the cut is larger than the file


def test_plan_is_deterministic_and_follows_the_input(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"id": i, "text": f"doc {i}"}) + "\n" for i in range(200)))
    a, b = corpus.plan(str(f), 0.001), corpus.plan(str(f), 0.001)
    assert a == b and [s.name for s in a] == [f"part-{i:06d}" for i in range(len(a))]
    assert corpus.plan_fingerprint(a) == corpus.plan_fingerprint(b)
    f.write_text(f.read_text() + json.dumps({"id": 200, "text": "one more"}) + "\n")
    assert corpus.plan_fingerprint(corpus.plan(str(f), 0.001)) != corpus.plan_fingerprint(a)


def test_parquet_by_row_groups_and_a_folder_of_files(tmp_path):
    table = pa.table({"id": list(range(100)), "title": ["t"] * 100, "text": [f"text {i}" for i in range(100)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=10)
    (tmp_path / "b.jsonl").write_text(json.dumps({"_id": "x", "text": "last"}) + "\n")
    ids, texts, n = read_all(str(tmp_path), 1e-4)
    assert ids == [str(i) for i in range(100)] + ["x"]
    assert texts[0] == "t text 0" and texts[-1] == "last"
    assert n > 2  # several row-group shards plus the jsonl


def test_bad_line_is_named_by_file_and_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "text": "x" * 50}) for i in range(40)]
    lines[33] = '{"id": 33, "text": '
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"docs.jsonl:34: not valid JSON"):
        read_all(str(f), 0.0005)
    lines[33] = json.dumps({"id": 33, "body": "no text"})
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"docs.jsonl:34: 'text' is missing"):
        read_all(str(f), 0.0005)


def test_text_that_is_not_utf8_or_not_unicode_is_named_by_file_and_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_bytes(b'{"id": 1, "text": "ok"}\n{"id": 2, "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"docs.jsonl:2: not UTF-8 \(byte 0xe9; a latin-1 or cp1252 file\?\)"):
        read_all(str(f), 1)
    f.write_text('{"id": 1, "text": "ok \\ud83d\\ude00"}\n{"id": 2, "text": "x\\udc80y"}\n')  # a pair is fine
    with pytest.raises(DataError, match=r"docs.jsonl:2: a lone surrogate \(\\udc80\)"):
        read_all(str(f), 1)


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        corpus.plan(str(tmp_path / "nope"), 1)
    (tmp_path / "x.csv").write_text("id,text\n")
    with pytest.raises(DataError, match="unknown format"):
        corpus.plan(str(tmp_path / "x.csv"), 1)
    with pytest.raises(DataError, match="no .jsonl or .parquet files"):
        corpus.plan(str(tmp_path), 1)
    pq.write_table(pa.table({"doc": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="needs 'id'"):
        corpus.plan(str(tmp_path / "bad.parquet"), 1)
