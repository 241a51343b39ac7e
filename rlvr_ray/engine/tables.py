"""A unit's tables: the measurements of its tensors (``passes.TensorResult``) as Arrow tables.

The only engine module that spells column names. Every column is declared once in
``rlvr_ray.io.schema`` with its producer: one of the functions here that fill a row's columns
(``key``: who the row is about; ``status``; ``mask``: the mask pass; ``values``: the value
statistics; ``geometry``; ``consensus``; ``map``: a pooled map). ``UnitTables`` records which
producer set which column, so a test can check every column against its declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, fields

import numpy as np
import pyarrow as pa

from rlvr_ray.engine.geometry import Geometry
from rlvr_ray.engine.passes import Compared, TensorResult
from rlvr_ray.engine.plan import RunSpec, TensorSpec, Unit
from rlvr_ray.engine.source import FP8_DTYPES
from rlvr_ray.io.checkpoint import Checkpoint
from rlvr_ray.io.schema import PACKED, TABLES
from rlvr_ray.stats.records import gini_counts

#: RunGeometry's fields that are not tensors-table columns (the spectra table holds them)
_NOT_COLUMNS = ("sigma_run", "sigma_run_all", "angle_left", "angle_right")


def _host(x) -> np.ndarray:
    """A statistic's vector or grid (a numpy array, or a torch tensor on any device) -> numpy."""
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


