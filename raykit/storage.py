"""Where things live: local paths and s3:// URIs behind one small API.

S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), so the same job runs against AWS, MinIO or
SeaweedFS. pyarrow's filesystem reads them; we never read, log or store them ourselves.

Object stores throttle (503 SlowDown), restart and stall. Every call here retries what may pass (a
connection refused or timed out, a 5xx) with backoff for RAYKIT_STORAGE_RETRY (default 2m), logging
one line when the store stops answering and one when it is back; past that the run fails in one line
(exit 1, `StorageUnavailable`) and a rerun resumes. Errors that will not pass (no such bucket, access
denied) are not retried.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from raykit.config import duration
from raykit.errors import RaykitError, RunFailed, StorageUnavailable

log = logging.getLogger(__name__)

RETRY_ENV = "RAYKIT_STORAGE_RETRY"
DEFAULT_RETRY = "2m"
REQUEST_TIMEOUT_S = 10.0  # pyarrow's requests: reads, shards, Ray Train's uploads
COMMIT_TIMEOUT_S = 20.0  # boto3's: the commit's conditional PUT, manifests read back
# What an S3 client's error says when trying again may help: the AWS SDK's retryable error kinds
# (pyarrow's messages), HTTP 5xx and throttling codes (boto3's).
_TRANSIENT = ("NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "REQUEST_TIMEOUT",
              "THROTTLING", "HTTP response code: 5", "SlowDown", "ServiceUnavailable", "InternalError",
              "RequestTimeout", "Throttling", "(500)", "(502)", "(503)", "(504)",
              # a HEAD's reply has no body to name its error: pyarrow says "AWS Error UNKNOWN (HTTP status 503)"
              "(HTTP status 500)", "(HTTP status 502)", "(HTTP status 503)", "(HTTP status 504)")


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> str:
    """An absolute local path, or the URI unchanged (Ray's storage_path wants absolute paths)."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))


def check_output(key: str, path: str, folder: bool = True) -> None:
    """Refuse, before anything runs, an output location that cannot be one: an s3:// URI without a
    bucket, a local path that is a file (a folder, for a file output) or lies under a file."""
    if is_uri(path):
        try:
            bucket_key(path)
        except RaykitError as e:
            raise RaykitError(f"{key}: {e}") from None
        return
    target = Path(resolve(path))
    if target.exists() and target.is_dir() != folder:
        raise RaykitError(f"{key}: {path} is a {'file' if folder else 'folder'}; give the path of a "
                          f"{'folder' if folder else 'file'} to write")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise RaykitError(f"{key}: {parent} is a file, so nothing can be written under it at {path}; choose another path")


def retry_seconds() -> float:
    """How long a storage call keeps retrying: RAYKIT_STORAGE_RETRY ('2m', '90s', '0s' = not at all)."""
    text = os.environ.get(RETRY_ENV, DEFAULT_RETRY)
    seconds = duration(text)
    if seconds is None:
        raise RaykitError(f"{RETRY_ENV}: {text!r} is not a duration; use e.g. 2m, 90s or 10m")
    return seconds


def worker_env() -> dict[str, str]:
    """RAYKIT_STORAGE_RETRY as the submitting shell set it, for the runtime env of the job's workers."""
    return {RETRY_ENV: os.environ[RETRY_ENV]} if os.environ.get(RETRY_ENV) else {}


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `path` and the path inside it. Its own retries are brief: the
    calls in this module retry for RAYKIT_STORAGE_RETRY around them (`retrying`)."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), resolve(path)
    bucket, key = bucket_key(path)
    return _s3(bucket, 1, *_endpoint_and_region(), stall_seconds(REQUEST_TIMEOUT_S)), f"{bucket}/{key}".rstrip("/")


def ray_storage(path: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train and Tune, whose checkpoint uploads and reads
    we do not wrap: their S3 client itself retries for at least RAYKIT_STORAGE_RETRY."""
    if not is_uri(path):
        return resolve(path), None
    bucket, key = bucket_key(path)
    client = _s3(bucket, sdk_attempts(retry_seconds()), *_endpoint_and_region(), stall_seconds(REQUEST_TIMEOUT_S))
    return f"{bucket}/{key}".rstrip("/"), client


def stall_seconds(most: float) -> float:
    """A request's wait on a store that sends nothing: `most`, or a shorter RAYKIT_STORAGE_RETRY (a 3 s
    budget should not sit 20 s in one call), never under 5 s (a slow store is not a dead one)."""
    return min(most, max(5.0, retry_seconds()))


def s3_client():
    """boto3's S3 client, for what pyarrow cannot say: conditional writes and ETags (embed's commit).
    Its own retries are off: `retrying` around each call decides, and a commit's 412 after a lost
    reply must reach the caller (manifest.commit), not be retried away."""
    return _client(_endpoint_and_region()[0], stall_seconds(COMMIT_TIMEOUT_S))


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, read_timeout: float):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, config=Config(
        retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=read_timeout))


def sdk_attempts(seconds: float) -> int:
    """The AWS SDK's attempts whose backoff (25 ms doubling: 25 * (2^n - 2) ms in all) lasts `seconds`."""
    return max(3, math.ceil(math.log2(seconds / 0.025 + 2)))


