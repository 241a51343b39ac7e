"""Schema first: every column of every unit table is declared once with its producer, and a
scan over a varied sweep (tied heads, FP8, MoE experts per-expert and fused, a step series,
resized, missing, NaN and mismatched tensors; geometry on) sets each column by
its declared producer and by no other, writes no undeclared column, and leaves none always null.
The scan id follows the schemas: a changed column makes a new scan."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlvr_ray.engine import plan
from rlvr_ray.engine.config import Params
from rlvr_ray.engine.plan import RunSpec, scan_id_for
from rlvr_ray.io import schema
from rlvr_ray.io.schema import PRODUCERS, TABLES

from .varied_sweep import scan_groups, with_step_pairs, write_sweep


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    worker = scan_groups(with_step_pairs(write_sweep(root / "ckpts", big=False)), root / "out")
    return worker, root / "out"


def test_every_column_is_set_by_its_declared_producer_only(scanned):
    worker, _ = scanned
    for table, schema_ in TABLES.items():
        produced = worker.produced[table]
        assert sorted(produced) == sorted(schema_.names), table  # nothing undeclared, none missing
        wrong = {c: p for c, p in produced.items() if p != {PRODUCERS[table][c]}}
        assert wrong == {}, table


def test_every_part_has_exactly_the_declared_columns_and_none_always_null(scanned):
    _, out = scanned
    for table, schema_ in TABLES.items():
        parts = sorted((out / "tables" / table).glob("*.parquet"))
        assert parts, table
        for part in parts:
            assert pq.read_schema(part).names == schema_.names, (table, part.name)
        data = pq.read_table(out / "tables" / table)
        assert data.num_rows > 0, table
        assert [c for c in data.column_names if data[c].null_count == data.num_rows] == [], table


def test_declarations_cover_every_table():
    assert set(PRODUCERS) == set(schema.ALL_TABLES) == set(schema.CURRENT)
    for table, s in schema.ALL_TABLES.items():
        assert list(PRODUCERS[table]) == s.names, table
    assert schema.CURRENT["tensors"] == "run" and schema.CURRENT["consistency"] == "group"
    assert schema.CURRENT["maps"] == "run_or_group"


def test_scan_id_follows_the_schemas(monkeypatch):
    runs = (RunSpec("a", "/x", "fp-a"),)
    args = ("g", "fp-base", runs, Params(), 1 << 20)
    before = scan_id_for(*args)
    assert scan_id_for(*args) == before  # deterministic
    grown = schema.TENSORS.append(pa.field("new_statistic", pa.float64()))
    monkeypatch.setitem(schema.ALL_TABLES, "tensors", grown)
    assert scan_id_for(*args) != before
    monkeypatch.setitem(schema.ALL_TABLES, "tensors", schema.TENSORS)
    assert scan_id_for(*args) == before
    monkeypatch.setattr(plan, "MIN_UNITS", plan.MIN_UNITS + 1)  # another cut
    assert scan_id_for(*args) != before
