"""The run-level geometry view on hand-made rows in a real DuckDB: a decomposed matrix the run
left unchanged (no overlap: NaN) must not turn the run's weighted overlaps into NaN."""

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
        "max_angle_right DOUBLE)"
    )
    for t, status, n, op, pd, ol, ld, nss in ROWS:
        con.execute(
            "INSERT INTO tensors VALUES ('g', 'r', 'grpo', ?, ?, ?, ?, ?, ?, ?, ?, 0.01, 0.02)",
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
