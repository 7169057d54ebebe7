"""The embedding store's commit protocol: shard records while writing, one manifest at the end.

Layout of an output (a local folder or s3://bucket/prefix):

    part-000000-<run>.parquet ...  id (string), embedding (fixed-size list of float32 or float16);
                                   <run> is the writing attempt's own id, so no file is ever rewritten
    _shards/part-000000.json       written right after its shard: path, rows, bytes, sha256, source,
                                   model (a rerun resumes from these, after checking each shard)
    manifest.json                  the commit: written last, in one conditional PUT

Readers trust manifest.json and nothing else: not a listing (a crashed run leaves shards without a
manifest), not the records. Each shard's sha256 in the manifest is checked when the shard is read.

The first commit creates manifest.json only if there is none (If-None-Match: *); a new run replaces
it only if it is still the one that run started from (If-Match: its ETag). So of two jobs racing on
one output at most one commits, and until a new run commits, readers see the old embeddings whole:
the new run writes new files beside them. The old files go after the new commit, all but the
generation just replaced (a reader that opened the old manifest a moment before can still finish).
A store that ignores these conditions is refused before anything is written (`check_store`).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykit import storage
from raykit.errors import RaykitError, RunFailed

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RECORDS = "_shards"
FORMAT = "raykit.embeddings/1"
_CONFLICT = ("PreconditionFailed", "412")


def short(fingerprint: str) -> str:
    """A fingerprint as messages show it: 'sha256:' and its first 16 hex digits."""
    return fingerprint[: len("sha256:") + 16]


@dataclass(frozen=True)
class Committed:
    """The manifest an output holds, and the version tag a replacement is conditional on."""

    manifest: dict | None  # None: damaged (not valid JSON); only new_run=true replaces it
    etag: str


def read_committed(output: str) -> Committed | None:
    """The output's commit, or None when it has none."""
    path = storage.join(output, MANIFEST)
    found = _get(path)
    if found is None:
        return None
    body, etag = found
    try:
        manifest = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return Committed(None, etag)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RaykitError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r} is not "
                          f"{FORMAT!r}; this output was not written by raykit embed")
    return Committed(manifest, etag)


def read_manifest(output: str) -> dict | None:
    committed = read_committed(output)
    if committed is None:
        return None
    if committed.manifest is None:
        raise RaykitError(f"{storage.join(output, MANIFEST)}: not valid JSON (damaged); embed into it again with new_run=true")
    return committed.manifest


def require_manifest(output: str) -> dict:
    """The committed manifest of what `raykit embed` wrote to `output`, or one line saying why there is none."""
    if storage.is_uri(output):
        storage.bucket_key(output)  # s3:// with no bucket: one line
    elif Path(storage.resolve(output)).is_file():
        raise RaykitError(f"{output} is a file; give the folder `raykit embed` wrote (the one holding {MANIFEST})")
    manifest = read_manifest(output)
    if manifest is None:
        raise RaykitError(
            f"{storage.join(output, MANIFEST)}: not found; {output} holds no committed embeddings "
            "(run `raykit embed` into it, or let an interrupted run finish by running it again)"
        )
    return manifest


def commit(output: str, manifest: dict, replacing: Committed | None = None) -> None:
    """Write manifest.json if the output still holds what this run started from: nothing
    (`replacing` None), or that commit. A reply lost on the way is resolved by reading back: the
    manifest there is either byte for byte ours (our write landed) or another job's."""
    path = storage.join(output, MANIFEST)
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    lost = RunFailed(f"{path}: another job committed this output while this one ran; nothing of it was replaced "
                     "(its embeddings verify; rerun this job with new_run=true to replace them)")
    if storage.is_uri(output):
        bucket, key = storage.bucket_key(path)
        condition = {"IfMatch": replacing.etag} if replacing else {"IfNoneMatch": "*"}
        try:
            storage.retrying(path, storage.s3_client().put_object, Bucket=bucket, Key=key, Body=body,
                             ContentType="application/json", **condition)
            return
        except Exception as e:
            if _error_code(e) not in _CONFLICT:
                raise _final(e, path, "cannot write") from None
        now = _get(path)  # 412: someone's write landed since we looked; perhaps ours, its reply lost
        if now is not None and now[0] == body:
            log.info(f"{path}: the store's reply to the commit was lost; read back, it is this run's")
            return
        raise lost
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, ".manifest.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # local: the check and the rename below as one step
        now = _get(path)
        if (now[1] if now else None) != (replacing.etag if replacing else None):
            raise lost
        storage.put(path, body)


