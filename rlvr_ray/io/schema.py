"""Arrow schemas of every output table, declared once, each column with its producer.

Writers, DuckDB views, the report and the tests import these; nothing else spells a column.
The README's "Tables" section documents each column; keep the two in step.

A column's producer is what fills it: for the per-unit tables, one of the row builders of
``rlvr_ray.engine.tables`` ("key": who the row is about; "status"; "mask": the mask pass;
"values": the value statistics; "geometry"; "consensus"; "map": a pooled map); "driver" and
"watch" write the scan tables. A test scans a varied sweep and checks that every column is set
by its producer and by no other, and that nothing undeclared is written. A table's ``current``
rule says which rows its current view keeps (``CURRENT``; rlvr_ray.sql.views makes the view from
it). ``schema_hash`` enters the scan id, so a scan resumed under other schemas starts afresh.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from rlvr_ray.sql.status import COMPARED, COMPARED_SQL, NOT_COMPARED_SQL, STATUSES  # noqa: F401
from rlvr_ray.sql.views import (
    CURRENT_ALL,
    CURRENT_COMMIT,
    CURRENT_GROUP,
    CURRENT_RUN,
    CURRENT_RUN_AND_BASE,
    CURRENT_RUN_OR_GROUP,
    native,
)

#: table -> column -> its producer
PRODUCERS: dict[str, dict[str, str]] = {}
#: table -> its current rule
CURRENT: dict[str, str] = {}


def _col(name: str, type_: pa.DataType, producer: str, nullable: bool = True):
    return pa.field(name, type_, nullable), producer


def _declare(table: str, current: str, *columns: tuple[pa.Field, str]) -> pa.Schema:
    """Declare ``table``: its columns (with their producers) and its current rule."""
    PRODUCERS[table] = {f.name: producer for f, producer in columns}
    CURRENT[table] = current
    return pa.schema([f for f, _ in columns])


#: Edges of the ULP-steps histogram of changed coordinates: bin b holds steps in
#: [ULP_BIN_EDGES[b], ULP_BIN_EDGES[b + 1]); the last bin is open-ended.
ULP_BIN_EDGES: tuple[int, ...] = (1, 2, 3, 4, 5, 9, 17, 65)

#: Edges of the precision gate's histogram of master moves by |dW_master| / (ULP(w0) / 2):
#: bin b holds ratios in [GATE_BIN_EDGES[b], GATE_BIN_EDGES[b + 1]); the last is open-ended.
#: Bins below 1 are moves bf16 rounding erases; 1 (a tie) opens the bin [1, 2).
GATE_BIN_EDGES: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _labels(producer: str) -> list[tuple[pa.Field, str]]:
    """A run's labels (``RunSpec.labels``)."""
    return [
        _col("algorithm", pa.string(), producer),
        _col("step", pa.int64(), producer),
        _col("dataset", pa.string(), producer),
        _col("seed", pa.int64(), producer),
        _col("series", pa.string(), producer),
    ]


def _run_tensor_key(producer: str) -> list[tuple[pa.Field, str]]:
    """The columns naming one run's tensor (the leading columns of a per-run, per-tensor row)."""
    return [
        _col("scan_id", pa.string(), producer, nullable=False),
        _col("group_name", pa.string(), producer, nullable=False),
        _col("run", pa.string(), producer, nullable=False),
        *_labels(producer),
        _col("family", pa.string(), producer),
        _col("tensor", pa.string(), producer, nullable=False),
        _col("expert", pa.int32(), producer),  # expert index of an MoE expert's matrix; else null
        _col("layer", pa.int32(), producer),
        _col("depth", pa.float64(), producer),  # layer / (n_layers - 1); null if not in a layer
        _col("role", pa.string(), producer),
    ]


SCANS = _declare(
    "scans",
    CURRENT_ALL,
    _col("scan_id", pa.string(), "driver", nullable=False),
    _col("group_name", pa.string(), "driver", nullable=False),
    _col("base_ref", pa.string(), "driver"),
    _col("base_fingerprint", pa.string(), "driver"),
    _col("family", pa.string(), "driver"),
    _col("n_runs", pa.int64(), "driver"),
    _col("runs", pa.list_(pa.string()), "driver"),
    _col("params", pa.string(), "driver"),  # JSON of the statistics parameters
    _col("n_units", pa.int64(), "driver"),
    _col("created_at", pa.timestamp("us", tz="UTC"), "driver"),
    _col("rlvr_ray_version", pa.string(), "driver"),
)

