"""ResultsDir.write_table: what a part holds, and how it is encoded."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlvr_ray.io.results import ResultsDir
from rlvr_ray.io.schema import ALL_TABLES


def test_profiles_part_reads_back_packed(tmp_path):
    """A profile is one row, its ratios one list: they read back exactly, as declared."""
    res = ResultsDir(str(tmp_path))
    res.ensure()
    ratios = [np.arange(n, dtype=np.float32) / n for n in (250, 3, 250, 1)]
    keys = [("a", "t1", "row"), ("a", "t1", "col"), ("b", "t2", "row"), ("b", "t2", "col")]
    data = pa.table(
        {
            "scan_id": ["s1"] * 4,
            "group_name": ["g"] * 4,
            "run": [k[0] for k in keys],
            "tensor": [k[1] for k in keys],
            "expert": pa.nulls(4, pa.int32()),
            "axis": [k[2] for k in keys],
            "ratio": [r.tolist() for r in ratios],
        }
    )
    path = res.write_table("profiles", "p-00000", data)  # cast to the declared float32 lists
    back = pq.read_table(path)
    assert back.schema == ALL_TABLES["profiles"]
    assert back.column("run").to_pylist() == ["a", "a", "b", "b"]
    got = back.column("ratio").to_pylist()
    assert [np.array(g, np.float32).tolist() for g in got] == [r.tolist() for r in ratios]
    meta = pq.ParquetFile(path).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert {c.compression for c in cols.values()} == {"LZ4"}  # LZ4_RAW in the file
    assert (cols["tensor"].statistics.min, cols["tensor"].statistics.max) == ("t1", "t2")


def test_small_tables_are_lz4_with_statistics(tmp_path):
    res = ResultsDir(str(tmp_path))
    res.ensure()
    schema = ALL_TABLES["consistency"]
    rows = [
        {"scan_id": "s1", "group_name": "g", "tensor": t, "n_runs": 2, "status": "ok"}
        for t in ("a", "b")
    ]
    path = res.write_table("consistency", "p-00000", pa.Table.from_pylist(rows, schema))
    back = pq.read_table(path)
    assert back.schema == schema and back.column("tensor").to_pylist() == ["a", "b"]
    meta = pq.ParquetFile(path).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert {c.compression for c in cols.values()} == {
        "LZ4"
    }  # LZ4_RAW in the file (DuckDB reads it)
    assert cols["group_name"].is_stats_set and cols["tensor"].statistics.max == "b"
