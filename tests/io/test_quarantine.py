"""An unreadable Parquet part (truncated, or of another schema) is moved to quarantine/ and
named in one line; the atlas is built from the other parts (real Parquet, real DuckDB)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from rlvr_ray.io import catalog
from rlvr_ray.io.results import ResultsDir
from rlvr_ray.io.schema import ALL_TABLES


def _scans(results: ResultsDir, scan_id: str, n_units: int) -> str:
    row = {"scan_id": scan_id, "group_name": "g", "n_units": n_units, "runs": ["a"]}
    return results.write_table(
        "scans", scan_id, pa.Table.from_pylist([row], schema=ALL_TABLES["scans"])
    )


def test_truncated_and_foreign_parts_are_quarantined_and_the_rest_is_queryable(tmp_path, capsys):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    for i in range(4):
        _scans(results, f"s{i}", 10 + i)
    catalog.refresh(out)  # all four load
    # s1 truncated to half its bytes; s9 a part of another schema (n_units a string)
    cut = out / "tables/scans/s1.parquet"
    body = cut.read_bytes()
    cut.write_bytes(body[: len(body) // 2])
    foreign = pa.table({"scan_id": ["s9"], "group_name": ["g"], "n_units": ["many"]})
    pq.write_table(foreign, out / "tables/scans/s9.parquet")
    capsys.readouterr()
    catalog.refresh(out)  # by default, one line each on stderr
    said = [x.removeprefix("rlvr-ray: ") for x in capsys.readouterr().err.splitlines()]

    assert catalog.query(out, "SELECT scan_id, n_units FROM scans ORDER BY 1")[1] == [
        ("s0", 10),
        ("s2", 12),
        ("s3", 13),
    ]
    assert sorted(
        p.relative_to(out).as_posix() for p in (out / "quarantine").rglob("*") if p.is_file()
    ) == ["quarantine/tables/scans/s1.parquet", "quarantine/tables/scans/s9.parquet"]
    assert (out / "quarantine/tables/scans/s1.parquet").read_bytes() == body[: len(body) // 2]
    assert not (out / "tables/scans/s1.parquet").exists()
    assert len(said) == 2
    assert said[0].startswith(
        "unreadable part tables/scans/s1.parquet moved to "
        "quarantine/tables/scans/s1.parquet and left out of the atlas ("
    )
    assert said[1].startswith(
        "unreadable part tables/scans/s9.parquet moved to "
        "quarantine/tables/scans/s9.parquet and left out of the atlas ("
    )
    # the next build has nothing to say and keeps the same rows
    again: list[str] = []
    catalog.refresh(out, warn=again.append)
    assert again == [] and len(catalog.query(out, "SELECT * FROM scans")[1]) == 3


def test_a_good_build_reads_no_part_twice(tmp_path, monkeypatch):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    _scans(results, "s0", 1)
    checked = []
    monkeypatch.setattr(catalog, "_unreadable", lambda *a: checked.append(a) or None)
    catalog.refresh(out, warn=checked.append)
    assert checked == [] and os.path.exists(out / "atlas.duckdb")