CHECKPOINTS = _declare(
    "checkpoints",
    CURRENT_RUN_AND_BASE,
    _col("scan_id", pa.string(), "driver", nullable=False),
    _col("group_name", pa.string(), "driver", nullable=False),
    _col("run", pa.string(), "driver", nullable=False),  # the base's row has is_base = true
    _col("is_base", pa.bool_(), "driver"),
    _col("ref", pa.string(), "driver"),
    _col("fingerprint", pa.string(), "driver"),
    _col("family", pa.string(), "driver"),
    *_labels("driver"),
    _col("consistency", pa.bool_(), "driver"),
    _col("n_tensors", pa.int64(), "driver"),
    _col("n_bytes", pa.int64(), "driver"),
    _col("dtypes", pa.string(), "driver"),  # comma-separated storage dtypes seen
)

TENSORS = _declare(
    "tensors",
    CURRENT_RUN,
    *_run_tensor_key("key"),
    _col("tower", pa.string(), "key"),  # 'text' | 'vision' | 'projector'; layer/depth within it
    _col("rows", pa.int64(), "mask"),
    _col("cols", pa.int64(), "mask"),
    _col("numel", pa.int64(), "mask"),  # coordinates compared
    _col("run_numel", pa.int64(), "key"),  # elements of the run's tensor; null: not in the run
    _col("base_numel", pa.int64(), "key"),  # elements of the base's; null: no copy to compare
    _col("dtype_base", pa.string(), "mask"),
    _col("dtype_run", pa.string(), "mask"),
    _col("rounded_to_bf16", pa.bool_(), "mask"),
    _col("n_changed", pa.int64(), "mask"),
    _col("update_density", pa.float64(), "mask"),
    _col("stripe_row", pa.float64(), "mask"),  # Gini coefficient of the row update ratios
    _col("stripe_col", pa.float64(), "mask"),  # Gini coefficient of the column update ratios
    _col("ulp1_share", pa.float64(), "mask"),  # share of changes that moved exactly 1 ULP
    _col("ulp_hist", pa.list_(pa.int64()), "mask"),  # counts per ULP_BIN_EDGES bin
    _col("ulp_max", pa.int64(), "mask"),
    _col("rel_frob", pa.float64(), "values"),  # ||W1 - W0||_F / ||W0||_F
    _col("max_abs_update", pa.float64(), "values"),
    _col("status", pa.string(), "status"),  # see STATUSES
    _col("message", pa.string(), "status"),
    # the base's (run's) tensor compared, when not ``tensor``: a tied embedding standing in
    # for an output head that checkpoint does not store
    _col("base_tensor", pa.string(), "key"),
    _col("run_tensor", pa.string(), "key"),
    # geometry (null when not computed; geometry_status says why, or that it is no finding:
    # 'ok' | 'k_not_below_rank' | 'small_gap' | 'skipped_...' | 'error: ...')
    _col("geometry_status", pa.string(), "geometry"),
    _col("overlap_princ", pa.float64(), "geometry"),
    _col("overlap_low", pa.float64(), "geometry"),
    _col("overlap_princ_not_low", pa.float64(), "geometry"),
    _col("princ_density", pa.float64(), "geometry"),
    _col("low_density", pa.float64(), "geometry"),
    _col("princ_not_low_density", pa.float64(), "geometry"),
    _col("nss", pa.float64(), "geometry"),
    _col("max_angle_left", pa.float64(), "geometry"),
    _col("max_angle_right", pa.float64(), "geometry"),
    # certified bound (rad) on the error of every angle, left and right (stats/spectral.py)
    _col("angle_error_bound", pa.float64(), "geometry"),
    _col(
        "rank_k", pa.int64(), "geometry"
    ),  # the k used for this matrix (relative rule or absolute)
    _col("spectral_k", pa.int64(), "geometry"),
    _col("sigma_gap", pa.float64(), "geometry"),  # relative singular-value gap at k (the smaller)
    _col("sigma_max_base", pa.float64(), "geometry"),  # spectral norm of W0
    _col("sigma_max_run", pa.float64(), "geometry"),  # spectral norm of W1
    _col("stable_rank_base", pa.float64(), "geometry"),  # ||W0||_F^2 / sigma_max^2
    _col("stable_rank_run", pa.float64(), "geometry"),  # ||W1||_F^2 / sigma_max^2
    # the update dW = W1 - W0: numerical rank (numpy matrix_rank's tolerance), stable rank,
    # effective rank (exp entropy of s_i / sum s), share of ||dW||_F^2 in the base's
    # top-spectral_k left (right) singular subspace
    _col("update_rank", pa.int64(), "geometry"),
    _col("update_stable_rank", pa.float64(), "geometry"),
    _col("update_effective_rank", pa.float64(), "geometry"),
    _col("update_energy_left", pa.float64(), "geometry"),
    _col("update_energy_right", pa.float64(), "geometry"),
)

