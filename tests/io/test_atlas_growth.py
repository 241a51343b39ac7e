"""The atlas grows by what is new: adding a scan reads that scan's parts only, a rerun replaces
its rows, merged parts stand for their units, and writers in several processes serialize.
Real Parquet parts, real DuckDB, real processes; expected rows counted from the parts with
pyarrow."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlvr_ray.io import catalog
from rlvr_ray.io.results import UNITS_KEY, ResultsDir
from rlvr_ray.io.schema import ALL_TABLES


def _tensors(scan_id: str, run: str, n: int, changed: int) -> pa.Table:
    rows = [
        {
            "scan_id": scan_id,
            "group_name": f"g-{scan_id}",
            "run": run,
            "tensor": f"t{i}",
            "numel": 100,
            "n_changed": changed + i,
            "status": "ok",
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=ALL_TABLES["tensors"])


def _scan(results: ResultsDir, scan_id: str, units: int = 2, rows: int = 3) -> list[str]:
    """A scan's parts: its scans row and ``units`` unit parts of tensors; -> their paths."""
    row = {"scan_id": scan_id, "group_name": f"g-{scan_id}", "n_units": units, "runs": ["a"]}
    paths = [
        results.write_table(
            "scans", scan_id, pa.Table.from_pylist([row], schema=ALL_TABLES["scans"])
        )
    ]
    for u in range(units):
        part = _tensors(scan_id, f"r{u}", rows, changed=u)
        paths.append(results.write_table("tensors", f"{scan_id}-{u:05d}", part))
    return paths


def _all(out, table: str = "tensors") -> list[tuple]:
    return catalog.query(out, f"SELECT * FROM {table}_all ORDER BY ALL")[1]


def test_adding_a_scan_reads_only_its_parts_and_equals_a_rebuild(tmp_path, monkeypatch):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    for i in range(20):
        _scan(results, f"old{i:02d}")
    catalog.refresh(out)
    new = _scan(results, "new", units=3, rows=4)
    read: list[str] = []
    real = ResultsDir.scan_rows
    monkeypatch.setattr(
        ResultsDir,
        "scan_rows",
        lambda self, table, names: read.extend(names) or real(self, table, names),
    )
    done = catalog.update(out, ["new"])
    rows = sum(pq.read_metadata(p).num_rows for p in new)  # 1 scans row + 3 x 4 tensors rows
    assert rows == 13
    assert done == {"scans": 1, "parts": 4, "rows": 13}
    assert sorted(read) == sorted(os.path.basename(p) for p in new)
    # the same rows as a whole rebuild of a copy
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / catalog.ATLAS).unlink()
    catalog.refresh(copy)
    assert _all(out) == _all(copy) and len(_all(out)) == 20 * 2 * 3 + 12
    assert _all(out, "scans") == _all(copy, "scans")


def test_an_update_with_nothing_new_reads_nothing(tmp_path):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    _scan(results, "s0")
    catalog.refresh(out)
    assert catalog.update(out) == {"scans": 0, "parts": 0, "rows": 0}
    # a part written by a scan that never updated the atlas is found by the next update
    _scan(results, "s1", units=1)
    assert catalog.update(out) == {"scans": 1, "parts": 2, "rows": 4}


def test_a_rerun_replaces_its_scans_rows_without_duplicates(tmp_path):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    _scan(results, "s0")
    _scan(results, "s1")
    catalog.refresh(out)
    # s1's unit 1 redone with other numbers (a lost marker): same part name, new rows
    results.write_table("tensors", "s1-00001", _tensors("s1", "r1", 3, changed=50))
    assert catalog.update(out, ["s1"]) == {"scans": 1, "parts": 3, "rows": 7}
    got = catalog.query(
        out, "SELECT run, tensor, n_changed FROM tensors_all WHERE scan_id = 's1' ORDER BY ALL"
    )[1]
    assert got == [
        ("r0", "t0", 0),
        ("r0", "t1", 1),
        ("r0", "t2", 2),
        ("r1", "t0", 50),
        ("r1", "t1", 51),
        ("r1", "t2", 52),
    ]
    assert len(_all(out)) == 12


