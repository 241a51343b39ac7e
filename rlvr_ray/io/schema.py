"""Arrow schemas of every output table, declared once.

Writers, DuckDB views, the report and the tests import these; nothing else spells a column.
The README's "Tables" section documents each column; keep the two in step.
"""

from __future__ import annotations

import pyarrow as pa

#: Edges of the ULP-steps histogram of changed coordinates: bin b holds steps in
#: [ULP_BIN_EDGES[b], ULP_BIN_EDGES[b + 1]); the last bin is open-ended.
ULP_BIN_EDGES: tuple[int, ...] = (1, 2, 3, 4, 5, 9, 17, 65)

_LABELS = [
    pa.field("algorithm", pa.string()),
    pa.field("step", pa.int64()),
    pa.field("dataset", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("series", pa.string()),
]

SCANS = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("base_ref", pa.string()),
        pa.field("base_fingerprint", pa.string()),
        pa.field("family", pa.string()),
        pa.field("n_runs", pa.int64()),
        pa.field("runs", pa.list_(pa.string())),
        pa.field("params", pa.string()),  # JSON of the statistics parameters
        pa.field("n_units", pa.int64()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("rlvr_ray_version", pa.string()),
    ]
)

CHECKPOINTS = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("run", pa.string(), nullable=False),  # the base's row has is_base = true
        pa.field("is_base", pa.bool_()),
        pa.field("ref", pa.string()),
        pa.field("fingerprint", pa.string()),
        pa.field("family", pa.string()),
        *_LABELS,
        pa.field("consistency", pa.bool_()),
        pa.field("n_tensors", pa.int64()),
        pa.field("n_bytes", pa.int64()),
        pa.field("dtypes", pa.string()),  # comma-separated storage dtypes seen
    ]
)

TENSORS = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        *_LABELS,
        pa.field("family", pa.string()),
        pa.field("tensor", pa.string(), nullable=False),
        pa.field("expert", pa.int32()),  # expert index of an MoE expert's matrix; else null
        pa.field("layer", pa.int32()),
        pa.field("depth", pa.float64()),  # layer / (n_layers - 1); null if not in a layer
        pa.field("role", pa.string()),
        pa.field("tower", pa.string()),  # 'text' | 'vision' | 'projector'; layer/depth within it
        pa.field("rows", pa.int64()),
        pa.field("cols", pa.int64()),
        pa.field("numel", pa.int64()),  # coordinates compared
        pa.field("run_numel", pa.int64()),  # elements of the run's tensor; null: not in the run
        pa.field("dtype_base", pa.string()),
        pa.field("dtype_run", pa.string()),
        pa.field("rounded_to_bf16", pa.bool_()),
        pa.field("n_changed", pa.int64()),
        pa.field("update_density", pa.float64()),
        pa.field("stripe_row", pa.float64()),  # Gini coefficient of the row update ratios
        pa.field("stripe_col", pa.float64()),  # Gini coefficient of the column update ratios
        pa.field("ulp1_share", pa.float64()),  # share of changes that moved exactly 1 ULP
        pa.field("ulp_hist", pa.list_(pa.int64())),  # counts per ULP_BIN_EDGES bin
        pa.field("ulp_max", pa.int64()),
        pa.field("rel_frob", pa.float64()),  # ||W1 - W0||_F / ||W0||_F
        pa.field("max_abs_update", pa.float64()),
        pa.field("status", pa.string()),  # see rlvr_ray.engine.worker.STATUSES
        pa.field("message", pa.string()),
        # the base's (run's) tensor compared, when not ``tensor``: a tied embedding standing in
        # for an output head that checkpoint does not store
        pa.field("base_tensor", pa.string()),
        pa.field("run_tensor", pa.string()),
        # geometry (null when not computed; geometry_status says why, or that it is no finding:
        # 'ok' | 'k_not_below_rank' | 'small_gap' | 'skipped_...' | 'error: ...')
        pa.field("geometry_status", pa.string()),
        pa.field("overlap_princ", pa.float64()),
        pa.field("overlap_low", pa.float64()),
        pa.field("overlap_princ_not_low", pa.float64()),
        pa.field("princ_density", pa.float64()),
        pa.field("low_density", pa.float64()),
        pa.field("princ_not_low_density", pa.float64()),
        pa.field("nss", pa.float64()),
        pa.field("max_angle_left", pa.float64()),
        pa.field("max_angle_right", pa.float64()),
        # certified bound (rad) on the error of every angle, left and right (spectral.py)
        pa.field("angle_error_bound", pa.float64()),
        pa.field("rank_k", pa.int64()),  # the k used for this matrix (relative rule or absolute)
        pa.field("spectral_k", pa.int64()),
        pa.field("sigma_gap", pa.float64()),  # relative singular-value gap at k (the smaller)
        pa.field("sigma_max_base", pa.float64()),  # spectral norm of W0
        pa.field("sigma_max_run", pa.float64()),  # spectral norm of W1
        pa.field("stable_rank_base", pa.float64()),  # ||W0||_F^2 / sigma_max^2
        pa.field("stable_rank_run", pa.float64()),  # ||W1||_F^2 / sigma_max^2
        # the update dW = W1 - W0: numerical rank (numpy matrix_rank's tolerance), stable rank,
        # effective rank (exp entropy of s_i / sum s), share of ||dW||_F^2 in the base's
        # top-spectral_k left (right) singular subspace
        pa.field("update_rank", pa.int64()),
        pa.field("update_stable_rank", pa.float64()),
        pa.field("update_effective_rank", pa.float64()),
        pa.field("update_energy_left", pa.float64()),
        pa.field("update_energy_right", pa.float64()),
    ]
)