PROFILES = _declare(
    "profiles",
    CURRENT_RUN,
    _col("scan_id", pa.string(), "key", nullable=False),
    _col("group_name", pa.string(), "key", nullable=False),
    _col("run", pa.string(), "key", nullable=False),
    _col("tensor", pa.string(), "key", nullable=False),
    _col("expert", pa.int32(), "key"),
    _col("axis", pa.string(), "key", nullable=False),  # 'row' | 'col'
    # [idx]: the share of row (column) idx's coordinates changed (PACKED: the atlas's view
    # has one row per idx)
    _col("ratio", pa.list_(pa.float32()), "mask"),
)

CONSISTENCY = _declare(
    "consistency",
    CURRENT_GROUP,
    _col("scan_id", pa.string(), "key", nullable=False),
    _col("group_name", pa.string(), "key", nullable=False),
    _col("tensor", pa.string(), "key", nullable=False),
    _col("expert", pa.int32(), "key"),
    _col("family", pa.string(), "key"),
    _col("layer", pa.int32(), "key"),
    _col("depth", pa.float64(), "key"),
    _col("role", pa.string(), "key"),
    _col("tower", pa.string(), "key"),
    _col("numel", pa.int64(), "consensus"),
    _col("n_runs", pa.int64(), "consensus"),
    _col("runs", pa.list_(pa.string()), "consensus"),
    _col("mean_jaccard", pa.float64(), "consensus"),
    _col("jaccard_baseline", pa.float64(), "consensus"),
    _col(
        "consensus_counts", pa.list_(pa.int64()), "consensus"
    ),  # [c] = coords changed by exactly c runs
    _col("status", pa.string(), "status"),
)

CONSENSUS_PROFILES = _declare(
    "consensus_profiles",
    CURRENT_GROUP,
    _col("scan_id", pa.string(), "key", nullable=False),
    _col("group_name", pa.string(), "key", nullable=False),
    _col("tensor", pa.string(), "key", nullable=False),
    _col("expert", pa.int32(), "key"),
    _col("axis", pa.string(), "key", nullable=False),
    _col("consensus", pa.list_(pa.float32()), "consensus"),  # [idx]: mean of C_ij over the row
)

#: packed tables -> their list column: stored (Parquet, and the atlas's ``<table>_packed``)
#: one row per run x tensor x axis with the values as one list, a row's (column's) value at its
#: index; the atlas's views (``<table>``, ``<table>_all``) have one row per value, its index in
#: ``idx``. A 1.5B model's profiles are ~700 rows of lists instead of 1.3 M rows, each repeating
#: its keys: measured, 6x faster to write as Parquet, 13x to read back, 7x to load into DuckDB
PACKED: dict[str, str] = {"profiles": "ratio", "consensus_profiles": "consensus"}


def stored(table: str) -> str:
    """The atlas's native table holding the rows of ``table`` (every scan ever written)."""
    return native(table, table in PACKED)


SPECTRA = _declare(
    "spectra",
    CURRENT_RUN,
    _col("scan_id", pa.string(), "key", nullable=False),
    _col("group_name", pa.string(), "key", nullable=False),
    _col("run", pa.string(), "key", nullable=False),
    _col("tensor", pa.string(), "key", nullable=False),
    _col("expert", pa.int32(), "key"),
    _col("i", pa.int32(), "geometry", nullable=False),
    _col("sigma_base", pa.float64(), "geometry"),
    _col("sigma_run", pa.float64(), "geometry"),
    _col("angle_left", pa.float64(), "geometry"),
    _col("angle_right", pa.float64(), "geometry"),
)