def test_a_merged_part_holds_its_units_and_a_redone_unit_stands_in_for_its_rows(tmp_path):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    _scan(results, "s0", units=3, rows=2)
    catalog.refresh(out)
    before = _all(out)
    assert results.compact_scan("s0") == 3
    assert results.part_names("tensors") == ["s0.parquet"]
    meta = pq.read_metadata(out / "tables/tensors/s0.parquet").metadata
    assert meta[UNITS_KEY.encode()] == b"[[0, 2], [1, 2], [2, 2]]"
    assert catalog.update(out) == {"scans": 1, "parts": 2, "rows": 7}
    assert _all(out) == before
    # unit 2 redone: its unit part replaces the merged part's rows of unit 2, before and
    # after the next merge
    results.write_table("tensors", "s0-00002", _tensors("s0", "r2", 2, changed=70))
    catalog.update(out, ["s0"])
    want = sorted(
        [r for r in before if r[2] != "r2"]
        + [tuple(r.values()) for r in _tensors("s0", "r2", 2, 70).to_pylist()]
    )
    assert _all(out) == want
    assert results.compact_scan("s0") == 1
    assert results.part_names("tensors") == ["s0.parquet"]
    catalog.update(out, ["s0"])
    assert _all(out) == want


def _add_scan(out: str, scan_id: str, barrier) -> None:
    results = ResultsDir(out)
    _scan(results, scan_id, units=2, rows=50)
    barrier.wait()  # every process updates at once
    catalog.update(out, [scan_id])


def test_processes_adding_scans_at_once_all_land_once(tmp_path):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    _scan(results, "first")
    catalog.refresh(out)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_add_scan, args=(str(out), f"p{i}", barrier)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    got = catalog.query(
        out,
        "SELECT scan_id, count(*), count(DISTINCT (run, tensor)) "
        "FROM tensors_all GROUP BY ALL ORDER BY ALL",
    )[1]
    assert got == [("first", 6, 6), *((f"p{i}", 100, 100) for i in range(4))]
    assert catalog.update(out) == {"scans": 0, "parts": 0, "rows": 0}  # nothing was missed


def test_a_damaged_part_of_an_added_scan_is_quarantined_and_the_rest_added(tmp_path):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    _scan(results, "s0")
    catalog.refresh(out)
    _scan(results, "s1", units=2)
    cut = out / "tables/tensors/s1-00001.parquet"
    cut.write_bytes(cut.read_bytes()[:100])
    said: list[str] = []
    assert catalog.update(out, ["s1"], warn=said.append) == {"scans": 1, "parts": 2, "rows": 4}
    assert len(said) == 1
    assert said[0].startswith(
        "unreadable part tables/tensors/s1-00001.parquet moved to "
        "quarantine/tables/tensors/s1-00001.parquet and left out of the atlas ("
    )
    got = catalog.query(
        out, "SELECT scan_id, run, count(*) FROM tensors_all GROUP BY ALL ORDER BY ALL"
    )
    assert got[1] == [("s0", "r0", 3), ("s0", "r1", 3), ("s1", "r0", 3)]


def test_parts_kept_in_memory_merge_and_load_as_the_files_do(tmp_path):
    """An in-process scan keeps its parts' rows (ResultsDir.keep_parts): its merged part and its
    atlas rows equal those of the same parts merged and loaded from the files, and neither the
    merge nor the load reads a part back (the unit parts are gone from disk before either)."""
    outs, merged_files = {}, None
    for kept in (False, True):
        out = tmp_path / ("kept" if kept else "files")
        results = ResultsDir(out)
        results.ensure()
        if kept:
            results.keep_parts()
        _scan(results, "s0", units=3, rows=2)
        if kept:  # what a merge or load would read back is not there any more
            assert len(results.kept) == 4  # the scans part and three unit parts
            for p in (out / "tables" / "tensors").iterdir():
                p.write_bytes(b"not parquet")
        assert results.compact_scan("s0") == 3
        merged = results.path("tables", "tensors", "s0.parquet")
        files = (pq.read_table(merged), pq.read_metadata(merged).metadata[UNITS_KEY.encode()])
        if kept:
            assert files == merged_files  # the same merged part on disk
            assert list(results.kept) == [results.path("tables", "scans", "s0.parquet"), merged]
            for p in (merged, results.path("tables", "scans", "s0.parquet")):
                Path(p).write_bytes(b"not parquet")
            assert catalog.update(results, ["s0"]) == {}  # a new atlas, from memory
            results.forget_parts()
            assert results.kept is None
        else:
            merged_files = files
            catalog.update(results, ["s0"])
        outs[kept] = (_all(out), catalog.query(out, "SELECT * FROM scans_all")[1])
    assert outs[True] == outs[False] and len(outs[True][0]) == 6
    assert merged_files[1] == b"[[0, 2], [1, 2], [2, 2]]"


def _rebuilt_copy(out: Path, copy: Path) -> Path:
    """A copy of the results ``out`` whose atlas is rebuilt from its parts."""
    shutil.copytree(out, copy)
    (copy / catalog.ATLAS).unlink()
    catalog.refresh(copy)
    return copy


def _atlas_files(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out) if "atlas" in n and n != "atlas.lock")