PROFILES = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        pa.field("tensor", pa.string(), nullable=False),
        pa.field("expert", pa.int32()),
        pa.field("axis", pa.string(), nullable=False),  # 'row' | 'col'
        pa.field("idx", pa.int32(), nullable=False),
        pa.field("ratio", pa.float32()),  # share of that row's (column's) coordinates changed
    ]
)

CONSISTENCY = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("tensor", pa.string(), nullable=False),
        pa.field("expert", pa.int32()),
        pa.field("family", pa.string()),
        pa.field("layer", pa.int32()),
        pa.field("depth", pa.float64()),
        pa.field("role", pa.string()),
        pa.field("tower", pa.string()),
        pa.field("numel", pa.int64()),
        pa.field("n_runs", pa.int64()),
        pa.field("runs", pa.list_(pa.string())),
        pa.field("mean_jaccard", pa.float64()),
        pa.field("jaccard_baseline", pa.float64()),
        pa.field(
            "consensus_counts", pa.list_(pa.int64())
        ),  # [c] = coords changed by exactly c runs
        pa.field("status", pa.string()),
    ]
)

CONSENSUS_PROFILES = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("tensor", pa.string(), nullable=False),
        pa.field("expert", pa.int32()),
        pa.field("axis", pa.string(), nullable=False),
        pa.field("idx", pa.int32(), nullable=False),
        pa.field("consensus", pa.float32()),  # mean of C_ij over the row (column)
    ]
)

SPECTRA = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        pa.field("tensor", pa.string(), nullable=False),
        pa.field("expert", pa.int32()),
        pa.field("i", pa.int32(), nullable=False),
        pa.field("sigma_base", pa.float64()),
        pa.field("sigma_run", pa.float64()),
        pa.field("angle_left", pa.float64()),
        pa.field("angle_right", pa.float64()),
    ]
)

MAPS = pa.schema(
    [
        pa.field("scan_id", pa.string(), nullable=False),
        pa.field("group_name", pa.string(), nullable=False),
        pa.field("run", pa.string(), nullable=False),  # '*' for the consensus map
        pa.field("tensor", pa.string(), nullable=False),
        pa.field("expert", pa.int32()),
        pa.field("kind", pa.string(), nullable=False),  # 'mask' | 'consensus'
        pa.field("map_rows", pa.int32()),
        pa.field("map_cols", pa.int32()),
        pa.field("values", pa.list_(pa.float32())),  # row-major pooled update density
    ]
)

#: one row per (Hub repo, commit) the watch looked at and what it decided; history is kept
#: (the ``watch`` view keeps the latest row of each (repo, sha)).
WATCH = pa.schema(
    [
        pa.field("repo", pa.string(), nullable=False),  # Hub repo id of the candidate
        pa.field("sha", pa.string(), nullable=False),  # commit sha
        pa.field("base", pa.string()),  # Hub repo id of the base it was compared with
        pa.field("created", pa.timestamp("us", tz="UTC")),  # repo creation on the Hub
        pa.field("tags", pa.list_(pa.string())),
        pa.field("rl_evidence", pa.string()),  # why it looks like RL (tags, card), or null
        pa.field("status", pa.string()),  # 'scanned' | 'skipped' | 'failed'
        pa.field("reason", pa.string()),  # why skipped / failed
        pa.field("attempt", pa.int64()),  # 1 for the first try of this (repo, sha)
        pa.field("group_name", pa.string()),
        pa.field("run", pa.string()),
        pa.field("scan_id", pa.string()),  # the scan that holds its rows, when scanned
        pa.field("scanned_at", pa.timestamp("us", tz="UTC")),  # when the decision was made
    ]
)

#: table name -> schema; the order is the write order of a unit (tensors last).
TABLES: dict[str, pa.Schema] = {
    "profiles": PROFILES,
    "consensus_profiles": CONSENSUS_PROFILES,
    "consistency": CONSISTENCY,
    "spectra": SPECTRA,
    "maps": MAPS,
    "tensors": TENSORS,
}

#: tables written once per scan rather than per unit
SCAN_TABLES: dict[str, pa.Schema] = {"scans": SCANS, "checkpoints": CHECKPOINTS, "watch": WATCH}

ALL_TABLES: dict[str, pa.Schema] = {**SCAN_TABLES, **TABLES}


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
