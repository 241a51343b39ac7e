"""The DuckDB catalog: ``atlas.duckdb`` with the tables, the current views and the aggregates.

DuckDB resolves relative file paths against the working directory, not the database file, so
views over Parquet paths would break when a results directory is moved. The catalog therefore
copies the Parquet parts into native tables (``<table>_all``: every scan ever written) and puts
views on top, so ``duckdb DIR/atlas.duckdb`` works anywhere with no rlvr-ray code. It is rebuilt
into a temporary file and renamed into place (object stores: uploaded), so a reader never sees
a half-built catalog. Parts are read through pyarrow datasets, so local paths and object storage
(``s3://``, no DuckDB extension needed) take the same path.

Current views: when a (group, run) was scanned more than once (say, a group gained a run), the
plain views (``tensors``, ``profiles``, ...) keep each run's latest scan and each group's latest
consistency; ``*_all`` keep history.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import duckdb
import pyarrow.dataset as pads

from rlvr_ray.io.results import ResultsDir
from rlvr_ray.io.schema import ALL_TABLES

ATLAS = "atlas.duckdb"
_OK = "status IN ('ok', 'vocab_resized')"
_GEO_OK = "geometry_status = 'ok'"
_GEO_DONE = "geometry_status IN ('ok', 'k_not_below_rank', 'small_gap')"  # decomposed

VIEWS: dict[str, str] = {
    "scans": "SELECT * FROM scans_all",
    # latest scan of every (group, run), by the scan's creation time
    "current_runs": """
        SELECT group_name, run, scan_id FROM (
          SELECT t.group_name, t.run, t.scan_id, row_number() OVER (
            PARTITION BY t.group_name, t.run ORDER BY s.created_at DESC, t.scan_id) AS rn
          FROM (SELECT DISTINCT group_name, run, scan_id FROM tensors_all) t
          JOIN scans_all s USING (scan_id)) WHERE rn = 1""",
    "current_groups": """
        SELECT group_name, scan_id FROM (
          SELECT c.group_name, c.scan_id, row_number() OVER (
            PARTITION BY c.group_name ORDER BY s.created_at DESC, c.scan_id) AS rn
          FROM (SELECT DISTINCT group_name, scan_id FROM consistency_all) c
          JOIN scans_all s USING (scan_id)) WHERE rn = 1""",
    "tensors": "SELECT * FROM tensors_all SEMI JOIN current_runs USING (group_name, run, scan_id)",
    "profiles": "SELECT * FROM profiles_all SEMI JOIN current_runs USING (group_name, run, scan_id)",
    "spectra": "SELECT * FROM spectra_all SEMI JOIN current_runs USING (group_name, run, scan_id)",
    "checkpoints": """
        SELECT * FROM checkpoints_all c WHERE EXISTS (SELECT 1 FROM current_runs r
          WHERE r.scan_id = c.scan_id AND r.group_name = c.group_name
            AND (r.run = c.run OR c.is_base))""",
    "consistency": "SELECT * FROM consistency_all SEMI JOIN current_groups USING (group_name, scan_id)",
    "consensus_profiles": "SELECT * FROM consensus_profiles_all SEMI JOIN current_groups USING (group_name, scan_id)",
    "maps": """
        SELECT * FROM maps_all m WHERE
          (m.run <> '*' AND EXISTS (SELECT 1 FROM current_runs r WHERE r.scan_id = m.scan_id
             AND r.group_name = m.group_name AND r.run = m.run))
          OR (m.run = '*' AND EXISTS (SELECT 1 FROM current_groups g
             WHERE g.scan_id = m.scan_id AND g.group_name = m.group_name))""",
    # -- aggregates ---------------------------------------------------------------------------
    "run_sparsity": f"""
        SELECT group_name, run, any_value(algorithm) AS algorithm, any_value(step) AS step,
               any_value(series) AS series, any_value(family) AS family,
               count(*) AS n_tensors, sum(numel) AS numel, sum(n_changed) AS n_changed,
               1 - sum(n_changed) / sum(numel) AS sparsity,
               sum(ulp1_share * n_changed) / nullif(sum(n_changed), 0) AS ulp1_share,
               sqrt(sum(rel_frob * rel_frob)) AS rel_frob_l2
        FROM tensors WHERE {_OK} GROUP BY group_name, run""",
    "density_by_role_depth": f"""
        SELECT family, algorithm, role, round(depth * 10) / 10 AS depth_bin,
               sum(n_changed) / sum(numel) AS update_density,
               avg(stripe_row) AS stripe_row, avg(stripe_col) AS stripe_col, count(*) AS n
        FROM tensors WHERE {_OK} GROUP BY ALL""",
    "consistency_by_role": """
        SELECT group_name, family, role, avg(mean_jaccard) AS mean_jaccard,
               avg(jaccard_baseline) AS jaccard_baseline,
               avg(mean_jaccard) / nullif(avg(jaccard_baseline), 0) AS lift, count(*) AS n
        FROM consistency WHERE mean_jaccard IS NOT NULL GROUP BY ALL""",
    "cross_family": f"""
        SELECT role, round(depth * 4) / 4 AS depth_bin, family,
               sum(n_changed) / sum(numel) AS update_density,
               avg(stripe_row) AS stripe_row, avg(stripe_col) AS stripe_col,
               count(DISTINCT group_name || '/' || run) AS n_runs
        FROM tensors WHERE {_OK} AND depth IS NOT NULL AND coalesce(algorithm, '') <> 'sft'
        GROUP BY ALL""",
    # how alike two families' update patterns are: correlation of their density profiles over
    # the (role, depth_bin) cells both have
    "cross_family_similarity": """
        SELECT a.family AS family_a, b.family AS family_b, count(*) AS n_cells,
               corr(a.update_density, b.update_density) AS density_corr,
               corr(a.stripe_row, b.stripe_row) AS stripe_row_corr
        FROM cross_family a JOIN cross_family b USING (role, depth_bin)
        WHERE a.family < b.family GROUP BY ALL""",
    # geometry: overlaps (weighted by the number of changed weights) vs their random baselines,
    # and principal angles, only where geometry_status = 'ok' (k well below the rank, a gap at
    # k); NSS (all singular values, no k) over every decomposed matrix; n_flagged counts the
    # decomposed matrices left out ('k_not_below_rank', 'small_gap')
    "overlap_by_role_depth": """
        SELECT family, algorithm, role, round(depth * 10) / 10 AS depth_bin,
               sum(overlap_princ * n_changed) / sum(n_changed) AS overlap_princ,
               avg(princ_density) AS princ_density,
               sum(overlap_low * n_changed) / sum(n_changed) AS overlap_low,
               avg(low_density) AS low_density,
               sum(overlap_princ_not_low * n_changed) / sum(n_changed) AS overlap_princ_not_low,
               avg(princ_not_low_density) AS princ_not_low_density, count(*) AS n,
               median(rank_k) AS median_rank_k
        FROM tensors WHERE geometry_status = 'ok' AND n_changed > 0 GROUP BY ALL""",
    "geometry_by_layer": f"""
        SELECT group_name, run, any_value(algorithm) AS algorithm, any_value(family) AS family,
               layer, avg(nss) AS mean_nss, max(nss) AS max_nss,
               max(max_angle_left) FILTER ({_GEO_OK}) AS max_angle_left,
               max(max_angle_right) FILTER ({_GEO_OK}) AS max_angle_right,
               count(*) FILTER ({_GEO_OK}) AS n_tensors,
               count(*) FILTER (NOT {_GEO_OK}) AS n_flagged
        FROM tensors WHERE {_GEO_DONE} GROUP BY group_name, run, layer""",
    "run_geometry": f"""
        SELECT group_name, run, any_value(algorithm) AS algorithm,
               sum(overlap_princ * n_changed) FILTER ({_GEO_OK})
                 / nullif(sum(n_changed) FILTER ({_GEO_OK}), 0) AS overlap_princ,
               avg(princ_density) FILTER ({_GEO_OK}) AS princ_density,
               sum(overlap_low * n_changed) FILTER ({_GEO_OK})
                 / nullif(sum(n_changed) FILTER ({_GEO_OK}), 0) AS overlap_low,
               avg(low_density) FILTER ({_GEO_OK}) AS low_density, median(nss) AS median_nss,
               median(greatest(max_angle_left, max_angle_right)) FILTER ({_GEO_OK})
                 AS median_max_angle,
               count(*) FILTER ({_GEO_OK}) AS n_tensors,
               count(*) FILTER (NOT {_GEO_OK}) AS n_flagged
        FROM tensors WHERE {_GEO_DONE} GROUP BY group_name, run""",
    "summary": """
        SELECT s.group_name, s.run, s.algorithm, s.step, round(s.sparsity, 4) AS sparsity,
               round(s.ulp1_share, 4) AS ulp1_share, round(g.overlap_princ, 4) AS overlap_princ,
               round(g.princ_density, 4) AS princ_baseline, round(g.overlap_low, 4) AS overlap_low,
               round(g.low_density, 4) AS low_baseline, g.median_nss, g.median_max_angle,
               g.n_flagged AS geometry_flagged, s.n_tensors, s.numel
        FROM run_sparsity s LEFT JOIN run_geometry g USING (group_name, run)
        ORDER BY s.group_name, s.algorithm, s.run""",
    "group_summary": """
        SELECT group_name, any_value(n_runs) AS n_runs, avg(mean_jaccard) AS mean_jaccard,
               avg(jaccard_baseline) AS jaccard_baseline
        FROM consistency WHERE mean_jaccard IS NOT NULL GROUP BY group_name""",
    # the Hub watch: the latest decision about each (repo, commit) it has seen
    "watch": """
        SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER (
          PARTITION BY repo, sha ORDER BY scanned_at DESC, attempt DESC) AS rn FROM watch_all)
        WHERE rn = 1""",
}


def _load(con: duckdb.DuckDBPyConnection, results: ResultsDir) -> None:
    for table, schema in ALL_TABLES.items():
        parts = results.parts(table)
        src = (pads.dataset(parts, schema=schema, format="parquet", filesystem=results.fs)
               if parts else schema.empty_table())  # fmt: skip
        con.register("_src", src)
        con.execute(f"CREATE TABLE {table}_all AS SELECT * FROM _src")
        con.unregister("_src")


def build(con: duckdb.DuckDBPyConnection, results: ResultsDir) -> None:
    """Load every table and create every view in ``con``."""
    _load(con, results)
    for name, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")


def refresh(out: str | Path) -> str:
    """(Re)build DIR/atlas.duckdb from the Parquet parts; -> its path or URI."""
    results = ResultsDir(out)
    tmpdir = tempfile.mkdtemp(prefix=".atlas-", dir=results.root if results.local else None)
    try:
        tmp = os.path.join(tmpdir, ATLAS)
        con = duckdb.connect(tmp)
        try:
            build(con, results)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        final = results.path(ATLAS)
        if results.local:
            os.replace(tmp, final)
        else:
            with open(tmp, "rb") as src, results.fs.open_output_stream(final) as dst:
                shutil.copyfileobj(src, dst)
        return final
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def connect(out: str | Path) -> duckdb.DuckDBPyConnection:
    """A connection to the atlas of ``out``: the file itself when local (read-only), else an
    in-memory catalog built from the parts (object storage)."""
    results = ResultsDir(out)
    if results.local:
        path = Path(results.path(ATLAS))
        if not path.exists():
            if not results.exists("tables"):
                raise FileNotFoundError(f"{results.uri}: no results here (no tables/ directory)")
            refresh(out)
        return duckdb.connect(str(path), read_only=True)
    con = duckdb.connect()
    build(con, results)
    return con


def query(out: str | Path, sql: str, params=None) -> tuple[list[str], list[tuple]]:
    """Run ``sql`` on the atlas of ``out`` -> (column names, rows)."""
    con = connect(out)
    try:
        cur = con.execute(sql, params or [])
        return [d[0] for d in cur.description], cur.fetchall()
    finally:
        con.close()