class UnitTables:
    """The rows and pieces of one unit's tables, as its tensors are measured."""

    def __init__(self, unit: Unit, runs: list[Checkpoint]):
        self.unit, self.runs = unit, runs
        self.rows: dict[str, list[dict]] = {"tensors": [], "consistency": [], "maps": []}
        self.pieces: dict[str, list[pa.Table]] = {}
        #: table -> (run, tensor, axis, values, expert) per profile, made one table per unit
        self.profiles: dict[str, list[tuple]] = {}
        #: table -> column -> the producers that set it
        self.produced: dict[str, dict[str, set[str]]] = {}

    def _record(self, table: str, producer: str, columns) -> None:
        seen = self.produced.setdefault(table, {})
        for col in columns:
            seen.setdefault(col, set()).add(producer)

    def _compose(self, table: str, *parts: tuple[str, dict]) -> dict:
        """One row from (producer, its columns) parts."""
        row = {}
        for producer, columns in parts:
            self._record(table, producer, columns)
            row.update(columns)
        return row

    def _profile(self, table: str, run: str | None, spec: TensorSpec, axis: str, values) -> None:
        self.profiles.setdefault(table, []).append((run, spec.name, axis, values, spec.expert))

    # -- one tensor ----------------------------------------------------------------------------

    def add_tensor(self, spec: TensorSpec, result: TensorResult) -> None:
        """Rows for tensor ``spec``: the skipped runs', the consensus's, each compared run's."""
        unit = self.unit
        for s in result.skipped:
            status = {"status": s.status, "message": s.message}
            key = self._key(spec, s.run, result)
            row = self._compose("tensors", ("key", key), ("status", status), ("mask", s.columns))
            self.rows["tensors"].append(row)
        if result.consensus is not None:
            self._add_consensus(spec, result)
        for c in result.compared:
            if isinstance(c.geometry, Geometry):
                self._add_spectra(spec, unit.runs[c.run].name, c.geometry)
            self._add_run(spec, result, c)

    def _key(self, spec: TensorSpec, run: int, result: TensorResult) -> dict:
        r: RunSpec = self.unit.runs[run]
        base = result.base  # None: the base has no copy to compare (missing, empty, ...)
        name = spec.run_tensor(run)
        entry = self.runs[run].entries.get(name)
        return {
            "scan_id": self.unit.scan_id,
            "group_name": self.unit.group,
            "run": r.name,
            **r.labels(),
            "family": self.unit.family,
            "tensor": spec.name,
            "expert": spec.expert,
            "layer": spec.layer,
            "depth": spec.depth,
            "role": spec.role,
            "tower": spec.tower,
            "base_tensor": spec.base_tensor,
            "run_tensor": name if name != spec.name else None,
            "run_numel": entry.numel if entry is not None else None,
            "base_numel": base.shape[0] * base.shape[1] if base is not None else None,
        }

    def _add_run(self, spec: TensorSpec, result: TensorResult, c: Compared) -> None:
        """One compared run's tensors row, profiles and pooled map."""
        base, ms = result.base, c.mask
        rows, cols = c.src.shape
        is_matrix = rows > 1
        update_sumsq, max_abs, message = ms.update_sumsq, ms.max_abs_update, c.message
        base_sumsq = c.base_sumsq
        if base.dtype in FP8_DTYPES:  # the mask pass saw patterns: values from the FP8 pass
            update_sumsq, base_sumsq, max_abs, why = c.values or (None, 0, None, "no values")
            message = "; ".join(m for m in (message, why) if m) or None
        mask = {
            "rows": rows,
            "cols": cols,
            "numel": ms.numel,
            "dtype_base": base.dtype,
            "dtype_run": c.src.dtype,
            "rounded_to_bf16": base.rounded or c.src.rounded,
            "n_changed": ms.n_changed,
            "update_density": ms.update_density,
            "stripe_row": gini_counts(ms.row_counts) if is_matrix else None,
            "stripe_col": gini_counts(ms.col_counts) if is_matrix else None,
            "ulp1_share": ms.ulp1_share,
            "ulp_hist": ms.ulp_hist,
            "ulp_max": ms.ulp_max,
        }
        relative = base_sumsq and update_sumsq is not None
        values = {
            "rel_frob": (update_sumsq / base_sumsq) ** 0.5 if relative else None,
            "max_abs_update": max_abs,
        }
        row = self._compose(
            "tensors",
            ("key", self._key(spec, c.run, result)),
            ("mask", mask),
            ("values", values),
            ("status", {"status": c.status, "message": message}),
            ("geometry", _geometry_columns(c.geometry)),
        )
        self.rows["tensors"].append(row)
        if is_matrix:
            name = self.unit.runs[c.run].name
            self._profile("profiles", name, spec, "row", _host(ms.row_ratio))
            self._profile("profiles", name, spec, "col", _host(ms.col_ratio))
            self._add_map(name, spec, "mask", ms.pooled)

    def _add_consensus(self, spec: TensorSpec, result: TensorResult) -> None:
        unit, cons = self.unit, result.consensus
        stats = cons.stats
        key = {
            "scan_id": unit.scan_id,
            "group_name": unit.group,
            "tensor": spec.name,
            "expert": spec.expert,
            "family": unit.family,
            "layer": spec.layer,
            "depth": spec.depth,
            "role": spec.role,
            "tower": spec.tower,
        }
        consensus = {
            "numel": cons.numel,
            "n_runs": stats.n_runs,
            "runs": [unit.runs[run].name for run in cons.members],
            "mean_jaccard": stats.mean_jaccard,
            "jaccard_baseline": stats.jaccard_baseline,
            "consensus_counts": stats.consensus_counts,
        }
        row = self._compose(
            "consistency", ("key", key), ("consensus", consensus), ("status", {"status": "ok"})
        )
        self.rows["consistency"].append(row)
        if cons.is_matrix:
            row_consensus = _host(stats.row_consensus)
            self._profile("consensus_profiles", None, spec, "row", row_consensus)
            self._profile("consensus_profiles", None, spec, "col", _host(stats.col_consensus))
            self._add_map("*", spec, "consensus", stats.pooled)

    def _add_map(self, run: str, spec: TensorSpec, kind: str, pooled) -> None:
        unit = self.unit
        key = {
            "scan_id": unit.scan_id,
            "group_name": unit.group,
            "run": run,
            "tensor": spec.name,
            "expert": spec.expert,
            "kind": kind,
        }
        grid = {
            "map_rows": pooled.shape[0],
            "map_cols": pooled.shape[1],
            "values": _host(pooled).astype(np.float32).ravel(),
        }
        self.rows["maps"].append(self._compose("maps", ("key", key), ("map", grid)))

    def _add_spectra(self, spec: TensorSpec, run: str, geo: Geometry) -> None:
        """Spectra rows: the i-th largest singular value of base and run, the i-th largest
        angles; i < spectral_k, or every i < min(rows, cols) with ``full_spectrum`` (angles
        null from spectral_k on)."""
        unit, g = self.unit, geo.run
        k = g.spectral_k
        n = geo.base.sigma.numel() if unit.params.full_spectrum else k
        pad = [None] * (n - k)
        key = {
            "scan_id": [unit.scan_id] * n,
            "group_name": [unit.group] * n,
            "run": [run] * n,
            "tensor": [spec.name] * n,
        }
        spectrum = {
            "i": pa.array(range(n), pa.int32()),
            "sigma_base": geo.base.sigma[:n].cpu().numpy(),
            "sigma_run": g.sigma_run_all[:n].cpu().numpy(),
            "angle_left": pa.array(g.angle_left.cpu().tolist() + pad, pa.float64()),
            "angle_right": pa.array(g.angle_right.cpu().tolist() + pad, pa.float64()),
        }
        expert = {"expert": pa.array([spec.expert] * n, pa.int32())}
        self.pieces.setdefault("spectra", []).append(
            pa.table(
                self._compose("spectra", ("key", key), ("geometry", spectrum), ("key", expert))
            )
        )

    def add_gate(self, gate: pa.Table) -> None:
        """One tensor's precision_gate rows (``rlvr_ray.engine.gate`` builds them whole)."""
        self._record("precision_gate", "gate", gate.column_names)
        self.pieces.setdefault("precision_gate", []).append(gate)

    # -- the unit's tables ---------------------------------------------------------------------

    def build(self) -> dict[str, pa.Table]:
        """table -> the unit's Arrow table, for every unit table (empty ones too)."""
        return {table: BUILDERS[table](self, table, schema) for table, schema in TABLES.items()}

    def _rows_table(self, table: str, schema: pa.Schema) -> pa.Table:
        return pa.Table.from_pylist(self.rows[table], schema=schema)

    def _pieces_table(self, table: str, schema: pa.Schema) -> pa.Table:
        pieces = [p.select(schema.names).cast(schema) for p in self.pieces.get(table, [])]
        return pa.concat_tables(pieces) if pieces else schema.empty_table()

    def _profiles_table(self, table: str, schema: pa.Schema) -> pa.Table:
        """One unit's profiles (row and column ratios, or consensus), packed: a row per profile,
        its values as one list (``rlvr_ray.io.schema.PACKED``)."""
        pieces = self.profiles.get(table, [])
        n, unit = len(pieces), self.unit
        key = {"scan_id": [unit.scan_id] * n, "group_name": [unit.group] * n}
        if "run" in schema.names:
            key["run"] = [p[0] for p in pieces]
        key |= {
            "tensor": [p[1] for p in pieces],
            "expert": [p[4] for p in pieces],
            "axis": [p[2] for p in pieces],
        }
        values = {PACKED[table]: _lists([p[3] for p in pieces])}
        producer = "mask" if table == "profiles" else "consensus"
        cols = self._compose(table, ("key", key), (producer, values)) if n else {}
        return pa.table({f.name: cols.get(f.name, []) for f in schema}, schema=schema)

    def _maps_table(self, table: str, schema: pa.Schema) -> pa.Table:
        """The unit's maps, column by column (the values as one list array, no Python floats)."""
        rows = self.rows["maps"]
        cols = {f.name: [r[f.name] for r in rows] for f in schema if f.name != "values"}
        cols["values"] = _lists([r["values"] for r in rows])
        return pa.table({f.name: cols[f.name] for f in schema}, schema=schema)


#: unit table -> its builder
BUILDERS: dict[str, Callable[[UnitTables, str, pa.Schema], pa.Table]] = {
    "tensors": UnitTables._rows_table,
    "consistency": UnitTables._rows_table,
    "profiles": UnitTables._profiles_table,
    "consensus_profiles": UnitTables._profiles_table,
    "spectra": UnitTables._pieces_table,
    "maps": UnitTables._maps_table,
    "precision_gate": UnitTables._pieces_table,
}


def _geometry_columns(geometry: Geometry | str | None) -> dict:
    """The tensors-table columns of one run's geometry: every one when it was measured
    (whatever its status), else the status saying why not."""
    if isinstance(geometry, Geometry):
        g = geometry.run
        columns = {f.name: getattr(g, f.name) for f in fields(g) if f.name not in _NOT_COLUMNS}
        return {**columns, **asdict(geometry.update)}
    return {"geometry_status": geometry}


def _lists(values: list) -> pa.Array:
    """float32 vectors as one Arrow list array (one buffer of values, no Python floats)."""
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.concatenate([np.asarray(v, dtype=np.float32) for v in values]) if values else []
    return pa.ListArray.from_arrays(offsets, pa.array(flat, pa.float32()))
