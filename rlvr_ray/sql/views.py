"""The atlas's views: the current views over the ``*_all`` tables and the aggregates, as SQL.

Plain DuckDB SQL over the tables of ``rlvr_ray.io.schema``; ``rlvr_ray.io.catalog`` creates
each as a view in ``atlas.duckdb`` (name -> its SELECT), so they read the same from any DuckDB
client.
"""

from rlvr_ray.sql.status import COMPARED_SQL

#: current rules: which rows of a table its current view keeps (each table's rule is declared
#: with its columns, ``rlvr_ray.io.schema.CURRENT``)
CURRENT_ALL = "all"  # every row
CURRENT_RUN = "run"  # the latest scan of each (group, run)
CURRENT_RUN_AND_BASE = "run_and_base"  # per run; the base's row (is_base) with each current run
CURRENT_GROUP = "group"  # the latest scan of each group
CURRENT_RUN_OR_GROUP = "run_or_group"  # per run; rows of run '*' (the group's own) per group
CURRENT_COMMIT = "commit"  # the latest decision about each (repo, sha)

_OK = COMPARED_SQL
_GEO_OK = "geometry_status = 'ok'"
_GEO_DONE = "geometry_status IN ('ok', 'k_not_below_rank', 'small_gap')"  # decomposed
# an overlap is a share of the changed weights: a matrix with none has no overlap (NaN), and a
# weighted mean must leave it out rather than add NaN x 0
_GEO_OVERLAP = f"{_GEO_OK} AND n_changed > 0"

# a step-pair group, ``<group>/steps/<series>/<from>-<to>`` (no sweep's own group name holds
# "/"; `rlvr_ray.engine.config.step_pair_groups`), and the parts of its name
_STEP_PAIR = "contains(group_name, '/steps/')"
_PAIR_NAME = "regexp_extract(group_name, '^(.*)/steps/([^/]+)/([0-9]+)-([0-9]+)$', {})"
_LATEST_RUNS = """
        SELECT group_name, run, scan_id FROM (
          SELECT t.group_name, t.run, t.scan_id, row_number() OVER (
            PARTITION BY t.group_name, t.run ORDER BY s.created_at DESC, t.scan_id) AS rn
          FROM (SELECT DISTINCT group_name, run, scan_id FROM tensors_all) t
          JOIN scans_all s USING (scan_id)) WHERE rn = 1"""

# a row of the run's own tensor: not its tied embedding standing in for a head it does not store
# (the row compares it with the base's head, and the run's totals count it once, as the
# embedding: a tied run's numbers do not depend on an untied run beside it in its group)
_OWN = "run_tensor IS NULL"

# a model's sparsity: over its compared tensors, weighted by numel (run_sparsity, step_sparsity)
_SPARSITY = f"""count(*) FILTER (WHERE {_OK}) AS n_tensors,
               sum(numel) FILTER (WHERE {_OK}) AS numel,
               sum(n_changed) FILTER (WHERE {_OK}) AS n_changed,
               1 - sum(n_changed) FILTER (WHERE {_OK}) / sum(numel) FILTER (WHERE {_OK}) AS sparsity,
               sum(ulp1_share * n_changed) FILTER (WHERE {_OK})
                 / nullif(sum(n_changed) FILTER (WHERE {_OK}), 0) AS ulp1_share"""

#: a current rule -> the SELECT of a table's current view over ``{src}``, the table's rows of
#: every scan. current_runs / current_groups are the latest scan of each (group, run) / group
_CURRENT_SQL: dict[str, str] = {
    CURRENT_ALL: "SELECT * FROM {src}",
    CURRENT_RUN: "SELECT * FROM {src} SEMI JOIN current_runs USING (group_name, run, scan_id)",
    CURRENT_GROUP: "SELECT * FROM {src} SEMI JOIN current_groups USING (group_name, scan_id)",
    # the base's row belongs to every run of its scan: kept while any of them is current
    CURRENT_RUN_AND_BASE: """
        SELECT * FROM {src} c WHERE EXISTS (SELECT 1 FROM current_runs r
          WHERE r.scan_id = c.scan_id AND r.group_name = c.group_name
            AND (r.run = c.run OR c.is_base))""",
    # run '*' holds the group's own rows (pooled over its runs): current with the group's scan
    CURRENT_RUN_OR_GROUP: """
        SELECT * FROM {src} m WHERE
          (m.run <> '*' AND EXISTS (SELECT 1 FROM current_runs r WHERE r.scan_id = m.scan_id
             AND r.group_name = m.group_name AND r.run = m.run))
          OR (m.run = '*' AND EXISTS (SELECT 1 FROM current_groups g
             WHERE g.scan_id = m.scan_id AND g.group_name = m.group_name))""",
    # a retried decision has a later scanned_at, or the same one and a higher attempt
    CURRENT_COMMIT: """
        SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER (
          PARTITION BY repo, sha ORDER BY scanned_at DESC, attempt DESC) AS rn FROM {src})
        WHERE rn = 1""",
}


