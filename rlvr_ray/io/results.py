"""The results directory: atomic, deterministic Parquet parts and unit completion markers.

Layout (a local path, or a pyarrow-supported URI such as ``s3://bucket/prefix``)::

    tables/<table>/<scan_id>-<unit>.parquet   per-unit parts (scan tables: <scan_id>.parquet)
    units/<scan_id>/<unit>.json               written last: the unit is complete
    cache/<base fingerprint>/...              reusable base decompositions
    atlas.duckdb                              DuckDB catalog (rlvr_ray.io.catalog)

A part is written to a temporary name and renamed into place (object stores: serialized in
memory, then one PUT, which is atomic), under a name fixed by the work unit, so a retried unit
replaces its own parts.

Object storage: any URI pyarrow understands. S3 and S3-compatible stores (MinIO, Ceph, moto)
take their settings from the usual AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, and AWS_ENDPOINT_URL for a custom endpoint) or from the URI itself:
``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``. The URI travels to the Ray
workers unchanged; :func:`storage_env` lists the non-secret variables the driver forwards.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rlvr_ray.io.schema import ALL_TABLES

#: settings forwarded to Ray workers so they reach the same store as the driver. Secrets are
#: not: runtime_env is visible in the dashboard; give nodes credentials their own way (instance
#: profile, IRSA, a Kubernetes secret in the pod env).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_EC2_METADATA_DISABLED")  # fmt: skip
#: forwarded only when RLVR_RAY_FORWARD_AWS_CREDENTIALS=1 (a single-user cluster, a test)
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: zstd where it pays, on the maps' floats (-30% against lz4); elsewhere lz4: as small on the
#: tables of a few rows and many columns, and 9% larger on the profiles, in half the time
_COMPRESSION = {"maps": "zstd"}
#: min/max statistics on a long profile table's dictionary-coded strings cost as much as the
#: rest of the table (Arrow finds the codes in use first, a hash pass over every row): they are
#: kept on ``tensor`` only, the one that prunes parts (a unit holds neighbouring layers);
#: the scan, group and run are the same few in every part of a scan, the axis is one of two
_NO_STATISTICS = {
    t: ("scan_id", "group_name", "run", "axis") for t in ("profiles", "consensus_profiles")
}


def storage_env(uri: str) -> dict[str, str]:
    """Object-store settings of this process that workers writing to ``uri`` need."""
    if "://" not in uri or uri.startswith("file://"):
        return {}
    names = FORWARDED_ENV
    if os.environ.get("RLVR_RAY_FORWARD_AWS_CREDENTIALS") == "1":
        names += CREDENTIAL_ENV
    return {k: os.environ[k] for k in names if os.environ.get(k)}


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
            tmp = f"{os.path.dirname(final)}/.tmp-{uuid.uuid4().hex}-{os.path.basename(final)}"
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                write(tmp)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            # serialize locally first: a failure mid-write never leaves a partial object
            buf = pa.BufferOutputStream()
            write(buf)
            body = buf.getvalue()
            with self.fs.open_output_stream(final) as f:
                f.write(body)

    def write_table(self, table: str, part: str, data: pa.Table) -> str:
        """Write ``data`` (cast to the declared schema) as tables/<table>/<part>.parquet.

        A string column may come dictionary-encoded (codes + the distinct strings, as the
        worker builds its long profile tables): it is written as such, with no string per row
        ever materialized, and reads back as the declared plain strings."""
        schema = ALL_TABLES[table]
        coded = [f.name for f in data.schema
                 if pa.types.is_dictionary(f.type) and pa.types.is_string(f.type.value_type)]  # fmt: skip
        plain = pa.schema([pa.field(f.name, f.type.value_type, f.nullable) if f.name in coded else f
                           for f in data.schema])  # fmt: skip
        # coded columns of the declared strings are kept (the Arrow schema is then not stored:
        # readers see the Parquet strings); anything else is cast to the declared schema
        if not (coded and plain.equals(schema)) and data.schema != schema:
            data, coded = data.cast(schema), []
        final = self.path("tables", table, f"{part}.parquet")
        # dictionaries for the (repetitive) string columns only: dictionary-encoding the float
        # profiles too made writing 1.6x slower, for no smaller files
        strings = [f.name for f in schema if pa.types.is_string(f.type)]
        # profile indices count up by one: delta-coded they take no space (files -45%)
        deltas = {"idx": "DELTA_BINARY_PACKED"} if "idx" in schema.names else None
        stats = [n for n in schema.names if n not in _NO_STATISTICS.get(table, ())]
        self._put(
            final,
            lambda p: pq.write_table(
                data,
                p,
                filesystem=self.fs if isinstance(p, str) else None,
                compression=_COMPRESSION.get(table, "lz4"),
                use_dictionary=strings,
                column_encoding=deltas,
                write_statistics=stats,
                store_schema=not coded,
            ),  # fmt: skip
        )
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
            i.path for i in self.fs.get_file_info(sel)
            if i.path.endswith(".parquet") and not os.path.basename(i.path).startswith(".")
        )  # fmt: skip

    def unit_done(self, scan_id: str, unit: int) -> bool:
        return self.exists("units", scan_id, f"{unit:05d}.json")

    def mark_unit_done(self, scan_id: str, unit: int, report: dict) -> None:
        self.write_json(f"units/{scan_id}/{unit:05d}.json", report)
