"""The embedding store's commit protocol: shard records while writing, one manifest at the end.

Layout of an output (a local folder or s3://bucket/prefix):

    part-000000.parquet ...   id (string), embedding (fixed-size list of float32 or float16)
    _shards/part-000000.json  written right after its shard: rows, sha256, source, model (resume uses these)
    manifest.json             created last, once, with a conditional write (If-None-Match: *)

Readers trust manifest.json and nothing else: not a listing (a crashed run leaves shards without a
manifest), not the records. Each shard's sha256 in the manifest is checked when the shard is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raykit import storage
from raykit.errors import RaykitError

MANIFEST = "manifest.json"
RECORDS = "_shards"
FORMAT = "raykit.embeddings/1"


def short(fingerprint: str) -> str:
    """A fingerprint as messages show it: 'sha256:' and its first 16 hex digits."""
    return fingerprint[: len("sha256:") + 16]


def read_manifest(output: str) -> dict | None:
    path = storage.join(output, MANIFEST)
    if not storage.exists(path):
        return None
    manifest = json.loads(storage.read_bytes(path))
    if manifest.get("format") != FORMAT:
        raise RaykitError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; this output was not written by raykit embed")
    return manifest


def require_manifest(output: str) -> dict:
    manifest = read_manifest(output)
    if manifest is None:
        raise RaykitError(
            f"{storage.join(output, MANIFEST)}: not found; {output} holds no committed embeddings "
            "(run `raykit embed` into it, or let an interrupted run finish by running it again)"
        )
    return manifest


def commit(output: str, manifest: dict) -> None:
    """Create manifest.json, failing if it exists: two jobs racing on one output cannot both commit."""
    path = storage.join(output, MANIFEST)
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    lost = RaykitError(f"{path}: another job committed this output while this one ran; nothing was replaced")
    if storage.is_uri(output):
        import boto3
        from botocore.exceptions import ClientError

        bucket, _, key = path[len("s3://"):].partition("/")
        try:
            boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*", ContentType="application/json")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise lost from None
            raise RaykitError(f"{path}: cannot write ({storage.clean_error(e)})") from None
        return
    os.makedirs(output, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output, prefix=".manifest-")
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    try:
        os.link(tmp, path)  # atomic create-if-absent, like If-None-Match
    except FileExistsError:
        raise lost from None
    finally:
        os.unlink(tmp)


def retract(output: str) -> None:
    """Undo a commit for a new run: the manifest goes first, so no reader trusts what follows."""
    fs, p = storage.filesystem(output)
    fs.delete_file(storage.filesystem(storage.join(output, MANIFEST))[1])
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=False)):
        name = info.path.rsplit("/", 1)[-1]
        if name == RECORDS:
            fs.delete_dir(info.path)
        elif name.startswith("part-") and name.endswith(".parquet"):
            fs.delete_file(info.path)


def shard_bytes(ids: list[str], embedding: np.ndarray) -> bytes:
    """One shard as Parquet bytes: id, and embedding as a fixed-size list (float32 or float16)."""
    values = pa.array(embedding.reshape(-1))
    table = pa.table({"id": pa.array(ids, pa.string()), "embedding": pa.FixedSizeListArray.from_arrays(values, embedding.shape[1])})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none")  # embeddings are noise to a compressor
    return buf.getvalue()


def write_record(output: str, record: dict) -> None:
    storage.put(storage.join(output, RECORDS, record["name"] + ".json"), json.dumps(record, sort_keys=True).encode())


def read_records(output: str) -> dict[str, dict]:
    """The shard records an earlier (uncommitted) run left, by shard name."""
    folder = storage.join(output, RECORDS)
    if not storage.exists(folder):
        return {}
    paths = storage.list_files(folder, (".json",))
    with ThreadPoolExecutor(16) as pool:  # one small GET each: in parallel
        records = list(pool.map(lambda p: json.loads(storage.read_bytes(p)), paths))
    return {r["name"]: r for r in records}


def read_shard(output: str, shard: dict, dim: int) -> tuple[list[str], np.ndarray]:
    """(ids, embeddings) of one committed shard, after checking its size and sha256 against the manifest."""
    path = storage.join(output, shard["path"])
    data = storage.read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard["sha256"]:
        raise RaykitError(f"{path}: sha256 {digest[:16]}... is not the manifest's {shard['sha256'][:16]}...; the shard was changed after commit")
    table = pq.read_table(io.BytesIO(data))
    emb = table["embedding"].combine_chunks()
    values = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    if len(values) != shard["rows"]:
        raise RaykitError(f"{path}: {len(values)} rows, the manifest says {shard['rows']}")
    return table["id"].to_pylist(), values
