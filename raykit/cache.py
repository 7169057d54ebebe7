"""Remote folders on local disk: a model or dataset in object storage, fetched once per node and
version into ~/.cache/raykit, for libraries that read only local folders (from_pretrained,
load_from_disk)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from raykit.errors import RaykitError, StorageUnavailable
from raykit.storage import clean_error, filesystem, retrying


def local_copy(uri: str) -> str:
    """A local folder holding what `uri` (a folder in object storage) holds: a model for from_pretrained.

    Cached under ~/.cache/raykit (XDG_CACHE_HOME) by the URI and its listing (names, sizes, times), so
    a model rewritten in place is fetched again; each node fetches once. The copy appears by rename:
    a reader sees a whole folder or none.
    """
    fs, p = filesystem(uri)
    try:
        infos = retrying(uri, fs.get_file_info, pafs.FileSelector(p, recursive=True))
        infos = [i for i in infos if i.type == pafs.FileType.File]
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
        retrying(uri, pafs.copy_files, p, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, target)
    except (OSError, StorageUnavailable) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.is_dir():  # another process on this node finished the same copy first
            return str(target)
        if isinstance(e, StorageUnavailable):
            raise
        raise RaykitError(f"{uri}: cannot download ({clean_error(e)})") from None
    return str(target)