def native(table: str, packed: bool = False) -> str:
    """The atlas's table holding every scan's rows of ``table`` (``packed``: its lists)."""
    return f"{table}_packed" if packed else f"{table}_all"


def unpacked(source: str, value: str) -> str:
    """The rows of a packed relation (``rlvr_ray.io.schema.PACKED``), one per element of its list
    column ``value``: the other columns, ``idx`` (the element's index, from 0) and the element."""
    return (
        f"SELECT * EXCLUDE ({value}), CAST(generate_subscripts({value}, 1) - 1 AS INTEGER) AS idx, "
        f"unnest({value}) AS {value} FROM ({source})"
    )


def current_view(table: str, rule: str, packed: str | None = None) -> str:
    """The SELECT of ``table``'s current view, from its current rule; ``packed``: the table's
    list column, when it is stored packed (the rule picks lists, then they are unpacked)."""
    rows = _CURRENT_SQL[rule].format(src=native(table, packed is not None))
    return rows if packed is None else unpacked(rows, packed)


def views(current: dict[str, str], packed: dict[str, str]) -> dict[str, str]:
    """Every view of the atlas, name -> its SELECT, in creation order (a view after those it
    reads): each packed table's ``<table>_all`` (``packed``: table -> its list column), each
    table's current view from ``current`` (table -> its rule), then the aggregates."""
    history = {
        native(t): unpacked(f"SELECT * FROM {native(t, True)}", v) for t, v in packed.items()
    }
    tables = {t: current_view(t, rule, packed.get(t)) for t, rule in current.items()}
    return {**_LATEST, **history, **tables, **_AGGREGATES}


_LATEST: dict[str, str] = {
    # latest scan of every (group, run), by the scan's creation time; step-pair groups (their
    # rows are the k-step sparsity, in the step_* views) are not runs of a base: left out
    "current_runs": f"{_LATEST_RUNS} AND NOT {_STEP_PAIR}",
    "current_groups": f"""
        SELECT group_name, scan_id FROM (
          SELECT c.group_name, c.scan_id, row_number() OVER (
            PARTITION BY c.group_name ORDER BY s.created_at DESC, c.scan_id) AS rn
          FROM (SELECT DISTINCT group_name, scan_id FROM consistency_all) c
          JOIN scans_all s USING (scan_id)) WHERE rn = 1 AND NOT {_STEP_PAIR}""",
    "current_step_runs": f"{_LATEST_RUNS} AND {_STEP_PAIR}",
}

