"""The DuckDB catalog: ``atlas.duckdb`` with the tables, the current views and the aggregates.

DuckDB resolves relative file paths against the working directory, not the database file, so
views over Parquet paths would break when a results directory is moved. The catalog therefore
copies the Parquet parts into native tables (``<table>_all``: every scan ever written; a packed
table's lists in ``<table>_packed``, under a view ``<table>_all`` of one row per value) and puts
the views of :mod:`rlvr_ray.sql.views` on top, so ``duckdb DIR/atlas.duckdb`` works anywhere with
no rlvr-ray code. Parts are read through pyarrow datasets, so local paths and object storage
(``s3://``, no DuckDB extension needed) take the same path.

The atlas grows by what is new: it records the parts it holds (``_atlas_parts``), and
:func:`update` (the end of every scan) lists the part names, then deletes and reloads only the
scans that are new, changed (a rerun of a scan writes its parts again) or named by the caller,
in one transaction. Its cost follows what the scan wrote, not what the atlas holds. Writers take
``atlas.lock`` (a local results directory), so concurrent scans add their rows one after the
other; a reader that finds the atlas busy waits for the update to end. :func:`refresh` rebuilds
the whole atlas from every part (and is what runs when the tables' layout changed).

Object storage: the atlas lives next to the parts (``s3://.../atlas.duckdb``); a reader keeps a
copy in ``$RLVR_RAY_CACHE/atlas`` (default ``~/.cache/rlvr-ray/atlas``) and fetches it again only
when the stored one changed, so no connection builds anything (:mod:`rlvr_ray.io.atlas_file`:
the lock, the connection that waits out a writer, the copy). An update there fetches, updates
and uploads the file; object stores have no lock, but every update also loads whatever parts the
atlas lacks, so the next update heals an update lost to a concurrent one.

Current views: when a (group, run) was scanned more than once (say, a group gained a run), the
plain views (``tensors``, ``profiles``, ...) keep each run's latest scan and each group's latest
consistency; ``*_all`` keep history.

A part that cannot be loaded (truncated, corrupt, or of an incompatible schema) is moved aside to
``quarantine/`` under the same relative path, named in one line, and the load goes on without
it: one bad file never makes the rest unqueryable.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from rlvr_ray.io.atlas_file import (
    ATLAS,
    BUSY_WAIT_S,
    attach,
    cache_folder,
    cached,
    note_stamp,
    writer,
)
from rlvr_ray.io.results import (
    Merge,
    ResultsDir,
    atomic_write,
    open_results,
    scan_key,
    temp_path,
)
from rlvr_ray.io.schema import ALL_TABLES, CURRENT, PACKED, stored
from rlvr_ray.sql.views import views

#: the atlas's views: each table's current view, from its declared rule, and the aggregates
VIEWS = views(CURRENT, PACKED)

#: (tbl, name): the parts whose rows the atlas holds
PARTS = "_atlas_parts"
#: (key, value): the layout of the tables the atlas was built with
META = "_atlas_meta"
#: tables whose parts are not per scan (the watch's rounds): reloaded whole when one changes
WHOLE_TABLES = ("watch",)
QUARANTINE = "quarantine"

Warn = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"rlvr-ray: {msg}", file=sys.stderr)


def _unreadable(results: ResultsDir, table: str, part: str) -> str | None:
    """Why ``part`` cannot be loaded as a part of ``table`` (one line), or None when it can."""
    try:  # as the build reads it (a missing column reads as nulls)
        results.dataset(table, [part]).to_table()
        return None
    except (pa.ArrowException, OSError, ValueError) as e:
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _quarantine(results: ResultsDir, part: str, why: str, warn: Warn) -> None:
    rel = (
        os.path.relpath(part, results.root)
        if results.local
        else part[len(results.root) :].lstrip("/")
    )
    dest = results.path(QUARANTINE, rel)
    results.fs.create_dir(os.path.dirname(dest), recursive=True)
    results.fs.move(part, dest)
    warn(f"unreadable part {rel} moved to {QUARANTINE}/{rel} and left out of the atlas ({why})")


def layout() -> str:
    """A fingerprint of the tables' columns: an atlas built with another is rebuilt whole."""
    text = "\n".join(f"{t}: {schema}" for t, schema in ALL_TABLES.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load(
    con: duckdb.DuckDBPyConnection,
    results: ResultsDir,
    table: str,
    names: list[str],
    warn: Warn,
    quarantine: bool = True,
) -> tuple[list[str], int]:
    """Load the parts ``names`` of ``table`` into its native table (``<table>_all``, or
    ``<table>_packed``); -> (the names loaded, rows added). An unreadable part is quarantined
    and left out (with ``quarantine=False``, the error is raised)."""
    legacy: set[str] = set()  # parts of a packed table written one row per value
    for attempt in range(2):
        before = con.execute(f"SELECT count(*) FROM {stored(table)}").fetchall()[0][0]
        try:
            sources = results.scan_rows(table, names)
            paths = [p for p in sources if isinstance(p, str) and p not in legacy]
            tables = [t for t in sources if not isinstance(t, str) and t.num_rows]
            tables += [_packed(con, table, results, p) for p in sorted(legacy)]
            if paths:
                tables.insert(0, results.dataset(table, paths))
            if not tables:  # nothing to add (parts kept in memory, all empty)
                return names, 0
            _insert(con, table, tables)
            after = con.execute(f"SELECT count(*) FROM {stored(table)}").fetchall()[0][0]
            return names, after - before
        except (duckdb.Error, pa.ArrowException, OSError):
            if not quarantine:
                raise
            # a part that does not load: find which (only now, so a good load reads each footer
            # once), move it aside and load the rest. A part gone since the listing (merged into
            # its scan's part by a finished scan) is not damaged: it is left out quietly
            paths = [results.path("tables", table, n) for n in names]
            gone = {p for p in paths if not results.fs.get_file_info(p).is_file}
            bad = [
                (p, why) for p in paths if p not in gone and (why := _unreadable(results, table, p))
            ]
            legacy = {p for p, _ in bad if _unpacked_part(results, table, p)}
            bad = [(p, why) for p, why in bad if p not in legacy]
            if attempt or not (bad or gone or legacy):
                raise
            for p, why in bad:
                _quarantine(results, p, why, warn)
            left = {os.path.basename(p) for p in gone} | {os.path.basename(p) for p, _ in bad}
            names = [n for n in names if n not in left]
    raise AssertionError("unreachable")


def _unpacked_part(results: ResultsDir, table: str, part: str) -> bool:
    """Whether ``part`` holds ``table``'s rows one per value (``idx``, a scalar value column), as
    rlvr-ray wrote its packed tables before they were packed: they load packed."""
    if table not in PACKED:
        return False
    try:
        old = pq.read_schema(part, filesystem=results.fs)
    except (pa.ArrowException, OSError):
        return False
    value = PACKED[table]
    names = set(ALL_TABLES[table].names) | {"idx"}
    return set(old.names) == names and not pa.types.is_list(old.field(value).type)


def _packed(con: duckdb.DuckDBPyConnection, table: str, results: ResultsDir, part: str):
    """The rows of an unpacked part (see :func:`_unpacked_part`) of ``table``, packed."""
    schema, value = ALL_TABLES[table], PACKED[table]
    keys = ", ".join(n for n in schema.names if n != value)
    con.register("_unpacked", pq.read_table(part, filesystem=results.fs))
    try:
        rows = con.sql(
            f"SELECT {keys}, list({value} ORDER BY idx) AS {value} FROM _unpacked GROUP BY ALL"
        ).to_arrow_table()
    finally:
        con.unregister("_unpacked")
    return rows.cast(schema)


def _insert(con: duckdb.DuckDBPyConnection, table: str, sources: list) -> None:
    """Insert the rows of every source (datasets, tables) in one statement: all or nothing."""
    if not sources:
        return
    for i, src in enumerate(sources):
        con.register(f"_src{i}", src)
    try:
        union = " UNION ALL ".join(f"SELECT * FROM _src{i}" for i in range(len(sources)))
        con.execute(f"INSERT INTO {stored(table)} {union}")
    finally:
        for i in range(len(sources)):
            con.unregister(f"_src{i}")


def build(con: duckdb.DuckDBPyConnection, results: ResultsDir, warn: Warn = _stderr) -> None:
    """Create every table and view in ``con`` and load every part; an unreadable part is moved
    to ``quarantine/`` and ``warn`` gets one line naming it."""

    def create_and_fill(quarantine: bool) -> None:
        _create(con)
        _fill(con, results, warn, quarantine)

    _one_transaction(con, create_and_fill)


def fill(
    con: duckdb.DuckDBPyConnection,
    results: ResultsDir,
    warn: Warn = _stderr,
    merges: Iterable[Merge] = (),
) -> None:
    """Load every part into the empty atlas in ``con`` (:func:`_create`'s tables, as
    :class:`Blank` makes them), as :func:`build` does. ``merges``: scans' parts to merge
    (:meth:`ResultsDir.merge_scan`): with the parts kept in memory, written in a thread while
    the rows load from memory under the merged parts' names, else written first (a merge then
    reads the parts it merges); both are done when this returns, and an error of either is
    raised. (A merge is ~0.05 s of a 1.5B pair's scan, the load and commit ~0.1 s: both work
    with Python's lock released.)"""
    merges = list(merges)
    if results.kept is None:
        for merge in merges:
            merge.write()
        merges = []
    if not merges:
        _one_transaction(con, lambda quarantine: _fill(con, results, warn, quarantine))
        return
    listing = {}
    for table in ALL_TABLES:
        listing[table] = results.part_names(table)
        for merge in merges:
            listing[table] = merge.names(table, listing[table])
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlvr-merge") as pool:
        writing = pool.submit(lambda: [merge.write() for merge in merges])

        def load(quarantine: bool) -> None:
            if quarantine:  # part by part, from the files: once they are all written
                writing.result()
                _fill(con, results, warn, quarantine)
            else:
                _fill(con, results, warn, quarantine, listing)

        try:
            _one_transaction(con, load)
        finally:
            writing.result()


def _one_transaction(con: duckdb.DuckDBPyConnection, load: Callable[[bool], object]):
    """``load(quarantine=False)`` in one transaction, one commit; -> what it returned. A part
    that does not load aborts it, and ``load(quarantine=True)`` runs statement by statement
    (each load its own commit), quarantining that part. A commit that fails (a full disk)
    raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        done = load(False)
    except (duckdb.Error, pa.ArrowException, OSError):
        con.execute("ROLLBACK")
        return load(True)
    _commit(con)
    return done


def _commit(con: duckdb.DuckDBPyConnection) -> None:
    """Commit the transaction open in ``con`` as a checkpoint of the atlas: its rows are written
    into the file once, not first into the write-ahead log and again by the checkpoint that
    follows every update (a 1.5B run's rows: 8.7 MB of log, 0.1 -> 0.07 s)."""
    con.execute("SET checkpoint_threshold = '0b'")  # a commit past it checkpoints, log unwritten
    try:
        con.execute("COMMIT")
    finally:
        con.execute("RESET checkpoint_threshold")


def _create(con: duckdb.DuckDBPyConnection) -> None:
    """The atlas's tables, empty, and its views."""
    con.execute(f"CREATE TABLE {META} (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute(f"INSERT INTO {META} VALUES ('layout', ?)", [layout()])
    con.execute(f"CREATE TABLE {PARTS} (tbl VARCHAR, name VARCHAR)")
    for table, schema in ALL_TABLES.items():
        con.register("_empty", schema.empty_table())
        try:
            con.execute(f"CREATE TABLE {stored(table)} AS SELECT * FROM _empty")
        finally:
            con.unregister("_empty")
    _views(con)


def _fill(
    con: duckdb.DuckDBPyConnection,
    results: ResultsDir,
    warn: Warn,
    quarantine: bool,
    listing: dict[str, list[str]] | None = None,
):
    """Load every table's parts (``listing``: table -> their names; else listed now)."""
    loaded: dict[str, list[str]] = {}
    for table in ALL_TABLES:
        names = listing[table] if listing is not None else results.part_names(table)
        loaded[table], _ = _load(con, results, table, names, warn, quarantine=quarantine)
    _record(con, loaded)


def _record(con: duckdb.DuckDBPyConnection, loaded: dict[str, list[str]]) -> None:
    """Record the parts each table holds (table -> the names of its parts loaded)."""
    tables = [t for t, names in loaded.items() for _ in names]
    rows = pa.table(
        {
            "tbl": pa.array(tables, pa.string()),
            "name": pa.array([n for names in loaded.values() for n in names], pa.string()),
        }
    )
    con.register("_names", rows)
    try:
        con.execute(f"INSERT INTO {PARTS} SELECT * FROM _names")
    finally:
        con.unregister("_names")


def _views_version() -> str:
    return hashlib.sha256(repr(sorted(VIEWS.items())).encode()).hexdigest()[:16]


def _views(con: duckdb.DuckDBPyConnection) -> None:
    """(Re)create the views when the atlas has none or other ones (a newer rlvr-ray)."""
    have = con.execute(f"SELECT value FROM {META} WHERE key = 'views'").fetchall()
    if have == [(_views_version(),)]:
        return
    for name, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
    con.execute(f"INSERT OR REPLACE INTO {META} VALUES ('views', ?)", [_views_version()])


def sync(
    con: duckdb.DuckDBPyConnection,
    results: ResultsDir,
    scan_ids: Iterable[str] = (),
    warn: Warn = _stderr,
    quarantine: bool = True,
) -> dict[str, int]:
    """Bring the atlas in ``con`` up to the parts: reload every scan named in ``scan_ids`` or
    with a part added or removed since the atlas last saw it (only their parts are read), and a
    whole-table table (the watch) when one of its parts changed; -> {"scans", "parts", "rows"}:
    the scans reloaded, the parts read and the rows added.

    Run inside a transaction (:func:`update`) with ``quarantine=False``: a part that does not
    load raises. Outside one, each statement commits on its own (a failed load rolls back alone
    and its bad part is quarantined), and the order (rows, then the record of parts) makes an
    interrupted sync whole again at the next one: a part not recorded is new to it, and its
    scan is reloaded."""
    listing = {t: results.part_names(t) for t in ALL_TABLES}
    changed = _changed(con, listing)  # in DuckDB: the atlas may hold a million names
    keys = set(scan_ids) | {scan_key(n) for t, n in changed if t not in WHOLE_TABLES}
    done = {"scans": len(keys), "parts": 0, "rows": 0}
    for table in ALL_TABLES:
        if table in WHOLE_TABLES:
            if not any(t == table for t, _ in changed):
                continue
            names = listing[table]
            con.execute(f"DELETE FROM {stored(table)}")
            con.execute(f"DELETE FROM {PARTS} WHERE tbl = ?", [table])
        else:
            names = _of_scans(listing[table], keys)
            old = con.execute(
                f"SELECT name FROM {PARTS} WHERE tbl = ? AND list_contains(?, {_SCAN_OF_NAME})",
                [table, sorted(keys)],
            ).fetchall()
            if not names and not old:
                continue
            con.execute(
                f"DELETE FROM {stored(table)} WHERE scan_id IN (SELECT unnest(?))", [sorted(keys)]
            )
            con.execute(
                f"DELETE FROM {PARTS} WHERE tbl = ? AND list_contains(?, name)",
                [table, [n for (n,) in old]],
            )
        loaded, rows = _load(con, results, table, names, warn, quarantine=quarantine)
        _record(con, {table: loaded})
        done["parts"] += len(loaded)
        done["rows"] += rows
    return done


#: SQL of :func:`rlvr_ray.io.results.scan_key` on the column ``name``
_SCAN_OF_NAME = "split_part(regexp_replace(name, '\\.parquet$', ''), '-', 1)"


def _changed(con: duckdb.DuckDBPyConnection, listing: dict[str, list[str]]) -> list[tuple]:
    """(table, name) of the parts listed but not held by the atlas, and held but not listed."""
    tables = [t for t, names in listing.items() for _ in names]
    names = [n for ns in listing.values() for n in ns]
    con.register(
        "_listing",
        pa.table({"tbl": pa.array(tables, pa.string()), "name": pa.array(names, pa.string())}),
    )
    try:
        return con.execute(
            f"(SELECT tbl, name FROM _listing EXCEPT SELECT tbl, name FROM {PARTS}) UNION ALL "
            f"(SELECT tbl, name FROM {PARTS} EXCEPT SELECT tbl, name FROM _listing)"
        ).fetchall()
    finally:
        con.unregister("_listing")


def _of_scans(names: list[str], keys: set[str]) -> list[str]:
    """The names (sorted) of parts of the scans ``keys``, found by bisection, not a pass."""
    found = []
    for key in sorted(keys):
        i = bisect.bisect_left(names, key)
        while i < len(names) and names[i].startswith(key):
            if scan_key(names[i]) == key:
                found.append(names[i])
            i += 1
    return found


def _fast_inserts(con: duckdb.DuckDBPyConnection) -> None:
    """Let ``con``'s inserts fill a table on every thread, in no particular row order (the
    views order what they show; it made loading a 1.5B run's profiles 2.3x faster on 2 cores
    when they were 1.3 M rows, before they were packed)."""
    con.execute("SET preserve_insertion_order = false")


def _build_file(results: ResultsDir, warn: Warn) -> Callable[[str], None]:
    def write(path: str) -> None:
        con = attach(path, new=True)
        _fast_inserts(con)
        try:
            build(con, results, warn)
            con.execute("CHECKPOINT atlas")
        finally:
            con.close()

    return write


def refresh(out: str | Path | ResultsDir, warn: Warn = _stderr) -> str:
    """(Re)build DIR/atlas.duckdb from every Parquet part; -> its path or URI. Unreadable parts
    are quarantined (see :func:`build`), each reported to ``warn`` in one line."""
    results = open_results(out)
    with writer(results):
        return results.write_file(ATLAS, _build_file(results, warn))


class Blank:
    """An empty atlas (every table and view, no rows) made in a thread while a scan runs, at a
    temporary name next to a local results directory's atlas: a scan that finds none there
    fills this one at its end (:func:`update`) rather than creating the tables and views then
    (~0.1 s of a first scan's end; DuckDB works with Python's lock released, so it costs the
    scan next to nothing). Unused, :meth:`discard` removes it."""

    #: made only where the disk has this much room: on a fuller one the units' parts come first
    MIN_FREE_BYTES = 256 << 20

    @classmethod
    def for_scan(cls, results: ResultsDir) -> Blank | None:
        """A Blank for a scan into ``results``: a local directory without an atlas, on a disk
        with room; else None."""
        if not results.local or results.exists(ATLAS):
            return None
        try:
            disk = os.statvfs(results.root)
        except OSError:
            return None
        return cls(results) if disk.f_bavail * disk.f_frsize >= cls.MIN_FREE_BYTES else None

    def __init__(self, results: ResultsDir):
        self.path = temp_path(results.path(ATLAS))
        self._con: duckdb.DuckDBPyConnection | None = None
        self._thread = threading.Thread(target=self._make, name="rlvr-atlas", daemon=True)
        self._thread.start()

    def _make(self) -> None:
        con = None
        try:
            con = attach(self.path, new=True)
            _fast_inserts(con)
            con.execute("BEGIN TRANSACTION")
            _create(con)
            con.execute("COMMIT")
            self._con = con
        except (duckdb.Error, OSError):  # a full disk: the units' parts come first
            if con is not None:
                con.close()
            self._remove()  # the scan's end builds the atlas as it would without

    def _remove(self) -> None:
        for f in (self.path, f"{self.path}.wal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)

    def take(self) -> duckdb.DuckDBPyConnection | None:
        """The connection to the empty atlas (the caller's from now on), or None when it could
        not be made."""
        self._thread.join()
        con, self._con = self._con, None
        return con

    def discard(self) -> None:
        """Close and remove the atlas, unless it was taken and moved into place."""
        con = self.take()
        if con is not None:
            con.close()
        self._remove()


class _OtherLayout(Exception):
    """The atlas was built with other tables (or before the table of parts): rebuild it."""


def update(
    out: str | Path | ResultsDir,
    scan_ids: Iterable[str] = (),
    warn: Warn = _stderr,
    merge: Iterable[str] = (),
    blank: Blank | None = None,
) -> dict[str, int]:
    """Add what is new to the atlas (see :func:`sync`: the scans ``scan_ids`` are reloaded
    whatever the atlas holds, as a rerun rewrites its parts); builds it whole when there is none
    or it was built with other tables (into ``blank``, a :class:`Blank` of a local ``out``, when
    there is none: the caller discards it after). ``merge``: finished scans whose unit parts are
    merged into one part per table (:meth:`ResultsDir.compact_scan`) under the same lock as the
    load, so no other writer lists a part that is about to go: first, or, into a new atlas from
    parts kept in memory, while it loads (:func:`fill`). -> what :func:`sync` did ({} after a
    whole build)."""
    results = open_results(out)

    def apply(path: str | os.PathLike, wait: float = BUSY_WAIT_S) -> dict[str, int]:
        con = attach(path, wait=wait)
        _fast_inserts(con)
        try:
            if _layout_of(con) != layout():
                raise _OtherLayout
            # one transaction (one commit, readers never see half of it)
            done = _one_transaction(
                con, lambda quarantine: sync(con, results, scan_ids, warn, quarantine)
            )
            _views(con)
            con.execute("CHECKPOINT atlas")
            return done
        finally:
            con.close()

    with writer(results):
        merges = [results.merge_scan(scan_id) for scan_id in merge]
        local = Path(results.path(ATLAS)) if results.local else cached(results)
        con = None
        if local is not None and not local.exists() and blank is not None and results.local:
            con = blank.take()
        if con is not None:
            try:
                fill(con, results, warn, merges)
                con.execute("CHECKPOINT atlas")
            finally:
                con.close()
            os.replace(blank.path, local)
            return {}
        for m in merges:
            m.write()
        try:
            if local is None or not local.exists():
                raise _OtherLayout
            if not results.local:
                try:
                    done = apply(local)
                    results.write_file(ATLAS, lambda p: shutil.copyfile(local, p))
                except BaseException:  # the copy is no longer the stored file: fetch it again
                    (cache_folder(results) / "stamp").unlink(missing_ok=True)
                    raise
                note_stamp(results)  # the local copy is now the stored file
                return done
            try:
                return apply(local, wait=1.0)
            except duckdb.IOException as e:
                if "lock" not in str(e).lower():
                    raise
            # a reader holds the file open (a `duckdb` session, a report): update a copy
            done: dict[str, int] = {}

            def copy_and_apply(tmp: str) -> None:
                shutil.copyfile(local, tmp)
                done.update(apply(tmp))

            atomic_write(local, copy_and_apply)
            return done
        except _OtherLayout:
            results.write_file(ATLAS, _build_file(results, warn))
            return {}


def _layout_of(con: duckdb.DuckDBPyConnection) -> str | None:
    try:
        rows = con.execute(f"SELECT value FROM {META} WHERE key = 'layout'").fetchall()
    except duckdb.CatalogException:  # an atlas from before the table of parts
        return None
    return rows[0][0] if rows else None


class QueryError(ValueError):
    """A query the catalog refuses before running it (more than one statement)."""


def _lock(con: duckdb.DuckDBPyConnection) -> None:
    """Leave ``con`` able to read its catalog and nothing else. The tables are native (copied
    from the parts), so no view reads a file at query time; with external access off, no
    statement reads or writes another file (COPY, read_csv, ATTACH, EXPORT), installs or loads
    an extension, or reaches the network, and the locked configuration cannot be set back."""
    con.execute("SET temp_directory = ''")  # its directory would stay writable to COPY
    con.execute("SET python_enable_replacements = false")  # no Python variable as a table
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def connect(
    out: str | Path | ResultsDir, *, external_access: bool = True
) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the atlas of ``out`` (object storage: to its local copy, see
    the module docstring); builds it when the results have none yet.

    ``external_access=False`` (``rlvr-ray sql`` and ``summary``): the connection reads the
    atlas and nothing else (see :func:`_lock`). The atlas is attached read-only to a private
    in-memory database, so locking it leaves other connections to the file alone."""
    results = open_results(out)
    path = Path(results.path(ATLAS)) if results.local else cached(results)
    if path is None or not path.exists():
        if not results.exists("tables"):
            raise FileNotFoundError(f"{results.uri}: no results here (no tables/ directory)")
        refresh(results)
        path = Path(results.path(ATLAS)) if results.local else cached(results)
    con = attach(path, read_only=True)
    if not external_access:
        _lock(con)
    return con


def run(con: duckdb.DuckDBPyConnection, sql: str, params=None) -> tuple[list[str], list[tuple]]:
    """Run ``sql``, one statement, on ``con`` -> (column names, rows)."""
    n = len(con.extract_statements(sql))
    if n != 1:
        raise QueryError(f"one SQL statement per query, got {n}")
    cur = con.execute(sql, params or [])
    if cur.description is None:  # a statement without a result (SET, USE)
        return [], []
    return [d[0] for d in cur.description], cur.fetchall()


def query(
    out: str | Path | ResultsDir, sql: str, params=None, *, external_access: bool = True
) -> tuple[list[str], list[tuple]]:
    """Run ``sql``, one statement, on the atlas of ``out`` -> (column names, rows).
    ``external_access=False``: as in :func:`connect`."""
    con = connect(out, external_access=external_access)
    try:
        return run(con, sql, params)
    finally:
        con.close()
