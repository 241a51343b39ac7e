"""The results directory: atomic, deterministic Parquet parts and unit completion markers.

Layout (a local path, or a pyarrow-supported URI such as ``s3://bucket/prefix``)::

    tables/<table>/<scan_id>-<unit>.parquet   per-unit parts (scan tables: <scan_id>.parquet)
    units/<scan_id>/<unit>.json               written last: the unit is complete
    cache/<base fingerprint>/...              reusable base decompositions
    atlas.duckdb                              DuckDB catalog (rlvr_ray.io.catalog)

A part is written to a temporary name and renamed into place (object stores: serialized in
memory, then one PUT, which is atomic), under a name fixed by the work unit, so a retried unit
replaces its own parts. Once every unit of a scan is done, :meth:`ResultsDir.compact_scan`
merges each table's unit parts into one part per table per scan, ``<scan_id>.parquet``, which
records the rows of each unit: a unit redone later (a lost marker, ``--force``) writes its unit
part again, which then stands in for that unit's rows of the merged part until the next
compaction. So a results directory holds a few files per scan, whatever the size of the model.

Object storage: any URI pyarrow understands. S3 and S3-compatible stores (MinIO, Ceph, moto)
take their settings from the usual AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, and AWS_ENDPOINT_URL for a custom endpoint) or from the URI itself:
``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``. The URI travels to the Ray
workers unchanged; :func:`storage_env` lists the non-secret variables the driver forwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rlvr_ray.io.schema import ALL_TABLES, TABLES

#: settings forwarded to Ray workers so they reach the same store as the driver. Secrets are
#: not: runtime_env is visible in the dashboard; give nodes credentials their own way (instance
#: profile, IRSA, a Kubernetes secret in the pod env).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)
#: forwarded only when RLVR_RAY_FORWARD_AWS_CREDENTIALS=1 (a single-user cluster, a test)
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: zstd where it pays, on the maps' floats (-30% against lz4); elsewhere lz4: as small on the
#: tables of a few rows and many columns, in half the time
_COMPRESSION = {"maps": "zstd"}


#: a merged part is written in row groups of this many bytes of units' rows (or one unit's)
MERGE_BATCH_BYTES = 64 << 20
#: key-value metadata of a merged part: JSON list of [unit, rows], in the order of its rows
UNITS_KEY = "rlvr_ray.units"


def temp_path(final: str | os.PathLike) -> str:
    """A new temporary name next to the local file ``final``, hidden from listings of parts
    (a leading dot): what is written there is renamed to ``final`` once whole."""
    folder, name = os.path.split(os.fspath(final))
    return os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")


def atomic_write(final: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` with a temporary name next to the local file ``final``, then rename
    it into place: a reader sees the old file or the new one, never part of one, and a failed
    write leaves nothing behind. Every local file this package replaces goes through here."""
    final = os.fspath(final)
    os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
    tmp = temp_path(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def scan_key(part: str) -> str:
    """The scan a part belongs to, from its file name: ``<scan_id>[-<unit>].parquet``."""
    return os.path.basename(part).removesuffix(".parquet").split("-", 1)[0]


def unit_of(part: str) -> int | None:
    """The unit of a unit part (``<scan_id>-<unit>.parquet``), else None."""
    _, _, unit = os.path.basename(part).removesuffix(".parquet").partition("-")
    return int(unit) if unit.isdigit() else None


def _parquet_options(table: str) -> dict:
    """How a part of ``table`` is written (``pq.write_table`` / ``pq.ParquetWriter`` options)."""
    schema = ALL_TABLES[table]
    return {
        "compression": _COMPRESSION.get(table, "lz4"),
        # dictionaries for the (repetitive) string columns only
        "use_dictionary": [f.name for f in schema if pa.types.is_string(f.type)],
    }


def storage_env(uri: str) -> dict[str, str]:
    """Object-store settings of this process that workers writing to ``uri`` need."""
    if "://" not in uri or uri.startswith("file://"):
        return {}
    names = FORWARDED_ENV
    if os.environ.get("RLVR_RAY_FORWARD_AWS_CREDENTIALS") == "1":
        names += CREDENTIAL_ENV
    return {k: os.environ[k] for k in names if os.environ.get(k)}


def open_results(out: str | os.PathLike | ResultsDir) -> ResultsDir:
    """``out`` as a :class:`ResultsDir` (itself when it is one): a command opens its results
    directory once and passes it down."""
    return out if isinstance(out, ResultsDir) else ResultsDir(out)


class ResultsDir:
    """A results directory on the local disk or any pyarrow filesystem."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        if "://" in uri and not uri.startswith("file://"):
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
            self.local = False
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = str(Path(uri.removeprefix("file://")).expanduser().resolve())
            self.local = True
        self.uri = uri if not self.local else self.root
        #: part path -> the rows this object wrote there, while :meth:`keep_parts` is on
        self.kept: dict[str, pa.Table] | None = None

    @contextlib.contextmanager
    def keeping_parts(self, keep: bool = True):
        """While open, keep the parts written (:meth:`keep_parts`, when ``keep``); then drop
        them."""
        if keep:
            self.keep_parts()
        try:
            yield self
        finally:
            self.forget_parts()

    def keep_parts(self) -> None:
        """Keep in memory the rows of every part written through this object from now on, so
        that merging a scan's parts and loading them into the atlas read none back: for a scan
        whose units run in this process (they share this object), whose parts are small."""
        self.kept = {}

    def forget_parts(self) -> None:
        """Stop keeping parts in memory, and drop those kept."""
        self.kept = None

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def ensure(self) -> None:
        try:
            for table in ALL_TABLES:
                self.fs.create_dir(self.path("tables", table), recursive=True)
            self.fs.create_dir(self.path("units"), recursive=True)
        except OSError as e:
            raise OSError(f"results {self.uri}: cannot create the results directory: {e}") from None

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def _put(self, final: str, write) -> None:
        if self.local:
            atomic_write(final, write)
        else:
            # serialize locally first: a failure mid-write never leaves a partial object
            buf = pa.BufferOutputStream()
            write(buf)
            body = buf.getvalue()
            with self.fs.open_output_stream(final) as f:
                f.write(body)

    def write_table(self, table: str, part: str, data: pa.Table) -> str:
        """Write ``data`` (cast to the declared schema) as tables/<table>/<part>.parquet."""
        schema = ALL_TABLES[table]
        if data.schema != schema:
            data = data.cast(schema)
        final = self.path("tables", table, f"{part}.parquet")
        options = _parquet_options(table)
        self._put(
            final,
            lambda p: pq.write_table(
                data, p, filesystem=self.fs if isinstance(p, str) else None, **options
            ),
        )
        if self.kept is not None:
            self.kept[final] = data
        return final

    def write_bytes(self, rel: str, body: bytes) -> None:
        """Write ``body`` to ``rel`` atomically (temporary name + rename; object stores: a PUT)."""
        final = self.path(rel)

        def write(p) -> None:
            if not isinstance(p, str):  # an in-memory stream (object storage)
                p.write(body)
                return
            with self.fs.open_output_stream(p) as f:
                f.write(body)

        self.fs.create_dir(os.path.dirname(final), recursive=True)
        self._put(final, write)

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError):
            return None

    def parts(self, table: str) -> list[str]:
        sel = pafs.FileSelector(self.path("tables", table), allow_not_found=True)
        return sorted(
            i.path
            for i in self.fs.get_file_info(sel)
            if i.path.endswith(".parquet") and not os.path.basename(i.path).startswith(".")
        )

    def unit_done(self, scan_id: str, unit: int) -> bool:
        return self.exists("units", scan_id, f"{unit:05d}.json")

    def mark_unit_done(self, scan_id: str, unit: int, report: dict) -> None:
        self.write_json(f"units/{scan_id}/{unit:05d}.json", report)

    def units_done(self, scan_id: str) -> set[int]:
        """The units of ``scan_id`` marked done (one listing)."""
        sel = pafs.FileSelector(self.path("units", scan_id), allow_not_found=True)
        names = [os.path.basename(i.path).removesuffix(".json") for i in self.fs.get_file_info(sel)]
        return {int(n) for n in names if n.isdigit()}

    def part_names(self, table: str) -> list[str]:
        """The file names of ``table``'s parts (a listing of names: no file is opened)."""
        if self.local:
            try:
                names = os.listdir(self.path("tables", table))
            except FileNotFoundError:
                return []
        else:
            sel = pafs.FileSelector(self.path("tables", table), allow_not_found=True)
            names = [os.path.basename(i.path) for i in self.fs.get_file_info(sel)]
        return sorted(n for n in names if n.endswith(".parquet") and not n.startswith("."))

    def write_file(self, rel: str, write: Callable[[str], None]) -> str:
        """Have ``write(path)`` write a local file that becomes ``rel`` atomically (local: renamed
        into place; object stores: uploaded from a temporary directory in one PUT)."""
        final = self.path(rel)
        if self.local:
            atomic_write(final, write)
            return final
        with tempfile.TemporaryDirectory(prefix="rlvr-ray-") as tmp:
            local = os.path.join(tmp, os.path.basename(rel))
            write(local)
            self.fs.create_dir(os.path.dirname(final), recursive=True)
            with open(local, "rb") as src, self.fs.open_output_stream(final) as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        return final

    def read_file(self, rel: str, dest: str) -> None:
        """Copy ``rel`` to the local file ``dest`` (atomically)."""

        def copy(tmp: str) -> None:
            with self.fs.open_input_stream(self.path(rel)) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)

        atomic_write(dest, copy)

    def scan_rows(self, table: str, names: list[str]) -> list[str | pa.Table]:
        """What the parts ``names`` of ``table`` hold, as paths to read whole and tables: a
        merged part ``<scan_id>.parquet`` less the units that a unit part of the same scan
        redoes (read into memory), a part this object kept (:meth:`keep_parts`) as its rows, and
        every other part as its path."""
        merged = {scan_key(n): n for n in names if unit_of(n) is None}
        redone: dict[str, set[int]] = {}
        for n in names:
            if unit_of(n) is not None and scan_key(n) in merged:
                redone.setdefault(scan_key(n), set()).add(unit_of(n))
        out: list[str | pa.Table] = []
        for n in names:
            key, path = scan_key(n), self.path("tables", table, n)
            if key in redone and n == merged[key]:
                rows = self._merged_units(table, n)
                kept = [rows[u] for u in sorted(rows) if u not in redone[key]]
                out.append(pa.concat_tables(kept) if kept else ALL_TABLES[table].empty_table())
            else:
                kept_rows = self._kept(path)
                out.append(path if kept_rows is None else kept_rows)
        return out

    def dataset(self, table: str, paths: list[str]):
        """The parts ``paths`` of ``table`` as one pyarrow dataset of its declared schema (a
        column a part lacks reads as nulls). pyarrow.dataset is imported here, not with this
        module: ~50 ms that a scan whose parts are kept in memory never spends."""
        import pyarrow.dataset as pads

        return pads.dataset(paths, schema=ALL_TABLES[table], format="parquet", filesystem=self.fs)

    def _kept(self, path: str) -> pa.Table | None:
        return self.kept.get(path) if self.kept is not None else None

    def _part_rows(self, table: str, path: str) -> pa.Table:
        """The rows of the part ``path`` of ``table`` (from memory when kept)."""
        rows = self._kept(path)
        if rows is None:
            rows = self.dataset(table, [path]).to_table()
        return rows

    def _merged_units(self, table: str, name: str) -> dict[int, pa.Table]:
        """unit -> its rows in the merged part ``name``."""
        path = self.path("tables", table, name)
        meta = pq.read_metadata(path, filesystem=self.fs).metadata or {}
        units = json.loads(meta.get(UNITS_KEY.encode(), b"[]"))
        data = self.dataset(table, [path]).to_table()
        rows, start = {}, 0
        for unit, n in units:
            rows[unit] = data.slice(start, n)
            start += n
        return rows

    def compact_scan(self, scan_id: str) -> int:
        """Merge the unit parts of ``scan_id`` into one part per table, ``<scan_id>.parquet``
        (with a merged part already there: its rows of the units not redone, then the redone
        units' parts), and delete the unit parts; -> the number of unit parts merged. Call it
        when every unit of the scan is done."""
        return self.merge_scan(scan_id).write()

    def merge_scan(self, scan_id: str) -> Merge:
        """:meth:`compact_scan`, made ready and not yet written (:meth:`Merge.write` writes).
        With :meth:`keep_parts`, the merged rows are kept now, before they are written: the
        atlas can load them (under the names :meth:`Merge.names` gives) while they are."""
        merge = Merge(self)
        for table in TABLES:
            names = [n for n in self.part_names(table) if scan_key(n) == scan_id]
            parts = {unit_of(n): n for n in names if unit_of(n) is not None}
            if not parts:
                continue
            old = f"{scan_id}.parquet"
            earlier = self._merged_units(table, old) if old in names else {}
            final = self.path("tables", table, old)
            rows = None  # unit -> its rows, when kept: read only when written otherwise
            if self.kept is not None:
                rows = {
                    u: earlier[u]
                    if u not in parts
                    else self._part_rows(table, self.path("tables", table, parts[u]))
                    for u in sorted({*earlier, *parts})
                }
                self.kept[final] = pa.concat_tables(list(rows.values()))
            merge.tables[table] = (old, parts, earlier, rows)
        return merge

    def _merge_writer(
        self,
        table: str,
        earlier: dict[int, pa.Table],
        parts: dict[int, str],
        rows: dict[int, pa.Table] | None,
    ):
        """A writer of the merged part: unit by unit, from ``rows`` (unit -> its rows) when
        given, else from ``earlier`` (unit -> its rows in the merged part there was) or its
        unit part in ``parts`` (read only when written), in row groups of up to
        ``MERGE_BATCH_BYTES``."""
        schema = ALL_TABLES[table]

        def unit_rows(unit: int) -> pa.Table:
            if rows is not None:
                return rows[unit]
            if unit in parts:
                return self._part_rows(table, self.path("tables", table, parts[unit]))
            return earlier[unit]

        def write(p) -> None:
            counts, pending, size = [], [], 0
            fs = self.fs if isinstance(p, str) else None
            with pq.ParquetWriter(p, schema, filesystem=fs, **_parquet_options(table)) as w:
                for unit in sorted({*earlier, *parts}):
                    got = unit_rows(unit)
                    counts.append([unit, got.num_rows])
                    pending.append(got)
                    size += got.nbytes
                    if size >= MERGE_BATCH_BYTES:
                        w.write_table(pa.concat_tables(pending))
                        pending, size = [], 0
                if pending:
                    w.write_table(pa.concat_tables(pending))
                w.add_key_value_metadata({UNITS_KEY: json.dumps(counts)})

        return write


class Merge:
    """One scan's unit parts, to be merged into one part per table (:meth:`ResultsDir.merge_scan`):
    table -> (the merged part's name, unit -> its part's name, unit -> its rows in the merged
    part there was, unit -> its rows when kept in memory)."""

    def __init__(self, results: ResultsDir):
        self.results = results
        self.tables: dict[str, tuple] = {}

    def names(self, table: str, listing: list[str]) -> list[str]:
        """The part names of ``table`` once written, from its ``listing`` before."""
        if table not in self.tables:
            return listing
        merged, parts, _, _ = self.tables[table]
        return sorted({*(n for n in listing if n not in parts.values()), merged})

    def write(self) -> int:
        """Write the merged parts and delete the unit parts; -> the number of unit parts."""
        results = self.results
        for table, (merged, parts, earlier, rows) in self.tables.items():
            final = results.path("tables", table, merged)
            results._put(final, results._merge_writer(table, earlier, parts, rows))
            for n in parts.values():
                results.fs.delete_file(results.path("tables", table, n))
                if results.kept is not None:
                    results.kept.pop(results.path("tables", table, n), None)
        return sum(len(parts) for _, parts, _, _ in self.tables.values())
