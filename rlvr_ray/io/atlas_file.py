"""The atlas's file: one writer at a time, a connection that waits out a writer, and the local
copy of an atlas kept on object storage.

``atlas.duckdb`` lives next to the parts. A local results directory serializes writers with
``atlas.lock``; on object storage a reader keeps a copy in ``$RLVR_RAY_CACHE/atlas`` (default
``~/.cache/rlvr-ray/atlas``), fetched again only when the stored file changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path

import duckdb
import pyarrow.fs as pafs

from rlvr_ray.io.results import ResultsDir, atomic_write

ATLAS = "atlas.duckdb"
#: the storage format every DuckDB 1.x reader (the `duckdb` CLI) opens
STORAGE_VERSION = "v1.0.0"
#: how long a connection waits for another process's update of the atlas to end
BUSY_WAIT_S = 60.0
_LOCK = "atlas.lock"


@contextlib.contextmanager
def writer(results: ResultsDir):
    """One writer of the atlas at a time (a local results directory: ``atlas.lock``)."""
    if not results.local:
        yield
        return
    os.makedirs(results.root, exist_ok=True)
    with open(results.path(_LOCK), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def attach(
    path: str | os.PathLike,
    *,
    read_only: bool = False,
    new: bool = False,
    wait: float = BUSY_WAIT_S,
) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the atlas at ``path`` attached (and in use); waits up to
    ``wait`` seconds while another process holds the file (an update in progress)."""
    quoted = str(Path(path).resolve()).replace("'", "''")
    # the storage format every DuckDB 1.x reader (the `duckdb` CLI) opens
    option = (
        f" (STORAGE_VERSION '{STORAGE_VERSION}')" if new else " (READ_ONLY)" if read_only else ""
    )
    deadline = time.monotonic() + wait
    pause = 0.02
    while True:
        con = duckdb.connect()
        try:
            con.execute(f"ATTACH '{quoted}' AS atlas{option}")
            con.execute("USE atlas")
            return con
        except duckdb.IOException as e:
            con.close()
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def cache_folder(results: ResultsDir) -> Path:
    root = os.environ.get("RLVR_RAY_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache/rlvr-ray"
    return base / "atlas" / hashlib.sha256(results.uri.encode()).hexdigest()[:16]


def stored_stamp(results: ResultsDir) -> str | None:
    """The stored atlas's size and modification time, or None when there is none."""
    info = results.fs.get_file_info(results.path(ATLAS))
    return None if info.type == pafs.FileType.NotFound else f"{info.size} {info.mtime_ns}"


def note_stamp(results: ResultsDir) -> None:
    stamp = stored_stamp(results) or ""
    atomic_write(cache_folder(results) / "stamp", lambda p: Path(p).write_text(stamp))


def cached(results: ResultsDir) -> Path | None:
    """Object storage: the local copy of the stored atlas, fetched only when the stored one
    changed (its size or modification time); None when there is none."""
    want = stored_stamp(results)
    if want is None:
        return None
    folder = cache_folder(results)
    local, stamp = folder / ATLAS, folder / "stamp"
    if not (local.exists() and stamp.exists() and stamp.read_text() == want):
        results.read_file(ATLAS, str(local))
        atomic_write(stamp, lambda p: Path(p).write_text(want))
    return local