def bucket_key(path: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI; one line when it names no bucket or another scheme."""
    if not str(path).startswith("s3://"):
        raise RaykitError(f"{path}: unsupported URI scheme; use a local path or s3://bucket/prefix")
    bucket, _, key = str(path)[len("s3://"):].partition("/")
    if not bucket:
        raise RaykitError(f"{path}: no bucket named; use s3://bucket/prefix")
    return bucket, key


def _endpoint_and_region() -> tuple[str | None, str | None]:
    return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))


@functools.lru_cache(maxsize=64)
def _s3(bucket: str, attempts: int, endpoint: str | None, region: str | None, stall: float) -> pafs.S3FileSystem:
    if not region and not endpoint:  # AWS itself: the bucket's region, as pyarrow.fs.FileSystem.from_uri finds it
        try:
            region = retrying(f"s3://{bucket}", pafs.resolve_s3_region, bucket)
        except OSError as e:
            raise RaykitError(f"s3://{bucket}: cannot find the bucket's region ({clean_error(e)}); set AWS_REGION") from None
    return _S3(attempts, endpoint, region or "us-east-1", stall)


class _S3(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with our retries and timeouts, kept when pickled: pyarrow's own
    pickling drops the retry strategy, and Ray ships Train's filesystem to its controller and workers
    (which would upload with the SDK's 3 attempts)."""

    def __init__(self, attempts: int, endpoint: str | None, region: str, stall: float):
        super().__init__(
            region=region,
            endpoint_override=endpoint,
            # 1 attempt: `retrying` retries our own calls (and logs it); Ray Train's client gets enough
            # attempts to last RAYKIT_STORAGE_RETRY (ray_storage).
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts),
            connect_timeout=5,
            request_timeout=stall,  # seconds without a byte moving: a stalled store, not a slow upload
        )
        self._args = (attempts, endpoint, region, stall)

    def __reduce__(self):
        return _S3, self._args


def transient(e: BaseException) -> bool:
    """Whether a storage error may pass by itself (a store down, stalled or throttling)."""
    if isinstance(e, (RaykitError, RunFailed)):  # ours, about the input or already final; its text may quote anything
        return False
    if type(e).__name__ in ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                            "ConnectTimeoutError", "ConnectionError"):  # botocore's, named to not import it here
        return True
    return isinstance(e, Exception) and any(marker in str(e) for marker in _TRANSIENT)


def outage(e: BaseException) -> str | None:
    """The storage error that ended a remote run (`e` from Ray Train or Ray Data, whose text holds
    the controller's or worker's error), in one line; None when storage was not the cause."""
    for line in str(e).splitlines():
        ours = re.search(r"storage did not answer for \S+ \((.*)\); what was written is kept", line)
        if ours:  # a worker's StorageUnavailable: the error inside it
            return ours.group(1)
        if any(marker in line for marker in _TRANSIENT):
            return clean_error(Exception(line.strip().split("; Details:")[0]))
    return None


