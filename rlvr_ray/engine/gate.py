"""The precision gate in a scan: for each run given an fp32 master (``master:`` in the sweep), the
master moves of each tensor that bf16 rounding erased (``rlvr_ray.stats.gate``).

The base's, the run's and the master's copies are read through ``Checkpoint.read_rows``,
window by window (a window of rows; one expert's matrix of a fused expert tensor), so a huge
tensor costs a window of each, never the whole. A master that cannot be opened, lacks the
tensor, is not F32 or has another shape gives the run's rows a status saying so, and nothing
else of the scan changes. Tensors the tensors table does not compare (missing, unsupported
dtype, FP8, shapes that differ beyond the first dimension, empty) get no row. The counts are
torch's (``rlvr_ray.stats.gate``), imported by the first tensor counted: a scan naming no master
imports no torch here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyarrow as pa

from rlvr_ray.engine.plan import TensorSpec, Unit
from rlvr_ray.io.checkpoint import FLOAT_DTYPES, Checkpoint, CheckpointError, open_checkpoint
from rlvr_ray.io.schema import GATE_BIN_EDGES, PRECISION_GATE

if TYPE_CHECKING:
    from rlvr_ray.stats.gate import GateStats

#: status -> meaning (also in the README's table docs)
STATUSES = {
    "ok": "counted",
    "vocab_resized": "first dimension differs from the base's: the common rows counted",
    "master_error": "the master checkpoint could not be opened or read",
    "missing_in_master": "the tensor is not in the master",
    "master_not_f32": "the master's tensor is not stored as F32",
    "master_shape_mismatch": "the master's tensor has another shape than the run's",
    "nonfinite": "NaN or Inf in the base or the master; not counted",
    "read_error": "the base's, the run's or the master's tensor could not be read",
}
#: elements of one window read from each copy
WINDOW_NUMEL = 1 << 22


class _Skip(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class PrecisionGate:
    """Opens each master once (kept while the units that follow name it) and counts the gate."""

    def __init__(self) -> None:
        self._masters: dict[str, Checkpoint | str] = {}  # ref -> checkpoint, or why not
        self._unit: tuple[str, int] | None = None

    def master(self, ref: str) -> Checkpoint | str:
        """The master checkpoint ``ref`` (headers only), or the one line saying why it is not."""
        if ref not in self._masters:
            try:
                self._masters[ref] = open_checkpoint(ref, fingerprint=False)
            except CheckpointError as e:
                self._masters[ref] = str(e)
        return self._masters[ref]

    def _begin(self, unit: Unit) -> None:
        """A new unit: close the masters it does not name."""
        if self._unit == (unit.scan_id, unit.index):
            return
        self._unit = (unit.scan_id, unit.index)
        for ref in set(self._masters) - {r.master for r in unit.runs}:
            if isinstance(ck := self._masters.pop(ref), Checkpoint):
                ck.close()

    def table(
        self, unit: Unit, spec: TensorSpec, base: Checkpoint, runs: list[Checkpoint]
    ) -> pa.Table | None:
        """The precision_gate rows of tensor ``spec`` for the unit's runs that have a master
        (None when none has)."""
        if not any(r.master for r in unit.runs):
            return None
        self._begin(unit)
        rows = []
        for i, (r, ck) in enumerate(zip(unit.runs, runs, strict=True)):
            if r.master:
                row = self._row(unit, spec, base, i, ck)
                if row is not None:
                    rows.append(row)
        return pa.Table.from_pylist(rows, schema=PRECISION_GATE)

    def _row(self, unit: Unit, spec: TensorSpec, base: Checkpoint, i: int, run: Checkpoint):
        r = unit.runs[i]
        name0, name1 = spec.base_tensor or spec.name, spec.run_tensor(i)
        if name1 != spec.name:  # the run's tied embedding, for its head: counted once, as itself
            return None
        e0, e1 = base.entries.get(name0), run.entries.get(name1)
        if e0 is None or e1 is None or e0.numel == 0:
            return None
        if e0.dtype not in FLOAT_DTYPES or e1.dtype not in FLOAT_DTYPES:
            return None
        status, message, n_rows = "ok", None, e0.shape[0] if len(e0.shape) >= 2 else 1
        if e1.shape != e0.shape:  # compared only as the tensors table does: a resized vocabulary
            if spec.piece is not None or not (len(e0.shape) == len(e1.shape) >= 2):
                return None
            if e1.shape[1:] != e0.shape[1:]:
                return None
            n_rows = min(e0.shape[0], e1.shape[0])
            status, message = "vocab_resized", f"compared the common {n_rows} rows"
        row = {
            "scan_id": unit.scan_id,
            "group_name": unit.group,
            "run": r.name,
            **r.labels(),
            "family": unit.family,
            "tensor": spec.name,
            "expert": spec.expert,
            "layer": spec.layer,
            "depth": spec.depth,
            "role": spec.role,
            "master": r.master,
        }
        try:
            master = self._master_entry(r.master, name1, e1)
            stats = _count(base, name0, run, name1, master, name1, n_rows, spec.piece)
        except _Skip as s:
            return row | {"status": s.status, "message": s.message}
        except CheckpointError as e:
            return row | {"status": "read_error", "message": str(e)}
        counts = {
            "numel": stats.numel,
            "n_moved": stats.n_moved,
            "n_erased": stats.n_erased,
            "erased_share": stats.erased_share,
            "n_below": stats.n_below,
            "n_ties": stats.n_ties,
            "gate_hist": stats.hist,
            "n_round_mismatch": stats.n_round_mismatch,
        }
        return row | counts | {"status": status, "message": message}

    def _master_entry(self, ref: str, name: str, e1) -> Checkpoint:
        """The master checkpoint, if its tensor ``name`` can stand beside the run's (``e1``)."""
        ck = self.master(ref)
        if isinstance(ck, str):
            raise _Skip("master_error", ck)
        em = ck.entries.get(name)
        where = f"master {ref}, tensor {name}"
        if em is None:
            raise _Skip("missing_in_master", f"{where}: not in the master")
        if em.dtype != "F32":
            raise _Skip("master_not_f32", f"{where}: dtype {em.dtype}, expected F32")
        if em.shape != e1.shape:
            raise _Skip(
                "master_shape_mismatch",
                f"{where}: shape {list(em.shape)} vs the run's {list(e1.shape)}",
            )
        return ck


