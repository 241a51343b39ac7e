"""The headline tables of ``rlvr-ray summary`` (and of the end of a scan), as SQL over the atlas."""

import math

from rlvr_ray.sql.status import NOT_COMPARED_SQL

# (name, title, SQL): the name keys ``--format json`` and picks a table with ``--table``
SUMMARY_SECTIONS: list[tuple[str, str, str]] = [
    (
        "runs",
        "Per run: share of weights bitwise unchanged (sparsity; bf16, or FP8 as stored), of changes "
        "that moved 1 ULP (one step of that format), "
        "and of the model's weights (coverage) and tensors that were compared",
        "SELECT group_name, run, algorithm, step, sparsity, ulp1_share, coverage, tensor_coverage "
        "FROM summary",
    ),
    (
        "runs_geometry",
        "Per run: overlap of the update with principal / low-magnitude weights vs random baseline, "
        "median NSS and max principal angle (rad) over tensors; overlaps and angles over tensors "
        "with geometry_status 'ok' only (geometry_flagged: the others)",
        "SELECT group_name, run, algorithm, overlap_princ, princ_baseline, overlap_low, low_baseline, "
        "median_nss, median_max_angle, geometry_flagged FROM summary WHERE median_nss IS NOT NULL",
    ),
    (
        "algorithms",
        "Per algorithm, final checkpoints only (the latest step of each series): mean sparsity "
        "(and its range over runs), 1-ULP share, overlaps, median NSS",
        "SELECT algorithm, n_runs, sparsity, min_sparsity, max_sparsity, ulp1_share, "
        "overlap_princ, overlap_low, median_nss FROM algorithm_summary "
        "ORDER BY algorithm = 'sft', algorithm",
    ),
    (
        "groups",
        "Per group: mean pairwise Jaccard of update masks vs the independent-Bernoulli baseline",
        "SELECT group_name, n_runs, mean_jaccard, jaccard_baseline, "
        "mean_jaccard / nullif(jaccard_baseline, 0) AS lift FROM group_summary "
        "ORDER BY group_name",
    ),
]

#: a run whose compared share of weights is below this gets a one-line warning
COVERAGE_WARN = 0.99
COVERAGE_SQL = (
    "SELECT group_name, run, coverage, n_tensors, n_tensors_all FROM run_sparsity "
    "WHERE coverage < ? ORDER BY group_name, run"
)


def of_scans(sql: str) -> str:
    """``sql`` (a summary table, or :data:`COVERAGE_SQL`) kept to the groups of the scans given
    as its last parameter (a list of scan ids), in its own order."""
    return (
        f"SELECT * FROM ({sql}) WHERE group_name IN "
        "(SELECT group_name FROM scans_all WHERE list_contains(?, scan_id))"
    )


def coverage_warning(group: str, run: str, coverage: float, n_tensors: int, n_all: int) -> str:
    """The one line that says a run's sparsity stands on part of its weights."""
    pct = math.floor(coverage * 1000) / 10  # never rounds up to the threshold

    def quoted(v: str) -> str:
        return "'" + v.replace("'", "''") + "'"

    return (
        f"warning: group {group}, run {run}: only {pct:.1f}% of the model's weights were "
        f"compared ({n_tensors or 0} of {n_all} tensors); see SELECT tensor, status, message "
        f"FROM tensors WHERE group_name = {quoted(group)} AND run = {quoted(run)} "
        f"AND {NOT_COMPARED_SQL}"
    )
