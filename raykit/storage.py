"""Where things live: local paths and s3:// URIs behind one small API.

S3 endpoint and credentials come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), so the same job runs against AWS, MinIO or
SeaweedFS. pyarrow's filesystem reads them; we never read, log or store them ourselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from raykit.errors import RaykitError


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> str:
    """An absolute local path, or the URI unchanged (Ray's storage_path wants absolute paths)."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `path` and the path inside it."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), resolve(path)
    if not str(path).startswith("s3://"):
        raise RaykitError(f"{path}: unsupported URI scheme; use a local path or s3://bucket/prefix")
    try:
        return pafs.FileSystem.from_uri(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types here
        raise RaykitError(f"{path}: cannot open S3 location ({clean_error(e)}); check AWS_ENDPOINT_URL and AWS_REGION") from None


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return _info(fs, p, path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = filesystem(path)
    return _info(fs, p, path).type == pafs.FileType.Directory


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.readall()
    except FileNotFoundError:
        raise RaykitError(f"{path}: no such file") from None
    except OSError as e:
        raise RaykitError(f"{path}: cannot read ({clean_error(e)}); check the path and your AWS credentials") from None


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under a folder (recursively) whose names end with one of `suffixes`, sorted."""
    fs, p = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    except OSError as e:
        raise RaykitError(f"{path}: cannot list ({clean_error(e)})") from None
    found = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes))
    if is_uri(path):
        scheme = str(path).split("://", 1)[0]
        return [f"{scheme}://{f}" for f in found]
    return found


def put(path: str, data: bytes) -> None:
    """Write a whole file at once, the only way raykit writes one: on S3 a single PUT (the object
    appears complete or not at all); locally a temporary file renamed over the target."""
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if is_uri(path):
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
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
    fs.delete_dir_contents(p, missing_dir_ok=True)
    pafs.copy_files(src, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def local_copy(uri: str) -> str:
    """A local folder holding what `uri` (a folder in object storage) holds: a model for from_pretrained.

    Cached under ~/.cache/raykit (XDG_CACHE_HOME) by the URI and its listing (names, sizes, times), so
    a model rewritten in place is fetched again; each node fetches once. The copy appears by rename:
    a reader sees a whole folder or none.
    """
    fs, p = filesystem(uri)
    try:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(p, recursive=True)) if i.type == pafs.FileType.File]
    except FileNotFoundError:
        infos = []
    except OSError as e:
        raise RaykitError(f"{uri}: cannot list ({clean_error(e)}); check the path and your AWS credentials") from None
    if not infos:
        raise RaykitError(f"{uri}: no such folder (or it is empty)")
    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos)
    key = hashlib.sha256(json.dumps([uri, listing], default=str).encode()).hexdigest()[:24]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "raykit", "remote")
    target = cache / key
    if target.is_dir():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
    try:
        pafs.copy_files(p, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.is_dir():  # another process on this node finished the same copy first
            return str(target)
        raise RaykitError(f"{uri}: cannot download ({clean_error(e)})") from None
    return str(target)


def remove(path: str) -> None:
    """Delete a file or a folder (with what it holds), if it exists."""
    fs, p = filesystem(path)
    kind = _info(fs, p, path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


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
        return fs.get_file_info(p)
    except OSError as e:
        raise RaykitError(f"{shown}: cannot reach ({clean_error(e)}); check AWS_ENDPOINT_URL and credentials") from None


def clean_error(e: Exception) -> str:
    """The first line of a storage error, with anything that looks like a secret removed."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        secret = os.environ.get(var)
        if secret:
            text = text.replace(secret, "***")
    return text