def _windows(shape: tuple[int, ...], n_rows: int, piece: int | None):
    """Row ranges [a, b) of the first dimension read at a time: WINDOW_NUMEL elements (at
    least one row); for a fused expert tensor, the one row (expert) compared."""
    if piece is not None:
        yield piece, piece + 1
        return
    row = math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)
    step = max(1, WINDOW_NUMEL // max(row, 1))
    for a in range(0, n_rows, step):
        yield a, min(a + step, n_rows)


def _count(base, name0, run, name1, master, name_m, n_rows, piece) -> GateStats:
    """The gate's counts over the tensor (or its expert ``piece``), window by window."""
    import torch

    from rlvr_ray.stats.gate import GateStats, gate_stats, merge
    from rlvr_ray.stats.masks import bf16_bits

    total = GateStats(hist=[0] * len(GATE_BIN_EDGES))
    shape = base.entries[name0].shape
    for a, b in _windows(shape, n_rows, piece):
        bits0 = bf16_bits(base.read_rows(name0, a, b).reshape(-1))[0]
        bits1 = bf16_bits(run.read_rows(name1, a, b).reshape(-1))[0]
        m = master.read_rows(name_m, a, b).reshape(-1)
        if not bool(torch.isfinite(bits0.view(torch.bfloat16)).all()):
            raise _Skip("nonfinite", f"checkpoint {base.ref}, tensor {name0}: NaN/Inf in the base")
        got = gate_stats(bits0, bits1, m, GATE_BIN_EDGES)
        if got.n_nonfinite:
            raise _Skip("nonfinite", f"master {master.ref}, tensor {name_m}: NaN/Inf values")
        total = merge(total, got)
    return total
