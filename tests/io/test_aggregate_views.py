"""Aggregate views on hand-made rows in a real DuckDB: the run-level geometry (a decomposed matrix
the run left unchanged, overlap NaN, must not turn the run's weighted overlaps into NaN) and the
final checkpoints of each training series."""

from __future__ import annotations

import math

import duckdb

from rlvr_ray.io.catalog import VIEWS

#: tensor, geometry_status, n_changed, overlap_princ, princ_density, overlap_low, low_density, nss
ROWS = [
    ("a", "ok", 30, 0.40, 0.5, 0.70, 0.5, 1e-4),
    ("b", "ok", 10, 0.20, 0.5, 0.50, 0.5, 3e-4),
    ("c", "ok", 0, math.nan, 0.5, math.nan, 0.5, 0.0),  # decomposed, nothing changed
    ("d", "small_gap", 5, 0.90, 0.5, 0.10, 0.5, 2e-4),  # no finding: left out of overlaps
]


def test_run_geometry_leaves_unchanged_matrices_out_of_the_overlaps():
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE tensors (group_name VARCHAR, run VARCHAR, algorithm VARCHAR, tensor VARCHAR, "
        "geometry_status VARCHAR, n_changed BIGINT, overlap_princ DOUBLE, princ_density DOUBLE, "
        "overlap_low DOUBLE, low_density DOUBLE, nss DOUBLE, max_angle_left DOUBLE, "
        "max_angle_right DOUBLE, run_tensor VARCHAR)"
    )
    for t, status, n, op, pd, ol, ld, nss in ROWS:
        con.execute(
            "INSERT INTO tensors VALUES "
            "('g', 'r', 'grpo', ?, ?, ?, ?, ?, ?, ?, ?, 0.01, 0.02, NULL)",
            [t, status, n, op, pd, ol, ld, nss],
        )
    got = con.execute(
        f"SELECT overlap_princ, princ_density, overlap_low, median_nss, n_tensors, n_flagged "
        f"FROM ({VIEWS['run_geometry']})"
    ).fetchone()
    want_princ = (0.40 * 30 + 0.20 * 10) / 40  # the changed, 'ok' matrices a and b
    want_low = (0.70 * 30 + 0.50 * 10) / 40
    assert got[0] == want_princ and got[2] == want_low
    assert got[1] == 0.5
    assert math.isclose(got[3], (1e-4 + 2e-4) / 2, rel_tol=0, abs_tol=0)
    assert got[4:] == (3, 1)


def test_final_runs_are_the_latest_step_of_each_series_and_feed_the_algorithm_summary():
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE checkpoints (group_name VARCHAR, run VARCHAR, is_base BOOLEAN, "
        "series VARCHAR, step BIGINT)"
    )
    con.execute(
        "CREATE TABLE run_sparsity (group_name VARCHAR, run VARCHAR, algorithm VARCHAR, "
        "sparsity DOUBLE, ulp1_share DOUBLE)"
    )
    con.execute(
        "CREATE TABLE run_geometry (group_name VARCHAR, run VARCHAR, overlap_princ DOUBLE, "
        "overlap_low DOUBLE, median_nss DOUBLE)"
    )
    runs = [  # run, series, step, algorithm, sparsity
        ("base", None, None, None, None),
        ("grpo-s20", "grpo", 20, "grpo", 0.70),
        ("grpo-s40", "grpo", 40, "grpo", 0.60),
        ("grpo-b", None, None, "grpo", 0.50),  # no step, no series: its own final
        ("sft-s10", "sft", 10, "sft", 0.10),
        ("sft-s30", "sft", 30, "sft", 0.04),
    ]
    for run, series, step, algo, sparsity in runs:
        con.execute(
            "INSERT INTO checkpoints VALUES ('g', ?, ?, ?, ?)", [run, run == "base", series, step]
        )
        if run != "base":
            con.execute(
                "INSERT INTO run_sparsity VALUES ('g', ?, ?, ?, 0.9)", [run, algo, sparsity]
            )
            con.execute("INSERT INTO run_geometry VALUES ('g', ?, 0.4, 0.6, 1e-5)", [run])
    for name in ("final_runs", "algorithm_summary"):
        con.execute(f"CREATE VIEW {name} AS {VIEWS[name]}")
    finals = con.execute("SELECT run FROM final_runs ORDER BY run").fetchall()
    assert finals == [("grpo-b",), ("grpo-s40",), ("sft-s30",)]
    got = con.execute(
        "SELECT algorithm, n_runs, sparsity, min_sparsity, max_sparsity FROM algorithm_summary "
        "ORDER BY algorithm"
    ).fetchall()
    assert got == [("grpo", 2, (0.60 + 0.50) / 2, 0.50, 0.60), ("sft", 1, 0.04, 0.04, 0.04)]


def test_group_summary_counts_the_runs_in_the_groups_consistency():
    """The lab's groups hold 15 runs (5 series x 3 steps) of which the 4 final RL ones are in the
    consistency: the Jaccard table says 4."""
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE checkpoints (group_name VARCHAR, run VARCHAR, is_base BOOLEAN, "
        "consistency BOOLEAN)"
    )
    con.execute(
        "CREATE TABLE consistency (group_name VARCHAR, mean_jaccard DOUBLE, jaccard_baseline DOUBLE)"
    )
    con.execute("INSERT INTO checkpoints VALUES ('g', 'base', true, NULL)")
    for series in ("grpo-s1", "grpo-s2", "dapo", "rpp", "sft"):
        for step in (50, 100, 150):
            final_rl = step == 150 and series != "sft"
            con.execute(
                "INSERT INTO checkpoints VALUES ('g', ?, false, ?)", [f"{series}@{step}", final_rl]
            )
    con.execute("INSERT INTO consistency VALUES ('g', 0.8, 0.4), ('g', 0.6, 0.2)")
    con.execute(f"CREATE VIEW group_summary AS {VIEWS['group_summary']}")
    got = con.execute("SELECT * FROM group_summary").fetchall()
    assert got == [("g", 4, (0.8 + 0.6) / 2, (0.4 + 0.2) / 2)]
