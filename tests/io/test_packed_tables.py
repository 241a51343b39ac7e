"""Packed tables (profiles, consensus_profiles): stored one row per profile with its values as a
list, shown by the atlas one row per value, and parts written one row per value (as rlvr-ray
wrote them before packing) still load, packed, with nothing quarantined."""

from __future__ import annotations

import datetime as dt

import duckdb
import numpy as np
import pyarrow as pa

from rlvr_ray.io import catalog, schema
from rlvr_ray.io.results import ResultsDir

#: the profiles table as rlvr-ray wrote it before it was packed: one row per row (column)
UNPACKED_PROFILES = pa.schema(
    [
        pa.field("scan_id", pa.string(), False),
        pa.field("group_name", pa.string(), False),
        pa.field("run", pa.string(), False),
        pa.field("tensor", pa.string(), False),
        pa.field("expert", pa.int32()),
        pa.field("axis", pa.string(), False),
        pa.field("idx", pa.int32(), False),
        pa.field("ratio", pa.float32()),
    ]
)


def _scan_rows(results: ResultsDir, scan_id: str, run: str, day: int) -> None:
    """The scans and tensors rows that make ``run`` of group g current in scan ``scan_id``."""
    at = dt.datetime(2026, 1, day, tzinfo=dt.timezone.utc)
    scan = {"scan_id": scan_id, "group_name": "g", "runs": [run], "created_at": at}
    results.write_table("scans", scan_id, pa.Table.from_pylist([scan], schema=schema.SCANS))
    tensor = {"scan_id": scan_id, "group_name": "g", "run": run, "tensor": "w", "status": "ok"}
    results.write_table(
        "tensors", f"{scan_id}-00000", pa.Table.from_pylist([tensor], schema=schema.TENSORS)
    )


def test_old_and_packed_parts_load_into_the_same_views(tmp_path):
    rng = np.random.default_rng(0)
    results = ResultsDir(tmp_path)
    results.ensure()
    old = {("row", "old"): rng.random(5, dtype=np.float32), ("col", "old"): rng.random(3)}
    new = {("row", "new"): rng.random(4, dtype=np.float32), ("col", "new"): rng.random(2)}
    # an old part, its rows out of order (a merged part of several units)
    rows = [
        {"scan_id": "s0", "group_name": "g", "run": run, "tensor": "w", "axis": axis}
        | {"idx": i, "ratio": float(v)}
        for (axis, run), vals in old.items()
        for i, v in enumerate(vals)
    ]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    data = pa.Table.from_pylist(rows, schema=UNPACKED_PROFILES)
    old_part = results.path("tables", "profiles", "s0.parquet")
    pa.parquet.write_table(data, old_part)
    packed = [
        {"scan_id": "s1", "group_name": "g", "run": run, "tensor": "w", "axis": axis}
        | {"ratio": vals.tolist()}
        for (axis, run), vals in new.items()
    ]
    results.write_table("profiles", "s1-00000", pa.Table.from_pylist(packed, schema.PROFILES))
    _scan_rows(results, "s0", "old", 1)
    _scan_rows(results, "s1", "new", 2)
    warnings: list[str] = []
    catalog.refresh(tmp_path, warnings.append)
    assert warnings == [] and not results.exists("quarantine")

    con = duckdb.connect(str(tmp_path / catalog.ATLAS), read_only=True)
    got = con.execute("SELECT run, axis, idx, ratio FROM profiles ORDER BY run, axis, idx")
    expect = sorted(
        (run, axis, i, float(np.float32(v)))
        for (axis, run), vals in (old | new).items()
        for i, v in enumerate(vals)
    )
    assert got.fetchall() == expect
    # the stored form: a list per profile, the old part's values in their index order
    lists = dict(
        ((run, axis), ratio)
        for run, axis, ratio in con.execute(
            "SELECT run, axis, ratio FROM profiles_packed"
        ).fetchall()
    )
    assert lists[("old", "row")] == [float(np.float32(v)) for v in old[("row", "old")]]
    assert len(lists) == 4
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE profiles)").fetchall())
    assert (types["idx"], types["ratio"]) == ("INTEGER", "FLOAT")
    assert list(types) == [f.name for f in UNPACKED_PROFILES]  # the columns, in their order
    con.close()

    # a later scan loads into the atlas as it grows (one part, packed)
    _scan_rows(results, "s2", "newer", 3)
    more = [{"scan_id": "s2", "group_name": "g", "run": "newer", "tensor": "w", "axis": "row"}]
    more[0]["ratio"] = [0.5, 0.25]
    results.write_table("profiles", "s2-00000", pa.Table.from_pylist(more, schema.PROFILES))
    done = catalog.update(tmp_path, ["s2"])
    assert done["parts"] >= 2  # its tensors and profiles parts, not the others
    rows = catalog.query(
        tmp_path, "SELECT idx, ratio FROM profiles_all WHERE run = 'newer' ORDER BY idx"
    )[1]
    assert rows == [(0, 0.5), (1, 0.25)]