_AGGREGATES: dict[str, str] = {
    # the final checkpoint of each training series: its latest step (a run without a step is
    # final). Intermediate steps are runs too, and would otherwise weigh in every average
    "final_runs": """
        SELECT group_name, run, series, step FROM (
          SELECT group_name, run, coalesce(series, run) AS series, step,
                 max(step) OVER (PARTITION BY group_name, coalesce(series, run)) AS last
          FROM checkpoints WHERE NOT coalesce(is_base, false))
        WHERE step IS NULL OR step = last""",
    # coverage: the share of the model's weights that were compared (numel_all: the elements of
    # every tensor, the run's copy or, where the run lacks one, the base's), and of the
    # tensors; sparsity is over the compared ones only
    "run_sparsity": f"""
        SELECT group_name, run, any_value(algorithm) AS algorithm, any_value(step) AS step,
               any_value(series) AS series, any_value(family) AS family,
               {_SPARSITY},
               sqrt(sum(rel_frob * rel_frob) FILTER (WHERE {_OK})) AS rel_frob_l2,
               count(*) AS n_tensors_all, sum(run_numel) AS run_numel,
               sum(coalesce(run_numel, base_numel)) AS numel_all,
               coalesce(sum(numel) FILTER (WHERE {_OK}), 0)
                 / nullif(sum(coalesce(run_numel, base_numel)), 0) AS coverage,
               count(*) FILTER (WHERE {_OK}) / count(*) AS tensor_coverage
        FROM tensors WHERE {_OWN} GROUP BY group_name, run""",
    "density_by_role_depth": f"""
        SELECT family, algorithm, coalesce(tower, 'text') AS tower, role,
               round(depth * 10) / 10 AS depth_bin, sum(n_changed) / sum(numel) AS update_density,
               avg(stripe_row) AS stripe_row, avg(stripe_col) AS stripe_col, count(*) AS n
        FROM tensors WHERE {_OK} GROUP BY ALL""",
    "consistency_by_role": """
        SELECT group_name, family, coalesce(tower, 'text') AS tower, role,
               avg(mean_jaccard) AS mean_jaccard,
               avg(jaccard_baseline) AS jaccard_baseline,
               avg(mean_jaccard) / nullif(avg(jaccard_baseline), 0) AS lift, count(*) AS n
        FROM consistency WHERE mean_jaccard IS NOT NULL GROUP BY ALL""",
    # one row per (tower, role, depth bin) of each family AND base (two bases of one family,
    # say Qwen2.5-Math-1.5B and R1-Distill-Qwen-1.5B, stay apart). Fused projections line up
    # with split ones: q, k and v are also pooled into a 'qkv' row, gate and up into 'gate_up'
    # (pooled = true), so a family that stores qkv_proj / gate_up_proj (Phi-3, GPT-2) meets the
    # others on those cells
    "cross_family": f"""
        WITH t AS (
          SELECT t.*, coalesce(t.tower, 'text') AS tower_, s.base_fingerprint, s.base_ref
          FROM tensors t JOIN scans_all s USING (scan_id)
          SEMI JOIN final_runs f ON f.group_name = t.group_name AND f.run = t.run
          WHERE {_OK} AND depth IS NOT NULL AND coalesce(algorithm, '') <> 'sft'),
        lined AS (
          SELECT *, role AS line_role, false AS pooled FROM t
          UNION ALL
          SELECT *, CASE WHEN role IN ('q', 'k', 'v') THEN 'qkv' ELSE 'gate_up' END, true
          FROM t WHERE role IN ('q', 'k', 'v', 'gate', 'up'))
        SELECT tower_ AS tower, line_role AS role, round(depth * 4) / 4 AS depth_bin, family,
               base_fingerprint, any_value(base_ref) AS base_ref, pooled,
               sum(n_changed) / sum(numel) AS update_density,
               avg(stripe_row) AS stripe_row, avg(stripe_col) AS stripe_col,
               count(DISTINCT group_name || '/' || run) AS n_runs
        FROM lined GROUP BY tower_, line_role, depth_bin, family, base_fingerprint, pooled""",
    # how alike two (family, base) update patterns are: correlation of their density profiles
    # over the (tower, role, depth_bin) cells both have; a cell pooled on both sides repeats
    # their q/k/v (gate/up) cells and is left out
    "cross_family_similarity": """
        SELECT a.family AS family_a, any_value(a.base_ref) AS base_a, b.family AS family_b,
               any_value(b.base_ref) AS base_b, count(*) AS n_cells,
               corr(a.update_density, b.update_density) AS density_corr,
               corr(a.stripe_row, b.stripe_row) AS stripe_row_corr
        FROM cross_family a JOIN cross_family b USING (tower, role, depth_bin)
        WHERE (a.family < b.family
               OR (a.family = b.family AND a.base_fingerprint < b.base_fingerprint))
          AND NOT (a.pooled AND b.pooled)
        GROUP BY a.family, a.base_fingerprint, b.family, b.base_fingerprint""",
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
               sum(overlap_princ * n_changed) FILTER ({_GEO_OVERLAP})
                 / nullif(sum(n_changed) FILTER ({_GEO_OVERLAP}), 0) AS overlap_princ,
               avg(princ_density) FILTER ({_GEO_OVERLAP}) AS princ_density,
               sum(overlap_low * n_changed) FILTER ({_GEO_OVERLAP})
                 / nullif(sum(n_changed) FILTER ({_GEO_OVERLAP}), 0) AS overlap_low,
               avg(low_density) FILTER ({_GEO_OVERLAP}) AS low_density, median(nss) AS median_nss,
               median(greatest(max_angle_left, max_angle_right)) FILTER ({_GEO_OK})
                 AS median_max_angle,
               count(*) FILTER ({_GEO_OK}) AS n_tensors,
               count(*) FILTER (NOT {_GEO_OK}) AS n_flagged
        FROM tensors WHERE {_GEO_DONE} AND {_OWN} GROUP BY group_name, run""",
    "summary": """
        SELECT s.group_name, s.run, s.algorithm, s.step, s.sparsity, s.coverage,
               s.tensor_coverage, s.ulp1_share, g.overlap_princ, g.princ_density AS princ_baseline,
               g.overlap_low, g.low_density AS low_baseline, g.median_nss, g.median_max_angle,
               g.n_flagged AS geometry_flagged, s.n_tensors, s.numel, s.n_tensors_all, s.run_numel,
               s.numel_all
        FROM run_sparsity s LEFT JOIN run_geometry g USING (group_name, run)
        ORDER BY s.group_name, s.algorithm, s.run""",
    "summary_final": "SELECT * FROM summary SEMI JOIN final_runs USING (group_name, run)",
    # the headline per algorithm, over final checkpoints only
    "algorithm_summary": """
        SELECT s.algorithm, count(*) AS n_runs, avg(s.sparsity) AS sparsity,
               min(s.sparsity) AS min_sparsity, max(s.sparsity) AS max_sparsity,
               avg(s.ulp1_share) AS ulp1_share, avg(g.overlap_princ) AS overlap_princ,
               avg(g.overlap_low) AS overlap_low, median(g.median_nss) AS median_nss
        FROM run_sparsity s SEMI JOIN final_runs USING (group_name, run)
        LEFT JOIN run_geometry g USING (group_name, run)
        GROUP BY s.algorithm""",
    # n_runs: the group's runs in its consistency (its current checkpoints marked so: not the
    # SFT runs nor the intermediate steps the lab leaves out), not the runs of any one tensor (a
    # resized embedding leaves its resized runs out of that tensor's consistency)
    "group_summary": """
        SELECT c.group_name, any_value(r.n_runs) AS n_runs, avg(c.mean_jaccard) AS mean_jaccard,
               avg(c.jaccard_baseline) AS jaccard_baseline
        FROM consistency c LEFT JOIN (
          SELECT group_name, count(DISTINCT run) AS n_runs FROM checkpoints
          WHERE NOT coalesce(is_base, false) AND coalesce(consistency, true)
          GROUP BY group_name) r USING (group_name)
        WHERE c.mean_jaccard IS NOT NULL GROUP BY c.group_name""",
    # k-step sparsity: each tensor of step t' of a series against step t, the series' saved
    # step before it (k = t' - t), from the step-pair groups (a sweep's ``step_pairs``);
    # sparsity and ulp1_share as in ``tensors`` (NULL when the tensor was not compared)
    "step_sparsity_by_tensor": f"""
        SELECT {_PAIR_NAME.format(1)} AS group_name, {_PAIR_NAME.format(2)} AS series,
               CAST({_PAIR_NAME.format(3)} AS BIGINT) AS step_from,
               CAST({_PAIR_NAME.format(4)} AS BIGINT) AS step_to,
               CAST({_PAIR_NAME.format(4)} AS BIGINT) - CAST({_PAIR_NAME.format(3)} AS BIGINT) AS k,
               run, algorithm, family, tensor, role, layer, depth, status, numel, n_changed,
               CASE WHEN {_OK} THEN 1 - n_changed / numel END AS sparsity,
               CASE WHEN {_OK} THEN ulp1_share END AS ulp1_share, run_tensor,
               group_name AS pair_group
        FROM tensors_all SEMI JOIN current_step_runs USING (group_name, run, scan_id)""",
    # per model: weighted by numel over the compared tensors, as run_sparsity
    "step_sparsity": f"""
        SELECT group_name, series, step_from, step_to, k, any_value(run) AS run,
               any_value(algorithm) AS algorithm, any_value(family) AS family,
               {_SPARSITY},
               count(*) AS n_tensors_all
        FROM step_sparsity_by_tensor WHERE {_OWN} GROUP BY group_name, series, step_from, step_to, k
        ORDER BY group_name, series, step_from""",
    # the precision gate of runs given an fp32 master: per run, summed over its counted tensors
    # (erased_share = n_erased / n_moved, below_share = n_below / n_moved, gate_hist summed
    # bin by bin), with n_tensors_all the rows whatever their status
    "run_precision_gate": f"""
        WITH hist AS (
          SELECT group_name, run, list(n ORDER BY i) AS gate_hist FROM (
            SELECT group_name, run, i, CAST(sum(c) AS BIGINT) AS n FROM (
              SELECT group_name, run, unnest(gate_hist) AS c, generate_subscripts(gate_hist, 1) AS i
              FROM precision_gate WHERE {_OK}) GROUP BY ALL) GROUP BY ALL)
        SELECT group_name, run, any_value(algorithm) AS algorithm, any_value(step) AS step,
               any_value(series) AS series, any_value(family) AS family,
               any_value(master) AS master, count(*) FILTER (WHERE {_OK}) AS n_tensors,
               sum(numel) FILTER (WHERE {_OK}) AS numel,
               sum(n_moved) FILTER (WHERE {_OK}) AS n_moved,
               sum(n_erased) FILTER (WHERE {_OK}) AS n_erased,
               sum(n_erased) FILTER (WHERE {_OK})
                 / nullif(sum(n_moved) FILTER (WHERE {_OK}), 0) AS erased_share,
               sum(n_below) FILTER (WHERE {_OK})
                 / nullif(sum(n_moved) FILTER (WHERE {_OK}), 0) AS below_share,
               sum(n_ties) FILTER (WHERE {_OK}) AS n_ties,
               sum(n_round_mismatch) FILTER (WHERE {_OK}) AS n_round_mismatch,
               any_value(h.gate_hist) AS gate_hist, count(*) AS n_tensors_all
        FROM precision_gate LEFT JOIN hist h USING (group_name, run)
        GROUP BY group_name, run ORDER BY group_name, run""",
}
