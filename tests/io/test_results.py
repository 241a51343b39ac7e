"""ResultsDir.write_table: what a part holds, and how it is encoded."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlvr_ray.io.results import ResultsDir
from rlvr_ray.io.schema import ALL_TABLES


def _coded(values: list[str], codes: list[int]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(values))


def test_profiles_part_reads_back_plain_with_its_encodings(tmp_path):
    res = ResultsDir(str(tmp_path))
    res.ensure()
    n = 1000
    ratio = np.arange(n, dtype=np.float32) / n
    data = pa.table(
        {
            "scan_id": _coded(["s1"], [0] * n),
            "group_name": _coded(["g"], [0] * n),
            "run": _coded(["a", "b"], [0] * 500 + [1] * 500),
            "tensor": _coded(["t1", "t2"], [0] * 250 + [1] * 250 + [0] * 250 + [1] * 250),
            "expert": pa.nulls(n, pa.int32()),
            "axis": _coded(["row"], [0] * n),
            "idx": pa.array(np.tile(np.arange(250, dtype=np.int32), 4)),
            "ratio": pa.array(ratio),
        }
    )
    path = res.write_table("profiles", "p-00000", data)
    back = pq.read_table(path)
    assert back.schema == ALL_TABLES["profiles"]  # plain strings, the declared types
    assert back.column("run").to_pylist() == ["a"] * 500 + ["b"] * 500
    assert back.column("ratio").to_numpy().tolist() == ratio.tolist()
    meta = pq.ParquetFile(path).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert {c.compression for c in cols.values()} == {"LZ4"}  # LZ4_RAW in the file
    assert "DELTA_BINARY_PACKED" in cols["idx"].encodings
    # statistics on the tensor (prunes parts) and the numbers, none on the other coded strings
    assert (cols["tensor"].statistics.min, cols["tensor"].statistics.max) == ("t1", "t2")
    assert cols["idx"].statistics.max == 249 and cols["ratio"].statistics.max == ratio.max()
    assert not any(cols[c].is_stats_set for c in ("scan_id", "group_name", "run", "axis"))


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