def test_a_first_update_fills_a_blank_atlas_made_beforehand_as_a_build_would(tmp_path):
    """A first scan's atlas is made empty (tables, views) while its units run (catalog.Blank)
    and filled at its end: the same rows as a whole build of the parts, the blank's file moved
    into place (nothing left under a temporary name) and no write-ahead log beside it."""
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    blank = catalog.Blank(results)
    _scan(results, "s0")
    _scan(results, "s1", units=3, rows=2)
    assert catalog.update(results, ["s0", "s1"], blank=blank) == {}
    blank.discard()  # taken and moved: nothing to remove
    assert _atlas_files(out) == ["atlas.duckdb"]
    copy = _rebuilt_copy(out, tmp_path / "copy")
    assert _all(out) == _all(copy) and len(_all(out)) == 2 * 3 + 3 * 2
    assert _all(out, "scans") == _all(copy, "scans")
    names = "SELECT table_name FROM information_schema.tables ORDER BY ALL"
    assert catalog.query(out, names)[1] == catalog.query(copy, names)[1]
    # a second update adds to it as to any atlas, with a blank it leaves unused
    _scan(results, "s2", units=1)
    unused = catalog.Blank(results)
    assert catalog.update(results, ["s2"], blank=unused) == {"scans": 1, "parts": 2, "rows": 4}
    assert [n for n in _atlas_files(out) if not n.startswith(".tmp-")] == ["atlas.duckdb"]
    assert os.path.exists(unused.path)
    unused.discard()
    assert _atlas_files(out) == ["atlas.duckdb"]
    assert len(_all(out)) == 2 * 3 + 3 * 2 + 3


def test_a_damaged_part_filling_a_blank_atlas_is_quarantined_and_the_rest_loaded(tmp_path):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    blank = catalog.Blank(results)
    _scan(results, "s0", units=2)
    cut = out / "tables/tensors/s0-00001.parquet"
    cut.write_bytes(cut.read_bytes()[:100])
    said: list[str] = []
    assert catalog.update(results, ["s0"], warn=said.append, blank=blank) == {}
    blank.discard()
    assert len(said) == 1 and said[0].startswith("unreadable part tables/tensors/s0-00001.parquet")
    got = catalog.query(out, "SELECT run, count(*) FROM tensors_all GROUP BY ALL ORDER BY ALL")
    assert got[1] == [("r0", 3)]
    assert _atlas_files(out) == ["atlas.duckdb"]


def test_a_new_atlas_loads_kept_rows_while_their_merge_is_written(tmp_path):
    """An in-process scan's parts are kept in memory: into a new atlas, its merged rows load
    under the merged parts' names while the merge is written (catalog.fill). The atlas then
    records exactly the parts on disk (a later update finds nothing to do) and holds the rows a
    rebuild from the files gets; an earlier scan's parts are read from their files."""
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    _scan(results, "old", units=2)
    catalog.update(results, merge=["old"])
    (out / catalog.ATLAS).unlink()  # parts of an earlier scan, and no atlas
    blank = catalog.Blank(results)
    with results.keeping_parts():
        _scan(results, "s0", units=3, rows=2)
        assert catalog.update(results, ["s0"], merge=["s0"], blank=blank) == {}
    blank.discard()
    assert _atlas_files(out) == ["atlas.duckdb"]
    assert sorted(os.listdir(out / "tables/tensors")) == ["old.parquet", "s0.parquet"]
    meta = pq.read_metadata(out / "tables/tensors/s0.parquet").metadata
    assert meta[UNITS_KEY.encode()] == b"[[0, 2], [1, 2], [2, 2]]"
    recorded = catalog.query(out, f"SELECT tbl, name FROM {catalog.PARTS} ORDER BY ALL")[1]
    on_disk = sorted((t, n) for t in ALL_TABLES for n in results.part_names(t))
    assert recorded == on_disk
    assert catalog.update(results) == {"scans": 0, "parts": 0, "rows": 0}
    copy = _rebuilt_copy(out, tmp_path / "copy")
    assert _all(out) == _all(copy) and len(_all(out)) == 2 * 3 + 3 * 2
    assert _all(out, "scans") == _all(copy, "scans")


def test_a_merge_that_fails_while_a_new_atlas_loads_leaves_no_atlas(tmp_path, monkeypatch):
    out = tmp_path / "results"
    results = ResultsDir(out)
    results.ensure()
    blank = catalog.Blank(results)

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(catalog.Merge, "write", full)
    with results.keeping_parts():
        _scan(results, "s0", units=2)
        with pytest.raises(OSError, match="No space left"):
            catalog.update(results, ["s0"], merge=["s0"], blank=blank)
    blank.discard()
    assert _atlas_files(out) == []
    assert sorted(os.listdir(out / "tables/tensors")) == ["s0-00000.parquet", "s0-00001.parquet"]
