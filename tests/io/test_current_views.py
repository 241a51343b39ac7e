"""The current views are generated from each table's declared rule (``schema.CURRENT``) and keep
exactly the rows of the views once written by hand (frozen below), on a real atlas: the varied
sweep's planted Qwen2 group (a step series, a master, odd tensors) and tied-head group scanned
in-process, then rescans of some of its runs and groups (later, and one at the same instant as
another, the scan id breaking the tie) and a watch that retried commits."""

from __future__ import annotations

import datetime as dt

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rlvr_ray.io import catalog, schema
from rlvr_ray.io.results import ResultsDir
from rlvr_ray.sql.views import current_view
from tests.engine.varied_sweep import _qwen_group, _tied_group, scan_groups, with_step_pairs

_RUN = "SELECT * FROM {t}_all SEMI JOIN current_runs USING (group_name, run, scan_id)"
_GROUP = "SELECT * FROM {t}_all SEMI JOIN current_groups USING (group_name, scan_id)"
#: the current views as they were spelled by hand, one by one
HAND_WRITTEN = {
    "scans": "SELECT * FROM scans_all",
    "tensors": _RUN.format(t="tensors"),
    "profiles": _RUN.format(t="profiles"),
    "spectra": _RUN.format(t="spectra"),
    "precision_gate": _RUN.format(t="precision_gate"),
    "checkpoints": """
        SELECT * FROM checkpoints_all c WHERE EXISTS (SELECT 1 FROM current_runs r
          WHERE r.scan_id = c.scan_id AND r.group_name = c.group_name
            AND (r.run = c.run OR c.is_base))""",
    "consistency": _GROUP.format(t="consistency"),
    "consensus_profiles": _GROUP.format(t="consensus_profiles"),
    "maps": """
        SELECT * FROM maps_all m WHERE
          (m.run <> '*' AND EXISTS (SELECT 1 FROM current_runs r WHERE r.scan_id = m.scan_id
             AND r.group_name = m.group_name AND r.run = m.run))
          OR (m.run = '*' AND EXISTS (SELECT 1 FROM current_groups g
             WHERE g.scan_id = m.scan_id AND g.group_name = m.group_name))""",
    "watch": """
        SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER (
          PARTITION BY repo, sha ORDER BY scanned_at DESC, attempt DESC) AS rn FROM watch_all)
        WHERE rn = 1""",
}
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
UNIT_TABLES = [t for t in schema.TABLES]


def _rows(out, table: str) -> pa.Table:
    return pq.read_table(out / "tables" / table)


def _rescan(results: ResultsDir, out, scan_id: str, group: str, runs, at, group_rows: bool):
    """A later scan of ``group``: the first scan's rows of ``runs`` (and of the group itself,
    run '*' and the per-group tables, when ``group_rows``) under ``scan_id``, created ``at``."""
    for table in UNIT_TABLES:
        data = _rows(out, table)
        data = data.filter(pc.equal(data["group_name"], group))
        if "run" in data.column_names:
            keep = pc.is_in(data["run"], pa.array(list(runs) + (["*"] if group_rows else [])))
            data = data.filter(keep)
        elif not group_rows:
            continue
        if data.num_rows:
            ids = pa.array([scan_id] * data.num_rows, pa.string())
            data = data.set_column(data.column_names.index("scan_id"), "scan_id", ids)
            results.write_table(table, f"{scan_id}-00000", data)
    _scan_tables(results, scan_id, group, runs, at)


