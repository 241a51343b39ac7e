"""Every statistic of one tensor across a group's checkpoints, behind one call: ``measure``.

It decides which runs' copies can be compared with the base's (the others get a status: a
missing tensor, another dtype, a shape that differs beyond a resized vocabulary), reads the
copies (`rlvr_ray.engine.source`), and runs the passes: the mask pass
(`rlvr_ray.engine.mask_pass`), then for the runs it compared the geometry
(`rlvr_ray.engine.geometry`) and an FP8 tensor's value pass (`rlvr_ray.engine.fp8`). A copy
found to hold NaN/Inf, or whose file fails under the scan, is dropped with its status and the
mask pass is redone without it, so what is measured never depends on a bad copy. The result
holds statistics, not columns: ``rlvr_ray.engine.tables`` makes them rows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlvr_ray.engine.buffers import Buffers, Device
from rlvr_ray.engine.fp8 import fp8_values
from rlvr_ray.engine.geometry import BaseCache, Geometry, measure_geometry
from rlvr_ray.engine.mask_pass import Consensus, MaskResult, NonFinite, chunk_pass, group_pass
from rlvr_ray.engine.memory import FUSED_ARENA_NUMEL, FUSED_WINDOW_NUMEL, skip_reason, streams
from rlvr_ray.engine.plan import TensorSpec, Unit
from rlvr_ray.engine.source import (
    COMPARABLE_DTYPES,
    FP8_DTYPES,
    ReadFailed,
    Source,
    piece_layout,
    piece_shape,
)
from rlvr_ray.io.checkpoint import DTYPES, Checkpoint, CheckpointError
from rlvr_ray.stats.group import MAX_COLS
from rlvr_ray.stats.records import MaskStats

if TYPE_CHECKING:
    import torch


@dataclass
class PassContext:
    """What the passes use of the worker: where they compute, its buffers and reading pool,
    the base decomposition cache; ``n_bytes`` counts the bytes read."""

    device: Device | torch.device
    chunk_numel: int  # elements per row chunk of the torch pass
    buffers: Buffers
    io: ThreadPoolExecutor
    cache: BaseCache
    fused: bool  # the fused CPU pass is available
    n_bytes: int = 0


@dataclass
class Skipped:
    """A run whose copy was not compared: its status, the one-line reason, and any columns
    known all the same."""

    run: int  # index into the unit's runs
    status: str
    message: str
    columns: dict = field(default_factory=dict)


@dataclass
class Compared:
    """A run whose copy was compared, and what was measured of it."""

    run: int
    src: Source  # the run's rows (the common rows only, for a resized vocabulary)
    status: str = "ok"
    message: str | None = None
    mask: MaskStats | None = None
    base_sumsq: float = 0.0  # the base's sum of squares over the rows compared
    geometry: Geometry | str | None = None  # or the geometry_status saying why there is none
    values: tuple | None = None  # an FP8 tensor's value statistics (see fp8_values)


@dataclass
class TensorResult:
    """One tensor's measurements, in the order its rows are written."""

    base: Source | None = None
    skipped: list[Skipped] = field(default_factory=list)
    compared: list[Compared] = field(default_factory=list)
    consensus: Consensus | None = None