MAPS = _declare(
    "maps",
    CURRENT_RUN_OR_GROUP,
    _col("scan_id", pa.string(), "key", nullable=False),
    _col("group_name", pa.string(), "key", nullable=False),
    _col("run", pa.string(), "key", nullable=False),  # '*' for the consensus map
    _col("tensor", pa.string(), "key", nullable=False),
    _col("expert", pa.int32(), "key"),
    _col("kind", pa.string(), "key", nullable=False),  # 'mask' | 'consensus'
    _col("map_rows", pa.int32(), "map"),
    _col("map_cols", pa.int32(), "map"),
    _col("values", pa.list_(pa.float32()), "map"),  # row-major pooled update density
)

#: one row per run x tensor for runs given an fp32 master (``master:`` in the sweep); see
#: rlvr_ray.stats.gate for the definitions. Runs without a master have no rows.
PRECISION_GATE = _declare(
    "precision_gate",
    CURRENT_RUN,
    *_run_tensor_key("gate"),
    _col("master", pa.string(), "gate"),  # the master checkpoint's reference
    _col("numel", pa.int64(), "gate"),  # coordinates compared
    _col("n_moved", pa.int64(), "gate"),  # master != base value (upcast to fp32)
    _col("n_erased", pa.int64(), "gate"),  # moved, and the bf16 checkpoint unchanged
    _col("erased_share", pa.float64(), "gate"),  # n_erased / n_moved
    _col("n_below", pa.int64(), "gate"),  # moved less than half a bf16 ULP
    _col("n_ties", pa.int64(), "gate"),  # moved exactly half a ULP
    _col("gate_hist", pa.list_(pa.int64()), "gate"),  # moves per GATE_BIN_EDGES bin
    _col("n_round_mismatch", pa.int64(), "gate"),  # bf16(master) != the checkpoint's value
    _col("status", pa.string(), "gate"),  # see rlvr_ray.engine.gate.STATUSES
    _col("message", pa.string(), "gate"),
)

#: one row per (Hub repo, commit) the watch looked at and what it decided; history is kept
#: (the ``watch`` view keeps the latest row of each (repo, sha)).
WATCH = _declare(
    "watch",
    CURRENT_COMMIT,
    _col("repo", pa.string(), "watch", nullable=False),  # Hub repo id of the candidate
    _col("sha", pa.string(), "watch", nullable=False),  # commit sha
    _col("base", pa.string(), "watch"),  # Hub repo id of the base it was compared with
    _col("created", pa.timestamp("us", tz="UTC"), "watch"),  # repo creation on the Hub
    _col("tags", pa.list_(pa.string()), "watch"),
    _col("rl_evidence", pa.string(), "watch"),  # why it looks like RL (tags, card), or null
    _col("status", pa.string(), "watch"),  # 'scanned' | 'skipped' | 'failed'
    _col("reason", pa.string(), "watch"),  # why skipped / failed
    _col("attempt", pa.int64(), "watch"),  # 1 for the first try of this (repo, sha)
    _col("group_name", pa.string(), "watch"),
    _col("run", pa.string(), "watch"),
    _col("scan_id", pa.string(), "watch"),  # the scan that holds its rows, when scanned
    _col("scanned_at", pa.timestamp("us", tz="UTC"), "watch"),  # when the decision was made
)

#: table name -> schema; the order is the write order of a unit (tensors last).
TABLES: dict[str, pa.Schema] = {
    "profiles": PROFILES,
    "consensus_profiles": CONSENSUS_PROFILES,
    "consistency": CONSISTENCY,
    "spectra": SPECTRA,
    "maps": MAPS,
    "precision_gate": PRECISION_GATE,
    "tensors": TENSORS,
}

#: tables written once per scan rather than per unit
SCAN_TABLES: dict[str, pa.Schema] = {"scans": SCANS, "checkpoints": CHECKPOINTS, "watch": WATCH}

ALL_TABLES: dict[str, pa.Schema] = {**SCAN_TABLES, **TABLES}


def schema_hash() -> str:
    """A hash of every table's columns (names, types, nullability) and the ULP bins: what a
    scan's rows mean. It enters the scan id."""
    h = hashlib.sha256(repr((ULP_BIN_EDGES, GATE_BIN_EDGES)).encode())
    for table, schema in sorted(ALL_TABLES.items()):
        h.update(f"{table}:{schema.to_string(show_schema_metadata=False)}\n".encode())
    return h.hexdigest()[:16]