def _scan_tables(results: ResultsDir, scan_id: str, group: str, runs, at) -> None:
    row = {"scan_id": scan_id, "group_name": group, "runs": list(runs), "created_at": at}
    results.write_table("scans", scan_id, pa.Table.from_pylist([row], schema=schema.SCANS))
    checkpoints = [{"scan_id": scan_id, "group_name": group, "run": "base", "is_base": True}]
    checkpoints += [
        {"scan_id": scan_id, "group_name": group, "run": r, "is_base": False} for r in runs
    ]
    results.write_table(
        "checkpoints", scan_id, pa.Table.from_pylist(checkpoints, schema=schema.CHECKPOINTS)
    )


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("current")
    out = root / "out"
    scan_groups(with_step_pairs([_qwen_group(root / "ckpts"), _tied_group(root / "ckpts")]), out)
    results = ResultsDir(out)
    tensors = _rows(out, "tensors").select(["scan_id", "group_name", "run"]).to_pylist()
    scanned: dict[tuple[str, str], set[str]] = {}
    for r in tensors:
        scanned.setdefault((r["scan_id"], r["group_name"]), set()).add(r["run"])
    for (scan_id, group), runs in scanned.items():
        _scan_tables(results, scan_id, group, sorted(runs), T0)
    later, latest = T0 + dt.timedelta(days=1), T0 + dt.timedelta(days=2)
    # qwen: two runs and the group again; then one run at the same instant (ids break the tie)
    _rescan(results, out, "rescan1", "qwen", ["grpo-a", "grpo-b"], later, group_rows=True)
    _rescan(results, out, "rescan0", "qwen", ["grpo-a"], later, group_rows=False)
    _rescan(results, out, "rescan2", "qwen", ["sft"], later, group_rows=False)
    # tied: the whole group, then one run alone (the group's rows stay with the first rescan)
    _rescan(results, out, "rescan3", "tied", ["untied", "tied"], later, group_rows=True)
    _rescan(results, out, "rescan4", "tied", ["tied"], latest, group_rows=False)
    watch = [
        ("a", "1", 1, T0, "failed"),
        ("a", "1", 2, later, "scanned"),
        ("a", "2", 1, later, "failed"),
        ("a", "2", 2, later, "scanned"),  # same instant: the later attempt
        ("b", "1", 1, T0, "skipped"),
    ]
    rows = [
        {"repo": r, "sha": s, "attempt": n, "scanned_at": at, "status": st}
        for r, s, n, at, st in watch
    ]
    results.write_table("watch", "w0001", pa.Table.from_pylist(rows, schema=schema.WATCH))
    catalog.refresh(out)
    return out


def test_every_table_has_a_generated_current_view():
    assert set(schema.CURRENT) == set(schema.ALL_TABLES) >= set(HAND_WRITTEN)
    for table in schema.ALL_TABLES:
        rule = schema.CURRENT[table]
        assert catalog.VIEWS[table] == current_view(table, rule, schema.PACKED.get(table))


def test_generated_current_views_keep_the_hand_written_views_rows(atlas):
    con = duckdb.connect(str(atlas / catalog.ATLAS), read_only=True)
    kept = {}
    for table, hand in HAND_WRITTEN.items():
        new = catalog.VIEWS[table]
        n_all, n_hand, n_new = (
            con.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0]
            for sql in (f"SELECT * FROM {table}_all", hand, new)
        )
        diff = con.execute(
            f"SELECT count(*) FROM (({hand}) EXCEPT ALL ({new})) UNION ALL "
            f"SELECT count(*) FROM (({new}) EXCEPT ALL ({hand}))"
        ).fetchall()
        assert diff == [(0,), (0,)] and n_hand == n_new > 0, table
        kept[table] = (n_new, n_all)
    # the rescans leave rows behind: the rules have something to choose
    for table in ("tensors", "profiles", "checkpoints", "consistency", "maps", "watch"):
        assert kept[table][0] < kept[table][1], table
    assert kept["scans"][0] == kept["scans"][1]
    assert kept["watch"][0] == 3
    statuses = con.execute("SELECT repo, sha, status FROM watch ORDER BY ALL").fetchall()
    assert statuses == [("a", "1", "scanned"), ("a", "2", "scanned"), ("b", "1", "skipped")]
    # qwen/grpo-a: rescan0 and rescan1 at the same instant, the smaller id wins
    latest = con.execute(
        "SELECT DISTINCT scan_id FROM tensors WHERE group_name = 'qwen' AND run = 'grpo-a'"
    ).fetchall()
    assert latest == [("rescan0",)]