def measure(
    ctx: PassContext, unit: Unit, spec: TensorSpec, base: Checkpoint, runs: list[Checkpoint]
) -> TensorResult:
    """Tensor ``spec`` of the unit's base checkpoint against each of ``runs`` (the unit's runs'
    checkpoints, in order) -> its TensorResult."""
    out = TensorResult()
    base_entry = base.entries.get(spec.base_tensor or spec.name)
    if base_entry is None:
        for i, ck in enumerate(runs):
            if spec.run_tensor(i) in ck.entries:
                why = f"tensor {spec.name} is in run {unit.runs[i].name} but not in the base"
                out.skipped.append(Skipped(i, "missing_in_base", why))
        return out
    if base_entry.dtype not in COMPARABLE_DTYPES:
        for i in range(len(runs)):
            out.skipped.append(Skipped(i, "unsupported_dtype", f"base dtype {base_entry.dtype}"))
        return out
    if base_entry.numel == 0:  # no row or column is allocated for it (a [2^40, 0] shape is valid)
        where = f"checkpoint {unit.base_ref}, tensor {spec.name}"
        why = f"{where}: shape {list(base_entry.shape)} is empty"
        columns = {"numel": 0, "dtype_base": base_entry.dtype}
        out.skipped += [Skipped(i, "empty", why, columns) for i in range(len(runs))]
        return out
    shape = piece_shape(base_entry.shape, spec.piece)
    cols = piece_layout(base_entry.shape, spec.piece)[2]
    fused, stream = _read_mode(ctx, unit, spec, base_entry, shape)
    name = spec.base_tensor or spec.name
    src0 = Source(base, name, 0, stream, ctx.buffers, fused=fused, expert=spec.piece)
    out.base = src0
    compared = _comparable(unit, spec, base_entry, runs, stream, ctx.buffers, fused, out)
    sources = [src0, *(c.src for c in compared)]
    if fused:
        copies = len(unit.runs) + 1
        if stream:
            window = max(FUSED_WINDOW_NUMEL, FUSED_ARENA_NUMEL // copies)
            numel = max(1, window // max(cols, 1)) * cols
        else:
            numel = max(s.stored_rows for s in sources) * cols
        ctx.buffers.layout(copies, numel)
    if not _load(ctx, unit, src0, compared, out):
        return out
    result = _masks(ctx, unit, spec, src0, compared, fused, out)
    if result is None:
        return out
    out.consensus = result.consensus
    geometry = measure_geometry(ctx.cache, unit, spec, shape, src0, compared)
    values = (
        fp8_values(src0, [(c.run, c.src) for c in compared]) if src0.dtype in FP8_DTYPES else {}
    )
    for c in compared:
        c.mask, c.base_sumsq = result.runs[c.run]
        c.geometry, c.values = geometry.get(c.run), values.get(c.run)
    out.compared = compared
    return out


def _read_mode(ctx, unit, spec, base_entry, shape) -> tuple[bool, bool]:
    """-> (whether the fused CPU pass takes the tensor, whether its copies are streamed)."""
    _, rows, cols = piece_layout(base_entry.shape, spec.piece)
    # the fused pass counts a row in int32 lanes: rows of more than MAX_COLS columns (no weight
    # matrix has them) take the torch path
    fused = ctx.fused and cols <= MAX_COLS
    if fused:  # every tensor not read whole for the SVD is read window by window
        return True, skip_reason(unit.params, spec.role, shape) is not None
    nbytes = rows * cols * DTYPES[base_entry.dtype][0] // 8
    return False, streams(unit.params, spec.role, shape, nbytes)


def _masks(ctx, unit, spec, src0, compared, fused, out) -> MaskResult | None:
    """The mask pass over the base and the compared runs (a resized vocabulary's run over the
    common rows, in a pass of its own); None when the base's copy turned out bad."""
    mask_pass = group_pass if fused else chunk_pass
    in_consistency = [r.consistency for r in unit.runs]

    def run_pass(src: Source, these: list[Compared], consensus: bool = True) -> MaskResult:
        pairs = [(c.run, c.src) for c in these]
        is_matrix = spec.nbytes > 0 and src.shape[0] > 1
        map_size = unit.params.map_size
        return mask_pass(ctx, src, pairs, in_consistency, is_matrix, map_size, consensus)

    # a run found to hold NaN/Inf, or whose file fails under the scan, is dropped and the
    # passes are redone (nothing is kept before they all succeed)
    while True:
        try:
            result = run_pass(src0, [c for c in compared if c.status == "ok"])
            for c in compared:
                if c.status == "vocab_resized":
                    head = run_pass(src0.head(c.src.shape[0]), [c], consensus=False)
                    result.runs.update(head.runs)
            return result
        except (NonFinite, ReadFailed) as err:
            if not _drop(ctx, unit, src0, compared, err, out):
                return None


def _comparable(unit, spec, base_entry, runs, stream, buffers, fused, out) -> list[Compared]:
    """The runs' sources of a tensor (nothing read yet); a Skipped in ``out`` for each run
    whose copy cannot be compared."""
    compared = []
    for i, (r, ck) in enumerate(zip(unit.runs, runs, strict=True)):
        name = spec.run_tensor(i)  # the run's tied embedding may stand in for its head
        entry = ck.entries.get(name)
        where = f"checkpoint {r.ref}, tensor {name}"
        if entry is None:
            out.skipped.append(Skipped(i, "missing_in_run", f"{where}: not in the run"))
            continue
        if entry.dtype not in COMPARABLE_DTYPES:
            out.skipped.append(Skipped(i, "unsupported_dtype", f"{where}: dtype {entry.dtype}"))
            continue
        fp8 = entry.dtype in FP8_DTYPES or base_entry.dtype in FP8_DTYPES
        if entry.dtype != base_entry.dtype and fp8:
            why = f"{where}: dtype {entry.dtype} vs base {base_entry.dtype}"
            out.skipped.append(Skipped(i, "dtype_mismatch", why))
            continue
        status, message, limit = "ok", None, None
        if entry.shape != base_entry.shape:
            shapes = f"{where}: shape {list(entry.shape)} vs base {list(base_entry.shape)}"
            resized = len(entry.shape) == len(base_entry.shape) >= 2
            if spec.piece is None and resized and entry.shape[1:] == base_entry.shape[1:]:
                status, limit = "vocab_resized", min(base_entry.shape[0], entry.shape[0])
                message = f"{shapes}; compared the common {limit} rows"
            else:
                out.skipped.append(Skipped(i, "shape_mismatch", shapes))
                continue
        src = Source(ck, name, i + 1, stream, buffers, limit, fused, spec.piece)
        compared.append(Compared(i, src, status, message))
    return compared


def _load(ctx, unit, src0: Source, compared: list[Compared], out: TensorResult) -> bool:
    """Read the copies not streamed, side by side; a failed read skips its run (or every run,
    when it is the base's: -> False)."""
    failed = {}
    sources = [src0, *(c.src for c in compared)]
    loads = [ctx.io.submit(s.load) if not s.stream else None for s in sources]
    for src, future in zip(sources, loads, strict=True):
        try:
            ctx.n_bytes += future.result() if future is not None else 0
        except CheckpointError as e:
            failed[id(src)] = str(e)
    if id(src0) in failed:
        out.skipped += [Skipped(i, "read_error", failed[id(src0)]) for i in range(len(unit.runs))]
        return False
    for c in [c for c in compared if id(c.src) in failed]:
        out.skipped.append(Skipped(c.run, "read_error", failed[id(c.src)]))
        compared.remove(c)
    return True


def _drop(ctx, unit, src0: Source, compared: list[Compared], err, out: TensorResult) -> bool:
    """Skip the copy a pass failed on (``err``): its run, or every run when it is the base's
    (-> False: nothing is left to compare)."""
    base_bad = err.src.slot == 0  # the base (or its head, in a resized pass)
    c = None if base_bad else next(c for c in compared if c.src.slot == err.src.slot)
    if isinstance(err, ReadFailed):
        status, message = "read_error", err.message
    elif base_bad:
        count = src0.nonfinite(ctx.chunk_numel)
        status = "nonfinite"
        message = (
            f"checkpoint {unit.base_ref}, tensor {src0.name}: {count} NaN/Inf values in the base"
        )
    else:
        count = c.src.nonfinite(ctx.chunk_numel)
        status = "nonfinite"
        message = f"checkpoint {unit.runs[c.run].ref}, tensor {c.src.name}: {count} NaN/Inf values"
    for bad in compared if base_bad else [c]:
        out.skipped.append(Skipped(bad.run, status, message))
    if base_bad:
        return False
    compared.remove(c)
    return True