def retrying(what: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), tried again with backoff (0.5 s doubling to 10 s) while it fails with a
    transient storage error, for RAYKIT_STORAGE_RETRY; then StorageUnavailable in one line."""
    started = deadline = None
    delay = 0.5
    while True:
        tried = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            if not transient(e):
                raise
            now = time.monotonic()
            if deadline is None and now < tried + retry_seconds():  # the outage began with the call that met it
                started, deadline = tried, tried + retry_seconds()
                log.warning(f"{what}: storage did not answer ({clean_error(e)}); retrying for up to "
                            f"{_minutes(deadline - now)} ({RETRY_ENV})")
            if deadline is None:  # one call outlasted the whole budget (a store that stalls)
                started, deadline = tried, now
            if now >= deadline:
                raise StorageUnavailable(
                    f"{what}: storage did not answer for {_minutes(now - started)} ({clean_error(e)}); what was "
                    f"written is kept: rerun the same command to resume (set {RETRY_ENV} to wait longer)") from None
            time.sleep(min(delay * random.uniform(0.8, 1.2), deadline - now))
            delay = min(delay * 2, 10.0)
            continue
        if started is not None:
            log.info(f"{what}: storage answered again after {_minutes(time.monotonic() - started)}")
        return result


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return _info(fs, p, path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = filesystem(path)
    return _info(fs, p, path).type == pafs.FileType.Directory


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)

    def read():
        with fs.open_input_stream(p) as f:
            return f.readall()

    try:
        return retrying(path, read)
    except FileNotFoundError:
        raise RaykitError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RaykitError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise RaykitError(f"{path}: cannot read ({clean_error(e)}); check the path and your AWS credentials") from None


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under a folder (recursively) whose names end with one of `suffixes`, sorted."""
    fs, p = filesystem(path)
    try:
        infos = retrying(path, fs.get_file_info, pafs.FileSelector(p, recursive=True))
    except OSError as e:
        raise RaykitError(f"{path}: cannot list ({clean_error(e)})") from None
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes))
    if is_uri(path):
        scheme = str(path).split("://", 1)[0]
        return [f"{scheme}://{f}" for f in found]
    return found


def put(path: str, data: bytes) -> None:
    """Write a whole file at once, the only way raykit writes one: on S3 a single PUT (the object
    appears complete or not at all, so a retried PUT is harmless); locally a temporary file renamed
    over the target."""
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    if is_uri(path):
        def upload():
            with fs.open_output_stream(p) as f:
                f.write(data)

        return _writing(path, upload)
    _writing(path, fs.create_dir, parent, recursive=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        os.unlink(tmp)  # a failed write leaves neither the file nor its temporary
        raise


def put_text(path: str, text: str) -> None:
    put(path, text.encode())


def copy_dir(src: str, dst: str) -> None:
    """Copy a local folder to a local path or URI, replacing what was there."""
    if not is_uri(dst):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        return
    fs, p = filesystem(dst)
    _writing(dst, fs.delete_dir_contents, p, missing_dir_ok=True)
    _writing(dst, pafs.copy_files, src, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def remove(path: str) -> None:
    """Delete a file or a folder (with what it holds), if it exists."""
    fs, p = filesystem(path)
    kind = _info(fs, p, path).type
    if kind == pafs.FileType.Directory:
        _writing(path, _gone_is_done, fs.delete_dir, p)
    elif kind == pafs.FileType.File:
        _writing(path, _gone_is_done, fs.delete_file, p)


def _gone_is_done(delete, p: str) -> None:
    """A delete that finds nothing there has nothing left to do: on S3, pyarrow deletes the object and
    then writes its folder's marker, and when that second request fails the retry finds the object
    already gone."""
    try:
        delete(p)
    except FileNotFoundError:
        pass


def save_png(fig, target: str) -> str:
    """Write a matplotlib figure (a report's plot) to a local path or s3:// URI as PNG, and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    put(target, buf.getvalue())
    return target


def _info(fs: pafs.FileSystem, p: str, shown: str) -> pafs.FileInfo:
    try:
        return retrying(shown, fs.get_file_info, p)
    except OSError as e:
        raise RaykitError(f"{shown}: cannot reach ({clean_error(e)}); check AWS_ENDPOINT_URL and credentials") from None


def _writing(path: str, fn, *args, **kwargs):
    """A write, retried; one that fails for good is one line naming the path (and the fix if a file is in the way)."""
    try:
        return retrying(path, fn, *args, **kwargs)
    except (NotADirectoryError, FileExistsError):
        raise RaykitError(f"{path}: a file is in the way of this path; remove it or choose another path") from None
    except PermissionError:
        raise RaykitError(f"{path}: permission denied; choose a path you can write") from None
    except OSError as e:
        raise RaykitError(f"{path}: cannot write ({clean_error(e)}); check the path and your AWS credentials") from None


def clean_error(e: Exception) -> str:
    """The first line of a storage error, with anything that looks like a secret removed."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        secret = os.environ.get(var)
        if secret:
            text = text.replace(secret, "***")
    return text