def check_store(output: str) -> None:
    """Refuse, before anything is written, an S3 store that ignores conditional writes: two jobs
    could then both commit, the second silently replacing the first. Probed once per bucket."""
    bucket = storage.bucket_key(output)[0] if storage.is_uri(output) else ""
    if bucket and bucket not in _honest:
        _probe(bucket, storage.join(output, f"_probe-{uuid.uuid4().hex}"))
        _honest.add(bucket)


_honest: set[str] = set()  # buckets probed in this process


def _probe(bucket: str, path: str) -> None:
    client = storage.s3_client()
    key = storage.bucket_key(path)[1]
    endpoint = client.meta.endpoint_url

    def put(**condition):
        storage.retrying(path, client.put_object, Bucket=bucket, Key=key, Body=b"probe", **condition)

    try:
        put(IfNoneMatch="*")
        for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"' + "0" * 32 + '"'}):
            try:
                put(**condition)
            except Exception as e:
                if _error_code(e) in _CONFLICT:
                    continue
                raise _final(e, path, "cannot write") from None
            header = "If-None-Match" if "IfNoneMatch" in condition else "If-Match"
            raise RaykitError(f"{endpoint}: this S3 store ignores {header} on PUT, so two jobs writing one output "
                              "could both commit; use a store with conditional writes (AWS S3, MinIO, SeaweedFS)")
    finally:
        storage.retrying(path, client.delete_object, Bucket=bucket, Key=key)


def retire(output: str, old: dict | None, new: dict) -> None:
    """After a new run's commit: delete the files of the generation before the one it replaced.
    The replaced generation's files stay listed in the new manifest's `previous` until the next."""
    keep = {s["path"] for s in new["shards"]} | set(new.get("previous", []))
    remove_shards(output, [p for p in (old or {}).get("previous", []) if p not in keep])


def remove_shards(output: str, paths: list[str]) -> None:
    """Delete shard files by their paths in the output (in parallel: one request each on S3)."""
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: storage.remove(storage.join(output, p)), paths))


def _get(path: str) -> tuple[bytes, str] | None:
    """(bytes, version tag) of a file, or None when it does not exist."""
    if not storage.is_uri(path):
        try:
            with open(path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None
        return body, hashlib.sha256(body).hexdigest()
    bucket, key = storage.bucket_key(path)
    try:
        reply = storage.retrying(path, storage.s3_client().get_object, Bucket=bucket, Key=key)
        return storage.retrying(path, reply["Body"].read), reply["ETag"]
    except Exception as e:
        if _error_code(e) in ("NoSuchKey", "404"):
            return None
        raise _final(e, path, "cannot read") from None


def _final(e: Exception, path: str, what: str) -> Exception:
    """What a failed S3 call raises: our own error as it is (StorageUnavailable: exit 1, resumable),
    anything else as one line of bad input (access denied, no such bucket)."""
    if isinstance(e, (RaykitError, RunFailed)):
        return e
    return RaykitError(f"{path}: {what} ({storage.clean_error(e)}); check the path and your AWS credentials")


def _error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


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
    """The shard records an earlier (uncommitted) run left, by shard name; an unreadable one is
    skipped (its shard is written again)."""
    folder = storage.join(output, RECORDS)
    if not storage.exists(folder):
        return {}

    def read(path: str) -> dict | None:
        try:
            record = json.loads(storage.read_bytes(path))
            return record if isinstance(record, dict) and "name" in record else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    with ThreadPoolExecutor(16) as pool:  # one small GET each: in parallel
        records = list(pool.map(read, storage.list_files(folder, (".json",))))
    return {r["name"]: r for r in records if r}


def sound(output: str, records: list[dict]) -> dict[str, tuple[dict, np.ndarray]]:
    """The records whose shard is there with the size and sha256 they recorded, by shard name, each
    with its shard's id hashes (data.text_id): a resumed run keeps those and writes the others again
    (each costs one warning line)."""
    from raykit.data import text_id

    def check(record: dict) -> tuple[str, np.ndarray | None]:
        path = storage.join(output, record["path"])
        try:
            data = storage.read_bytes(path)
        except RaykitError:
            return "missing", None
        if len(data) != record.get("bytes"):
            return f"{len(data)} bytes, its record says {record.get('bytes')}", None
        digest = hashlib.sha256(data).hexdigest()
        if digest != record.get("sha256"):
            return f"sha256 {digest[:16]}..., its record says {str(record.get('sha256'))[:16]}...", None
        return "", text_id(pq.read_table(io.BytesIO(data), columns=["id"])["id"].to_pylist())

    with ThreadPoolExecutor(16) as pool:
        checked = list(pool.map(check, records))
    for record, (problem, _) in zip(records, checked):
        if problem:
            log.warning(f"{storage.join(output, record['path'])}: {problem}; writing {record['name']} again")
    return {r["name"]: (r, ids) for r, (problem, ids) in zip(records, checked) if not problem}


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
